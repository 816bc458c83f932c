"""Cross-attention maps per token and per denoiser call, captured without changing any output.

`capture_attention(pipe)` wraps the processor of every text-attention layer of the denoiser. The
wrapper calls the ORIGINAL processor for the layer's output (images stay bit-identical) and
recomputes softmax(q k^T * scale) on the side, in float32, from the same inputs.

Layers per family (`cross_attention_layers`):
- SD 1.x/2.x, SDXL: the UNet's cross-attention `attn2` modules (keys = the text tokens: 77).
- PixArt: the transformer blocks' cross-attention `attn2` to the T5 tokens, with the pipeline's
  encoder attention mask applied exactly as the processor does (`attn.prepare_attention_mask`,
  a -10000 bias): masked (padding) tokens get probability 0 (exp underflows in float32).
- SD3: joint attention (the `attn` of each JointTransformerBlock, the Attention modules with
  `add_k_proj`): one softmax over [image tokens; text tokens] for every query. Captured: the image
  queries' probabilities on the TEXT keys, renormalised to sum 1 over the text tokens (so maps,
  masses and token classes mean the same as for cross-attention); the share of the joint softmax
  that lands on text tokens before renormalising is kept apart, `text_share` [calls, images].
  SD3's text sequence is the 77 CLIP positions then the T5 positions
  (tokens.denoiser_token_info gives the matching classes). Text queries are not captured.

Rows (the CFG batch is [uncond rows, cond rows]): per call, every row is labelled with its branch
and image. With the shapefirst guidance hook on the denoiser, the labels come from the RunState it
shares (`guidance.run_state_of`: the current call's row layout; a guidance stop runs only some rows).
Without it: CFG (guidance.cfg_active on the call's latent input:
the pipeline's do_classifier_free_guidance, or for PixArt equal latent halves; capturing a bare
denoiser module: an even row count > 1) and rows == 2N -> first N uncond, last N cond, with
N = n_images or rows // 2; no CFG -> every row is cond of its image; anything else is unlabelled.
Only the rows of the branch `rows` ("cond" or "uncond") are stored per image; an image with no
such row in a call (e.g. unconditional-only calls after a guidance stop) gets NaN there and
`complete[call]` is False. `row_mass[call]` always keeps what ran: every row's token mass.

Thresholds: `convergence` binarises a map as map > its mean over pixels (threshold="mean"), or
map > t * max for a float t; F1 = 2|A&B| / (|A|+|B|) against the last kept call (1 if both empty).
"""
from __future__ import annotations

import json
import math
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F

from .errors import ShapefirstError
from .families import family_of_pipe
from .guidance_hook import run_state_of
from .pipeline import cfg_active, denoiser_of, latent_input
from .rows import label_rows
from .results import atomic_write_bytes, atomic_write_text, strict_dumps
from .tokens import TOKEN_CLASSES, TokenInfo

KEEP_CHOICES = ("mean", "per_head", "none")
ROW_CHOICES = ("cond", "uncond")


