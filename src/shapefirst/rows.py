"""Row layouts: which rows of a classifier-free-guidance batch ([uncond 0..N-1, cond 0..N-1], diffusers'
order) one denoiser call runs, and how the rows it computed refill the whole batch. Built on the
denoiser's device once per pattern of guided images and reused (the per-call path creates no index
tensors). `row_images` is the one rule every cache, capture and intervention uses for "which row is
image i's conditional row"."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .errors import ShapefirstError


# denoiser arguments that never carry the batch, whose first dimension is positions, not rows: the positional ids of
# Flux-style transformers (Flux, Chroma, Bria: [tokens, 3]) and rotary tables (Allegro, HunyuanDiT, CogVideoX); one
# whose length happens to equal the CFG rows must not be cut as rows
SHARED_ARGS = ("txt_ids", "img_ids", "image_rotary_emb")


def rows_of(x: Any, rows: int, idx: torch.Tensor) -> Any:
    """Slice every tensor whose first dimension is the CFG batch; recurse into dicts, lists, tuples (a dict's
    SHARED_ARGS are passed as they are). `idx` lives on the denoiser's device (a no-op `.to` for tensors there)."""
    if isinstance(x, torch.Tensor):
        return x[idx.to(x.device)] if x.dim() > 0 and x.shape[0] == rows else x
    if isinstance(x, dict):
        return {k: v if k in SHARED_ARGS else rows_of(v, rows, idx) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(rows_of(v, rows, idx) for v in x)
    return x


def expand_rows(x: Any, n_run: int, src: torch.Tensor) -> Any:
    """The inverse of rows_of for outputs: every tensor with `n_run` rows becomes the full CFG batch,
    row r taken from computed row src[r] (recursing into lists and tuples)."""
    if isinstance(x, torch.Tensor):
        return x.index_select(0, src.to(x.device)) if x.dim() > 0 and x.shape[0] == n_run else x
    if isinstance(x, (list, tuple)):
        return type(x)(expand_rows(v, n_run, src) for v in x)
    return x


def main_output(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return out[0]
    return out.sample


def replace_output(out: Any, new: torch.Tensor) -> Any:
    if isinstance(out, torch.Tensor):
        return new
    if isinstance(out, tuple):
        return (new,) + tuple(out[1:])
    if isinstance(out, list):
        return [new] + list(out[1:])
    out.sample = new
    return out



@dataclass(frozen=True)
class RowLayout:
    """The rows one denoiser call runs, for one pattern of guided images; built once per pattern and
    device, then reused (the per-call path creates no index tensors).

    run: host LongTensor, the rows of the CFG batch that run, in order. On the denoiser's device:
    run_dev (the same), src (for each of the 2N CFG rows, the computed row that fills it: an unguided
    image's kept row fills both its halves), row_sample / row_branch (image and branch, 0 uncond 1 cond,
    of every computed row), kept_pos / kept_sample (computed rows of the branch kept after the stop, and
    their images), sample_count (computed rows per image), guided (bool per image)."""

    run: torch.Tensor
    run_dev: torch.Tensor
    src: torch.Tensor
    row_sample: torch.Tensor
    row_branch: torch.Tensor
    kept_pos: torch.Tensor
    kept_sample: torch.Tensor
    sample_count: torch.Tensor
    guided: torch.Tensor
    full: bool


def _layout(run: torch.Tensor, src: torch.Tensor, n: int, kept_branch: int, guided: torch.Tensor, device) -> RowLayout:
    sample, branch = run % n, run // n
    kept_pos = torch.nonzero(branch == kept_branch).flatten()
    def to(t):
        return t.to(device)
    return RowLayout(run, to(run), to(src), to(sample), to(branch), to(kept_pos), to(sample[kept_pos]),
                     to(torch.bincount(sample, minlength=n)), to(guided), bool(guided.all()))


def cfg_layout(guided: tuple[bool, ...], after: str, device) -> RowLayout:
    """The layout of a CFG call ([uncond 0..N-1, cond 0..N-1]) where image i is guided iff guided[i]."""
    n = len(guided)
    g, ar = torch.tensor(guided, dtype=torch.bool), torch.arange(n)
    kept = ar + (n if after == "cond" else 0)
    run = torch.sort(torch.cat([ar[g], ar[g] + n, kept[~g]])).values
    pos = torch.full((2 * n,), -1, dtype=torch.long)
    pos[run] = torch.arange(len(run))
    src = pos.clone()
    src[ar[~g]] = pos[kept[~g]]
    src[ar[~g] + n] = pos[kept[~g]]
    return _layout(run, src, n, 1 if after == "cond" else 0, g, device)


def plain_layout(rows: int, device) -> RowLayout:
    """A call without CFG: every row is the conditional row of its own image."""
    ar, one = torch.arange(rows), torch.ones(rows, dtype=torch.long)
    def to(t):
        return t.to(device)
    return RowLayout(ar, to(ar), to(ar), to(ar), to(one), to(ar), to(ar), to(one), to(one.bool()), True)



def label_rows(rows: int, n: int, cfg: bool | None, layout: RowLayout | None = None,
               what: str = "images") -> tuple[torch.Tensor, torch.Tensor]:
    """The one rule for which image and branch each row of a denoiser (or attention) call with `rows` rows
    for `n` images belongs to: (image, branch) host LongTensors, branch 0 = unconditional, 1 = conditional
    (no device read). With the run's `layout` (a guidance schedule prepared the call, for these n images)
    its rows decide; else the CFG flag: a CFG call is [uncond 0..n-1, cond 0..n-1], a plain call has one
    conditional row per image (cfg None: 2n rows mean CFG). Any other row count is a ShapefirstError."""
    if layout is not None and len(layout.run) == rows:
        run = layout.run if cfg else torch.arange(rows) + n
        return run % n, run // n
    if rows == 2 * n and cfg is not False:
        return torch.arange(2 * n) % n, torch.arange(2 * n) // n
    if rows == n and not cfg:
        return torch.arange(n), torch.ones(n, dtype=torch.long)
    raise ShapefirstError(f"a call got {rows} rows for {n} {what}",
                          f"give exactly one of the {what} per image of the batch being generated")


def row_images(rows: int, n: int, cfg: bool | None, layout: RowLayout | None = None,
               what: str = "images") -> torch.Tensor:
    """Per row: the image whose conditional row it is, -1 for an unconditional row (see label_rows)."""
    image, branch = label_rows(rows, n, cfg, layout, what)
    return torch.where(branch == 1, image, torch.full_like(image, -1))