def attention_probs(attn, hidden_states, encoder_hidden_states, attention_mask=None, temb=None, scale=None):
    """softmax(q k^T * scale) of one diffusers `Attention` call, float32 [rows, heads, pixels, tokens],
    and the spatial size (h, w) when the input is 4-D (else None). Same steps as AttnProcessor:
    spatial_norm, 4-D reshape, group_norm, to_q, norm_cross, to_k, per-head split, norm_q/norm_k,
    mask added to the scores. scale defaults to attn.scale."""
    x = hidden_states
    if attn.spatial_norm is not None:
        x = attn.spatial_norm(x, temb)
    spatial = None
    if x.ndim == 4:
        b, c, h, w = x.shape
        spatial = (h, w)
        x = x.view(b, c, h * w).transpose(1, 2)
    ctx = encoder_hidden_states[0] if isinstance(encoder_hidden_states, (tuple, list)) else encoder_hidden_states
    b, n_tok = x.shape[0], (x if ctx is None else ctx).shape[1]
    if attn.group_norm is not None:
        x = attn.group_norm(x.transpose(1, 2)).transpose(1, 2)
    if ctx is None:
        ctx = x
    elif attn.norm_cross:
        ctx = attn.norm_encoder_hidden_states(ctx)
    q, k = attn.to_q(x), attn.to_k(ctx)
    heads = attn.heads
    d = k.shape[-1] // heads
    q = q.view(b, -1, heads, d).transpose(1, 2)
    k = k.view(b, -1, heads, d).transpose(1, 2)
    if getattr(attn, "norm_q", None) is not None:
        q = attn.norm_q(q)
    if getattr(attn, "norm_k", None) is not None:
        k = attn.norm_k(k)
    scores = (q.float() @ k.float().transpose(-1, -2)) * float(attn.scale if scale is None else scale)
    if attention_mask is not None:
        m = attn.prepare_attention_mask(attention_mask, n_tok, b)
        scores = scores + m.view(b, heads, -1, m.shape[-1]).float()
    return scores.softmax(dim=-1), spatial


def is_joint_attention(attn) -> bool:
    """SD3-style joint attention: text tokens get their own projections (add_k_proj) and share one
    softmax with the image tokens."""
    return getattr(attn, "add_k_proj", None) is not None and not getattr(attn, "is_cross_attention", False)


def joint_attention_probs(attn, hidden_states, encoder_hidden_states, chunk_elements: int = 2 ** 25):
    """Image queries of one joint-attention call (JointAttnProcessor2_0's steps: to_q/to_k,
    per-head split, norm_q/norm_k, add_k_proj + norm_added_k for the text, SDPA's scale
    1/sqrt(head_dim)): float32 ([rows, heads, pixels, text tokens] probabilities over the text
    tokens, renormalised to sum 1; [rows, heads, pixels] share of the joint softmax on text).
    Computed in chunks of queries (the full [pixels, pixels + tokens] matrix is never held)."""
    x, ctx = hidden_states, encoder_hidden_states
    b = x.shape[0]
    heads = attn.heads
    q, k, ek = attn.to_q(x), attn.to_k(x), attn.add_k_proj(ctx)
    d = k.shape[-1] // heads
    q = q.view(b, -1, heads, d).transpose(1, 2)
    k = k.view(b, -1, heads, d).transpose(1, 2)
    ek = ek.view(b, -1, heads, d).transpose(1, 2)
    if getattr(attn, "norm_q", None) is not None:
        q = attn.norm_q(q)
    if getattr(attn, "norm_k", None) is not None:
        k = attn.norm_k(k)
    if getattr(attn, "norm_added_k", None) is not None:
        ek = attn.norm_added_k(ek)
    q, k, ek = q.float(), k.float(), ek.float()
    scale = d ** -0.5
    pixels, n_img, n_tok = q.shape[2], k.shape[2], ek.shape[2]
    step = max(1, chunk_elements // max(1, b * heads * (n_img + n_tok)))
    probs, shares = [], []
    for i in range(0, pixels, step):
        qi = q[:, :, i:i + step]
        s_img = (qi @ k.transpose(-1, -2)) * scale
        s_txt = (qi @ ek.transpose(-1, -2)) * scale
        lse = torch.logsumexp(torch.cat([s_img, s_txt], dim=-1), dim=-1, keepdim=True)
        txt = torch.exp(s_txt - lse)
        share = txt.sum(-1)
        probs.append(txt / share.unsqueeze(-1))
        shares.append(share)
    return torch.cat(probs, dim=2), torch.cat(shares, dim=2)


class CaptureProcessor:
    """Wraps the original processor of one cross-attention layer: output from the original,
    probabilities recomputed on the side and handed to the capture."""

    def __init__(self, original, capture: "AttentionCapture", layer: str):
        from diffusers.models.attention_processor import AttnProcessor2_0

        self.original, self.capture, self.layer = original, capture, layer
        self.sdpa = isinstance(original, AttnProcessor2_0)  # SDPA's scale is 1/sqrt(head_dim), not attn.scale

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):  # the parameter names of AttnProcessor: Attention.forward filters by them
        extra = {"temb": temb} if temb is not None else {}
        out = self.original(attn, hidden_states, encoder_hidden_states=encoder_hidden_states,
                            attention_mask=attention_mask, **extra, **kwargs)
        if self.capture.n_calls > 0:  # only inside a denoiser call
            with torch.no_grad():
                if is_joint_attention(attn):
                    if encoder_hidden_states is None:
                        return out
                    probs, share = joint_attention_probs(attn, hidden_states, encoder_hidden_states)
                    self.capture._record(self.layer, probs, None, share.mean(dim=(1, 2)).cpu())
                    return out
                scale = (attn.to_k.out_features // attn.heads) ** -0.5 if self.sdpa else None
                probs, spatial = attention_probs(attn, hidden_states, encoder_hidden_states, attention_mask,
                                                 temb, scale)
                self.capture._record(self.layer, probs, spatial)
        return out


class AttentionCapture:
    """What `capture_attention` recorded. Public attributes:
    layers (captured layer names), spatial {layer: (h, w)}, heads {layer: int}, keep, rows,
    n_images, n_calls, maps {(call, layer): [images, pixels, tokens] or [images, heads, pixels, tokens]},
    row_mass [per call: [rows_run, tokens]], row_labels [per call: "cond:0", "uncond:1", "?" per row],
    cond_row LongTensor-like list [per call: row index per image, -1 = none]."""

    def __init__(self, keep: str = "mean", rows: str = "cond", calls=None, n_images: int | None = None,
                 pipe=None, denoiser=None):
        if keep not in KEEP_CHOICES:
            raise ShapefirstError(f"keep={keep!r} is not one of {KEEP_CHOICES}", "pass 'mean', 'per_head' or 'none'")
        if rows not in ROW_CHOICES:
            raise ShapefirstError(f"rows={rows!r} is not one of {ROW_CHOICES}", "pass 'cond' or 'uncond'")
        self.keep, self.rows, self.n_images = keep, rows, n_images
        self.calls = None if calls is None else {int(c) for c in calls}
        self.pipe, self.denoiser = pipe, denoiser  # only while capturing
        self.layers, self.spatial, self.heads, self.maps, self.n_calls = [], {}, {}, {}, 0
        self.row_labels, self.cond_row = [], []  # per call (None until a layer ran in it)
        self._row_sum, self._mass_sum, self._mass_count = [], [], []  # per call: sums over layers, layer count
        self._share_sum, self._share_count = [], []  # per call: joint attention's text share (SD3)
        self._cfg = []  # per call: did it run CFG (guidance.cfg_active), None = unknown
        self._latent_hw = None  # (h, w) of the denoiser's latent input
        self._patch = 1  # a transformer's patch size: its token grid is the latent grid / patch

    # -- recording -----------------------------------------------------------------------
    def _pre_hook(self, module, args, kwargs):
        """Forward pre-hook of the denoiser: one more call; remember the latent size."""
        sample = latent_input(args, kwargs)
        if isinstance(sample, torch.Tensor) and sample.ndim == 4:
            self._latent_hw = tuple(sample.shape[-2:])
        self.n_calls += 1
        for lst in (self._row_sum, self._mass_sum, self.row_labels, self.cond_row, self._share_sum):
            lst.append(None)
        self._mass_count.append(0)
        self._share_count.append(0)
        self._cfg.append(cfg_active(self.pipe, sample)
                         if self.pipe is not None and isinstance(sample, torch.Tensor) else None)

    def _labels(self, rows: int) -> tuple[int, list[str]]:
        """Images of this call and "branch:image" of every row (rows.label_rows; see the module docstring)."""
        st = run_state_of(self.denoiser) if self.denoiser is not None else None
        st = st if st is not None and st.layout is not None else None  # the shared RunState, if any
        flag = self._cfg[-1] if self._cfg else None
        scheduled = st is not None and bool(flag)  # the pipeline passed 2N rows; the hook ran only the needed ones
        if not scheduled and not (rows % 2 == 0 and rows > 1 if flag is None else flag):
            return rows, [f"cond:{r}" for r in range(rows)]
        n = st.batch if scheduled else (self.n_images or rows // 2)
        try:
            image, branch = label_rows(rows, n, True, st.layout if scheduled else None)
        except ShapefirstError:
            return n, ["?"] * rows
        return n, [f"{'cond' if b else 'uncond'}:{i}" for i, b in zip(image.tolist(), branch.tolist())]

    def _hw(self, pixels: int) -> tuple[int, int]:
        """Spatial size of a layer with `pixels` positions: the latent halved (rounding up) until it fits."""
        if self._latent_hw is not None:
            h, w = self._latent_hw
            if self._patch > 1 and (h // self._patch) * (w // self._patch) == pixels:
                return h // self._patch, w // self._patch
            while h * w > pixels:
                h, w = -(-h // 2), -(-w // 2)
            if h * w == pixels:
                return h, w
        s = math.isqrt(pixels)
        if s * s != pixels:
            raise ShapefirstError(f"cannot tell the spatial size of a layer with {pixels} pixels",
                                  "call the denoiser with a 4-D latent sample")
        return s, s

    def _record(self, layer: str, probs: torch.Tensor, spatial, share: torch.Tensor | None = None) -> None:
        c = self.n_calls - 1
        rows, heads, pixels, n_tok = probs.shape
        if self.cond_row[c] is None:
            n, labels = self._labels(rows)
            if self.n_images is None:
                self.n_images = n
            elif n != self.n_images:
                raise ShapefirstError(f"the capture saw {self.n_images} images, then a call with {n}",
                                      "use one capture_attention block per batch size (or pass n_images)")
            pos = {x: i for i, x in enumerate(labels)}
            self.row_labels[c] = labels
            self.cond_row[c] = [pos.get(f"{self.rows}:{i}", -1) for i in range(self.n_images)]
            self._row_sum[c] = torch.zeros(rows, n_tok)
            self._mass_sum[c] = torch.zeros(self.n_images, n_tok)
        if layer not in self.spatial:
            self.spatial[layer], self.heads[layer] = spatial or self._hw(pixels), heads
        sel = torch.tensor(self.cond_row[c])
        ok = sel >= 0
        row_mass = probs.mean(dim=(1, 2)).cpu()
        self._row_sum[c] += row_mass
        self._mass_sum[c][ok] += row_mass[sel[ok]]
        self._mass_sum[c][~ok] = float("nan")
        self._mass_count[c] += 1
        if share is not None:  # joint attention: [rows] text share of this layer
            if self._share_sum[c] is None:
                self._share_sum[c] = torch.zeros(self.n_images)
            self._share_sum[c][ok] += share[sel[ok]].float()
            self._share_sum[c][~ok] = float("nan")
            self._share_count[c] += 1
        if self.keep != "none" and (self.calls is None or c in self.calls):
            kept = probs if self.keep == "per_head" else probs.mean(dim=1)
            full = torch.full((self.n_images,) + tuple(kept.shape[1:]), float("nan"))
            full[ok] = kept[sel[ok].to(kept.device)].cpu()
            self.maps[(c, layer)] = full

    # -- aggregation ---------------------------------------------------------------------
    @property
    def mass(self) -> torch.Tensor:
        """[calls, images, tokens]: attention mass per token, mean over layers, heads and pixels."""
        n_tok = next((s.shape[-1] for s in self._mass_sum if s is not None), 0)
        nan = torch.full((self.n_images or 0, n_tok), float("nan"))
        return torch.stack([s / n if n else nan for s, n in zip(self._mass_sum, self._mass_count)]) \
            if self.n_calls else torch.zeros(0, self.n_images or 0, n_tok)

    @property
    def text_share(self) -> torch.Tensor:
        """[calls, images]: joint attention only (SD3): the share of the image queries' joint softmax
        that lands on text tokens, mean over layers, heads and pixels (NaN where none was captured)."""
        n = self.n_images or 0
        out = torch.full((self.n_calls, n), float("nan"))
        for c, (s, k) in enumerate(zip(self._share_sum, self._share_count)):
            if s is not None and k:
                out[c] = s / k
        return out

    @property
    def row_mass(self) -> list[torch.Tensor | None]:
        """Per call: [rows that ran, tokens] mass of every row, labelled by row_labels[call]."""
        return [s / n if s is not None and n else s for s, n in zip(self._row_sum, self._mass_count)]

    @property
    def complete(self) -> list[bool]:
        """Per call: did every image have a row of the captured branch?"""
        return [r is not None and min(r) >= 0 for r in self.cond_row]

    def class_mass(self, token_info_per_image) -> dict[str, torch.Tensor]:
        """{class: [calls, images]} sum of mass over each class's positions (one TokenInfo for all
        images, or one per image). Over TOKEN_CLASSES the values sum to 1 per call and image."""
        mass = self.mass
        infos = [token_info_per_image] * mass.shape[1] if isinstance(token_info_per_image, TokenInfo) \
            else list(token_info_per_image)
        if len(infos) != mass.shape[1]:
            raise ShapefirstError(f"{len(infos)} TokenInfos for {mass.shape[1]} images", "pass one per image")
        return {cls: torch.stack([mass[:, i][:, info.class_mask(cls)].sum(-1) for i, info in enumerate(infos)], 1)
                for cls in TOKEN_CLASSES}

    def kept_calls(self) -> list[int]:
        return sorted({c for c, _ in self.maps})

    def token_maps(self, call: int) -> torch.Tensor:
        """[images, tokens, h, w]: each layer's map (head mean) resized bilinearly to the largest
        layer resolution, then averaged over layers."""
        layers = [layer for layer in self.layers if (call, layer) in self.maps]
        if not layers:
            raise ShapefirstError(f"no per-pixel maps were kept for call {call}",
                                  "capture with keep='mean' or 'per_head' and include this call in `calls`")
        size = max((self.spatial[layer] for layer in layers), key=lambda s: s[0] * s[1])
        acc = 0
        for layer in layers:
            m = self.maps[(call, layer)]
            m = m.mean(dim=1) if m.ndim == 4 else m
            h, w = self.spatial[layer]
            m = m.reshape(m.shape[0], h, w, -1).permute(0, 3, 1, 2)
            acc = acc + F.interpolate(m, size=size, mode="bilinear", align_corners=False)
        return acc / len(layers)

    def word_maps(self, call: int, image: int, token_info: TokenInfo) -> dict[str, torch.Tensor]:
        """{word: [h, w]} mean of token_maps over the word's token positions. A repeated word gets
        keys "word", "word#2", ...; words truncated away are left out."""
        maps, out, seen = self.token_maps(call)[image], {}, {}
        for i, word in enumerate(token_info.words):
            seen[word] = seen.get(word, 0) + 1
            if token_info.word_positions(i):
                out[word if seen[word] == 1 else f"{word}#{seen[word]}"] = maps[token_info.word_positions(i)].mean(0)
        return out

    def convergence(self, token_positions, threshold="mean") -> torch.Tensor:
        """[calls, images] F1 between the binarised map (mean over token_positions: one list for all
        images or one per image) at each call and at the last kept call; NaN for calls not kept."""
        kept = self.kept_calls()
        if not kept:
            raise ShapefirstError("no per-pixel maps were kept", "capture with keep='mean' or 'per_head'")
        out = torch.full((self.n_calls, self.n_images), float("nan"))

        def binary(call):
            tm = self.token_maps(call)
            per = token_positions if token_positions and isinstance(token_positions[0], (list, tuple)) \
                else [token_positions] * tm.shape[0]
            return torch.stack([binarize(tm[i, list(p)].mean(0), threshold) for i, p in enumerate(per)])

        final = binary(kept[-1])
        for c in kept:
            out[c] = binary_f1(binary(c), final)
        return out

    def kl_to_uniform(self, call: int) -> torch.Tensor:
        """[images, tokens]: KL(map / sum || uniform) over the pixels of token_maps(call)."""
        return kl_to_uniform(self.token_maps(call).flatten(2))

    # -- files ---------------------------------------------------------------------------
    def save(self, folder) -> Path:
        """attention.safetensors (mass, cond_row, row_mass.<call>, map.<call>.<layer>) + attention.json."""
        from safetensors.torch import save

        n = self.n_images or 0
        rows = [r if r is not None else [-1] * n for r in self.cond_row]
        t = {"mass": self.mass.contiguous(), "cond_row": torch.tensor(rows, dtype=torch.long).reshape(-1, n),
             **{f"row_mass.{c}": m.contiguous() for c, m in enumerate(self.row_mass) if m is not None},
             **{f"map.{c}.{layer}": m.contiguous() for (c, layer), m in self.maps.items()}}
        if any(k for k in self._share_count):
            t["text_share"] = self.text_share.contiguous()
        meta = {"keep": self.keep, "rows": self.rows, "n_images": self.n_images, "n_calls": self.n_calls,
                "layers": self.layers, "spatial": self.spatial, "heads": self.heads, "row_labels": self.row_labels,
                "calls": sorted(self.calls) if self.calls is not None else None}
        atomic_write_bytes(Path(folder) / "attention.safetensors", save(t))  # arrays first, metadata last
        atomic_write_text(Path(folder) / "attention.json", strict_dumps(meta, indent=2))
        return Path(folder)

    @classmethod
    def load(cls, folder) -> "AttentionCapture":
        from safetensors.torch import load_file

        folder = Path(folder)
        if not (folder / "attention.json").exists():
            raise ShapefirstError(f"{folder} holds no saved attention capture", "pass a folder written by save()")
        meta = json.loads((folder / "attention.json").read_text(encoding="utf-8"))
        t = load_file(folder / "attention.safetensors")
        cap = cls(keep=meta["keep"], rows=meta["rows"], calls=meta["calls"], n_images=meta["n_images"])
        cap.n_calls, cap.layers, cap.heads, cap.row_labels = (meta[k] for k in ("n_calls", "layers", "heads",
                                                                                  "row_labels"))
        cap.spatial, cap.cond_row = {k: tuple(v) for k, v in meta["spatial"].items()}, t["cond_row"].tolist()
        cap._mass_sum, cap._mass_count = list(t["mass"]), [1] * cap.n_calls
        cap._row_sum = [t.get(f"row_mass.{c}") for c in range(cap.n_calls)]
        share = t.get("text_share")
        cap._share_sum = list(share) if share is not None else [None] * cap.n_calls
        cap._share_count = [1] * cap.n_calls if share is not None else [0] * cap.n_calls
        for key, m in t.items():
            if key.startswith("map."):
                c, layer = key[4:].split(".", 1)
                cap.maps[(int(c), layer)] = m
        return cap


def binarize(m: torch.Tensor, threshold="mean") -> torch.Tensor:
    """Bool map: m > mean(m) ("mean") or m > threshold * max(m) (a float in (0, 1))."""
    if threshold == "mean":
        return m > m.mean()
    if isinstance(threshold, (int, float)) and 0 < threshold < 1:
        return m > threshold * m.max()
    raise ShapefirstError(f"threshold {threshold!r} is not 'mean' or a number in (0, 1)", "pass 'mean' or e.g. 0.5")


def binary_f1(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """2|A&B| / (|A|+|B|) over all but the first dimension; 1 where both are empty."""
    inter = (a & b).flatten(1).sum(1).double()
    total = (a.flatten(1).sum(1) + b.flatten(1).sum(1)).double()
    return torch.where(total > 0, 2 * inter / total.clamp_min(1), torch.ones_like(total)).float()


def kl_to_uniform(maps: torch.Tensor) -> torch.Tensor:
    """KL(p || uniform) = sum p log(p * P) over the last dimension (P entries), p = maps normalised
    to sum 1 there; 0 log 0 = 0. Closed forms: 0 for a uniform map, log P for a one-pixel map."""
    p = maps.double() / maps.double().sum(-1, keepdim=True)
    return torch.where(p > 0, p * torch.log(p * p.shape[-1]), torch.zeros_like(p)).sum(-1).float()


def cross_attention_layers(unet) -> list[str]:
    """Names (without ".processor") of the denoiser's text-attention modules: cross-attention
    (UNet and PixArt `attn2`) and SD3's joint attention (`attn` with add_k_proj)."""
    from diffusers.models.attention_processor import Attention

    return [name for name, mod in unet.named_modules()
            if isinstance(mod, Attention) and (mod.is_cross_attention or is_joint_attention(mod))]


@contextmanager
def capture_attention(pipe, keep: str = "mean", layers=None, calls=None, rows: str = "cond",
                      n_images: int | None = None):
    """`with capture_attention(pipe) as cap: generate(pipe, ...)` -> cap.mass, cap.token_maps(call), ...

    keep: "mean" (head-mean maps [images, pixels, tokens] per call and layer), "per_head"
    ([images, heads, pixels, tokens]) or "none" (only the token mass). layers: names of
    cross-attention layers to capture (default all). calls: denoiser call indices (0-based, counted
    inside this block) whose maps are kept (default all; the mass is kept for every call). rows:
    the CFG branch stored per image. n_images: the batch size when it cannot be inferred.
    The original processors (the same objects) are back on exit, also after an exception."""
    if not isinstance(pipe, torch.nn.Module):
        family_of_pipe(pipe)  # a clear "not supported" error for other pipelines
    unet = denoiser_of(pipe) if not isinstance(pipe, torch.nn.Module) else pipe
    if not hasattr(unet, "attn_processors") or not hasattr(unet, "set_attn_processor"):
        raise ShapefirstError(f"{type(unet).__name__} has no attention processors",
                              "pass a supported pipeline or its denoiser (UNet or transformer)")
    cross = cross_attention_layers(unet)
    chosen = cross if layers is None else [name[:-len(".processor")] if name.endswith(".processor") else name
                                          for name in layers]
    unknown = sorted(set(chosen) - set(cross))
    if unknown or not chosen:
        raise ShapefirstError(f"not cross-attention layers: {unknown or 'none chosen'}",
                              f"pick from the {len(cross)} names of cross_attention_layers(unet)")
    cap = AttentionCapture(keep, rows, calls, n_images, pipe=None if pipe is unet else pipe, denoiser=unet)
    cap.layers = list(chosen)
    patch = getattr(getattr(unet, "config", None), "patch_size", None)
    cap._patch = int(patch) if isinstance(patch, int) and patch > 0 else 1
    original = dict(unet.attn_processors)
    handle = None
    try:
        new = dict(original)
        for name in chosen:
            new[f"{name}.processor"] = CaptureProcessor(original[f"{name}.processor"], cap, name)
        unet.set_attn_processor(new)
        handle = unet.register_forward_pre_hook(cap._pre_hook, with_kwargs=True)
        yield cap
    finally:
        if handle is not None:
            handle.remove()
        unet.set_attn_processor(dict(original))
        cap.pipe = cap.denoiser = None
