"""Text-attention maps per token and per denoiser call, captured without changing any output.

`capture_attention(pipe)` wraps the processor of every text-attention layer of the denoiser(s). The
wrapper calls the ORIGINAL processor for the layer's output (images stay bit-identical) and
recomputes the image queries' softmax(q k^T * scale) on the side, in float32, from the same inputs
(the processor's own steps: projections, q/k norms, rotary embeddings, mask). The wrapper has the
original processor's call signature, so a layer passes it exactly the arguments it passed before.

Which layers (`text_attention_layers`): the family's declaration (families.Family.attention) decides:
"cross" captures the cross-attention layers, "joint" the layers where image and text tokens share one
softmax. A bare denoiser module (no pipeline) gets both kinds. How a layer's probabilities are read
follows its processor (`PROCESSOR_KINDS`; on a classic diffusers `Attention`, the processors that compute
AttnProcessor's or SD3's queries and keys, `CLASSIC_PROCESSORS`); a text layer with any other processor
(HunyuanVideo's, a user's own) is refused with one line naming it. The processors are set per layer
(`set_processor`; Lumina 2's transformer has no attn_processors) and the same objects are back on exit.
- cross-attention (the keys are the text tokens):
  SD 1.x/2.x, SDXL the UNet's `attn2` (77 CLIP tokens);
  PixArt, Sana      the blocks' `attn2` to the T5 / Gemma tokens, with the pipeline's encoder attention
                    mask applied as the processor does (a -10000 bias: masked padding gets probability 0);
  HunyuanDiT        `attn2` to the 77 BERT + 256 T5 positions, the query rotated by the image RoPE as
                    HunyuanAttnProcessor2_0 does;
  Wan               `attn2` of every block (WanAttnProcessor: q/k RMS norms over all heads, then the head
                    split); an image-to-video layer's image context (its first positions, add_k_proj) is a
                    separate softmax and is not captured: the text is the processor's last 512 positions.
- joint attention (one softmax over image and text keys for every image query): captured are the image
  queries' probabilities on the TEXT keys, renormalised to sum 1 over the text tokens (so maps, masses and
  token classes mean the same as for cross-attention); the share of the joint softmax that lands on text
  before renormalising is kept apart, `text_share` [calls, images]. Text queries are not captured.
  SD3               `attn` of each JointTransformerBlock (text keys from add_k_proj; 77 CLIP then T5 positions);
  Flux              both stream kinds: the double-stream blocks' `attn` (text keys from add_k_proj, the
                    sequence [text; image] rotated by the image_rotary_emb) and the single-stream blocks'
                    `attn`, whose input is already [text; image] (the text length is the denoiser call's
                    encoder_hidden_states length);
  CogVideoX         `attn1` of each block ([text; video] concatenated in the processor, RoPE on the video
                    part when the model uses it, norm_q / norm_k per head);
  Chroma            as Flux, with its text mask;
  Qwen-Image        `attn` of each block (text keys from add_k_proj, each stream rotated by its own frequencies,
                    the text mask); its text is the chat-templated prompt after the dropped template head;
  CogView4          `attn1` ([text; image], the image RoPE; its text mask is a 0/1 FLOAT mask SDPA adds);
  Lumina 2          `layers.*.attn` (its context and noise refiners see text or image alone: not captured):
                    row i's sequence is its L_i unmasked caption positions then the image tokens, with grouped
                    key heads and the complex RoPE; probabilities over the caption's positions (0 on its padding).
The two branches of a step may have texts of different lengths (Qwen-Image's negative prompt): row_mass pads
the shorter with 0; the captured branch's maps and mass keep its own length.
Pipelines with several denoisers (Wan 2.2's `transformer_2`) are captured in all of them; the layers of
the second are named "transformer_2.<layer>".

Video (Wan, CogVideoX): a layer's pixels are all its latent frames (frame-major), maps [images,
frames * h * w, tokens]; `frames[layer]` says how many. `token_maps(call)` averages the maps over the
latent frames; `token_maps(call, frame=f)` gives latent frame f.

Calls and rows. A capture call is one denoising step:
- batched CFG (SD, SDXL, PixArt, SD3, Sana, CogVideoX, HunyuanDiT, Kolors): one denoiser call per step, its
  batch [uncond rows, cond rows]. With the shapefirst guidance hook on the denoiser the labels come from the
  RunState it shares (`guidance.run_state_of`: the current call's row layout; a guidance stop runs only some
  rows). Without it: CFG (guidance.cfg_active on the call's latent input) and rows == 2N -> first N uncond, last
  N cond, with N = n_images or rows // 2; no CFG -> every row is cond of its image; anything else is unlabelled;
- guidance as separate calls (Family.cfg == "separate": Wan, Flux true CFG, Chroma, Qwen-Image, Lumina 2,
  CogView4): the pipeline calls the denoiser
  once per branch and step; which branch a call computes is read from what it is given
  (shapefirst.separate.branch_of: the very prompt_embeds or negative_prompt_embeds tensor of the pipeline
  call), and the step's two calls are one capture call (a step ends when a branch comes again). Under a
  guidance stop the hook runs only some images per call, maybe in two forwards of different branches; their
  rows are read from the run's step layout (shapefirst.separate.StepRows).
Only the rows of the branch `rows` ("cond" or "uncond") are stored per image; an image with no such row in
a call (e.g. unconditional-only calls after a guidance stop) gets NaN there and `complete[call]` is False.
`row_mass[call]` always keeps what ran: every row's token mass, labelled by `row_labels[call]`.

Thresholds: `convergence` binarises a map as map > its mean over pixels (threshold="mean"), or
map > t * max for a float t; F1 = 2|A&B| / (|A|+|B|) against the last kept call (1 if both empty).
"""
from __future__ import annotations

import inspect
import json
import math
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F

from .attention_maths import (CLASSIC_PROCESSORS, PROCESSOR_KINDS, ProcessorWrapper, QueryKeys,  # noqa: F401
                              _unread_text_layers, attention_probs, cross_attention_layers, is_joint_attention,
                              joint_attention_probs, layer_kind, read_layer, text_attention_layers, text_probs,
                              unwrapped)
from .errors import ShapefirstError
from .families import family
from .guidance_hook import run_state_of, session_of
from .pipeline import cfg_active, denoiser_of, latent_input
from .pipeline_call import running_call
from .rows import label_rows
from .results import atomic_write_bytes, atomic_write_text, strict_dumps
from .separate import StepRows, branch_of
from .tokens import TOKEN_CLASSES, TokenInfo

KEEP_CHOICES = ("mean", "per_head", "none")
ROW_CHOICES = ("cond", "uncond")


# -- the image queries' probabilities, per processor -----------------------------------------------------------
def _reading(a_sig: inspect.Signature, original, attn, args: tuple, kwargs: dict) -> dict:
    """The processor call's arguments by name: bound to the original processor's own parameters when they name
    hidden_states, else to AttnProcessor's order (attn, hidden_states, encoder_hidden_states, attention_mask,
    temb); keyword extras included."""
    sig = a_sig if "hidden_states" in a_sig.parameters else _CANONICAL
    bound = sig.bind(original, attn, *args, **kwargs)
    out = {}
    for name, value in bound.arguments.items():
        kind = sig.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            out.update(value)
        elif kind is not inspect.Parameter.VAR_POSITIONAL:
            out[name] = value
    return out


def _canonical(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args,
               **kwargs):  # the parameter order of diffusers' AttnProcessor
    return None


_CANONICAL = inspect.signature(_canonical)


class CaptureProcessor(ProcessorWrapper):
    """Wraps the original processor of one text-attention layer: output from the original (called with exactly the
    arguments it was given), probabilities recomputed on the side and handed to the capture. Made by
    `capture_processor`, whose subclass carries the original's call signature (diffusers' attention modules
    filter the keyword arguments they pass by the processor's signature)."""

    def __init__(self, original, capture: "AttentionCapture", layer: str):
        self.original, self.capture, self.layer = original, capture, layer
        self.signature = inspect.signature(type(original).__call__)

    def _call(self, attn, *args, **kwargs):
        out = self.original(attn, *args, **kwargs)
        if self.capture.n_calls > 0:  # only inside a denoiser call
            with torch.no_grad():
                got = read_layer(attn, self.original, _reading(self.signature, self.original, attn, args, kwargs),
                                 self.capture)
            if got is not None:
                probs, share, spatial = got
                self.capture._record(self.layer, probs, spatial, None if share is None else share.mean(dim=(1, 2)))
        return out


def capture_processor(original, capture: "AttentionCapture", layer: str) -> CaptureProcessor:
    """A CaptureProcessor whose `__call__` has the original processor's signature."""
    def __call__(self, attn, *args, **kwargs):
        return self._call(attn, *args, **kwargs)

    __call__.__signature__ = inspect.signature(type(original).__call__)
    cls = type(f"Capture{type(original).__name__}", (CaptureProcessor,), {"__call__": __call__})
    return cls(original, capture, layer)


# -- the capture ---------------------------------------------------------------------------------------------
class AttentionCapture:
    """What `capture_attention` recorded. Public attributes:
    layers (captured layer names), spatial {layer: (h, w)}, frames {layer: latent frames (1 for images)},
    heads {layer: int}, keep, rows, n_images, n_calls (capture calls: denoising steps),
    maps {(call, layer): [images, pixels, tokens] or [images, heads, pixels, tokens]} (pixels = frames * h * w),
    row_mass [per call: [rows_run, tokens]], row_labels [per call: "cond:0", "uncond:1", "?" per row],
    cond_row [per call: index into row_labels[call] of each image's row of the captured branch, -1 = none]."""

    def __init__(self, keep: str = "mean", rows: str = "cond", calls=None, n_images: int | None = None,
                 pipe=None, denoiser=None, separate=None):
        if keep not in KEEP_CHOICES:
            raise ShapefirstError(f"keep={keep!r} is not one of {KEEP_CHOICES}", "pass 'mean', 'per_head' or 'none'")
        if rows not in ROW_CHOICES:
            raise ShapefirstError(f"rows={rows!r} is not one of {ROW_CHOICES}", "pass 'cond' or 'uncond'")
        self.keep, self.rows, self.n_images = keep, rows, n_images
        self.calls = None if calls is None else {int(c) for c in calls}
        self.pipe, self.denoiser = pipe, denoiser  # only while capturing
        self.separate = separate  # the family (families.Family) of a pipeline that guides in separate calls
        self.layers, self.spatial, self.frames, self.heads, self.maps, self.n_calls = [], {}, {}, {}, {}, 0
        self.row_labels, self.cond_row = [], []  # per call (None until a layer ran in it)
        self._row_sum, self._row_n = [], []  # per call: per row run, its mass summed over layers, and its layers
        self._mass_sum, self._mass_n = [], []  # per call: per image, the captured branch's mass summed, its layers
        self._share_sum, self._share_n = [], []  # per call: joint attention's text share
        self._cfg = []  # per call: did it run CFG (guidance.cfg_active), None = unknown
        self._latent_hw = None  # (h, w) of the denoiser's latent input (its last two dimensions), if 4-D or 5-D
        self._video = False  # the latent input is 5-D (video): a layer's pixels are frames * h * w
        self._token_hw = None  # (h, w) of a packed latent's token grid (Flux: from img_ids)
        self._patch = 1  # a transformer's spatial patch size: its token grid is the latent grid / patch
        self._text_len = None  # the denoiser call's encoder_hidden_states length (Flux's single-stream layers)
        self._module = None  # the denoiser of the current call
        self._step_seen: set = set()  # separate calls: the branches the current step has called
        self._branch, self._plan = None, None  # separate calls: this denoiser call's branch, its forwards' rows
        self._sub, self._sub_layers, self._sub_labels, self._sub_offset = -1, None, None, 0

    # -- recording -----------------------------------------------------------------------
    def _new_call(self, cfg) -> None:
        self.n_calls += 1
        for lst in (self._row_sum, self._row_n, self._mass_sum, self._mass_n, self.row_labels, self.cond_row,
                    self._share_sum, self._share_n):
            lst.append(None)
        self._cfg.append(cfg)

    def _pre_hook(self, module, args, kwargs):
        """Forward pre-hook of a denoiser: one more call (or, for separate calls, the step's next branch);
        remember the latent grid and the text length."""
        sample = latent_input(args, kwargs)
        self._note_grid(module, sample, kwargs)
        ehs = kwargs.get("encoder_hidden_states")
        self._text_len = ehs.shape[1] if isinstance(ehs, torch.Tensor) and ehs.dim() == 3 else None
        self._module, self._sub, self._sub_layers = module, -1, None
        if self.separate is None:
            self._new_call(cfg_active(self.pipe, sample)
                           if self.pipe is not None and isinstance(sample, torch.Tensor) else None)
            return
        self._branch, self._plan = self._branch_of(kwargs), None
        if not self._step_seen or self._branch in self._step_seen:
            self._new_call(None)
            self._step_seen = set()
        self._step_seen.add(self._branch)
        if isinstance(sample, torch.Tensor) and self.n_images is None:
            self.n_images = sample.shape[0]

    def _note_grid(self, module, sample, kwargs) -> None:
        patch = getattr(getattr(module, "config", None), "patch_size", None)
        patch = patch[-1] if isinstance(patch, (tuple, list)) and patch else patch
        self._patch = int(patch) if isinstance(patch, int) and patch > 0 else 1
        self._token_hw = None
        self._latent_hw = None
        if isinstance(sample, torch.Tensor) and sample.ndim in (4, 5):
            self._latent_hw, self._video = tuple(sample.shape[-2:]), sample.ndim == 5
            return
        ids, shapes = kwargs.get("img_ids"), kwargs.get("img_shapes")
        if isinstance(ids, torch.Tensor) and ids.shape[-1] == 3:  # a packed latent (Flux): ids (0, row, col)
            ids = ids.reshape(-1, 3)
            self._token_hw = (int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1)
        elif isinstance(shapes, (list, tuple)) and shapes and isinstance(shapes[0], (list, tuple)):
            first = shapes[0][0] if isinstance(shapes[0][0], (list, tuple)) else shapes[0]  # Qwen: [(frames, h, w)]
            self._token_hw = (int(first[-2]), int(first[-1]))

    def _branch_of(self, kwargs) -> str:
        """Which branch this denoiser call computes (separate.branch_of); "cond" outside a pipeline call."""
        call = running_call()
        if call is None:
            return "cond"
        try:
            return branch_of(self.separate, call, kwargs)
        except ShapefirstError:
            return "?"

    def image_tokens(self) -> int:
        """The image tokens of the denoiser call in progress: its 4-D latent grid / patch (Lumina 2)."""
        if self._latent_hw is None:
            raise ShapefirstError("a joint attention layer needs the image token count, and the denoiser call gave "
                                  "no 4-D latent", "call the denoiser with a 4-D latent sample")
        return (self._latent_hw[0] // self._patch) * (self._latent_hw[1] // self._patch)

    def text_length(self) -> int:
        """The text length of the denoiser call in progress (its encoder_hidden_states), for layers whose input
        is [text; image] already (Flux's single-stream blocks)."""
        if self._text_len is None:
            raise ShapefirstError("a single-stream attention layer ran, but its denoiser call gave no "
                                  "encoder_hidden_states to tell the text length",
                                  "call the denoiser with encoder_hidden_states=... (as its pipeline does)")
        return self._text_len

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

    def _separate_state(self):
        """The RunState of this pipeline call when a guidance schedule runs it (separate calls), else None."""
        session = session_of(self._module) if self._module is not None else None
        call = running_call() if session is not None else None
        st = session.runs.get(id(call.frame)) if call is not None else None
        return st if st is not None and st.frame is call.frame else None

    def _separate_plan(self) -> list[tuple[list[int], str]]:
        """The forwards this denoiser call runs, each (its images, its branch): all images on the call's branch,
        unless a guidance schedule runs only some (shapefirst.separate: the step's first call may compute the
        kept branch for unguided images first, the second only the guided images)."""
        everyone, b = list(range(self.n_images)), self._branch
        st = self._separate_state()
        lay = st.layout if st is not None else None
        if not isinstance(lay, StepRows) or b not in st.step_seen:
            return [(everyone, b)]
        if len(st.step_seen) == 1:  # the step's first call
            if not len(lay.other):
                return [(everyone, b)]
            return [(lay.other.tolist(), lay.kept)] + ([(lay.same.tolist(), b)] if len(lay.same) else [])
        if lay.full:
            return [(everyone, b)]
        return [(lay.guided_rows.tolist(), b)] if len(lay.guided_rows) else []

    def _sub_forward_labels(self, rows: int) -> list[str]:
        """"branch:image" of every row of the forward that starts now."""
        if self.separate is None:
            n, labels = self._labels(rows)
            if self.n_images is None:
                self.n_images = n
            elif n != self.n_images:
                raise ShapefirstError(f"the capture saw {self.n_images} images, then a call with {n}",
                                      "use one capture_attention block per batch size (or pass n_images)")
            return labels
        if self._plan is None:
            self._plan = self._separate_plan()
        if self._sub >= len(self._plan) or len(self._plan[self._sub][0]) != rows:
            return ["?"] * rows
        images, branch = self._plan[self._sub]
        return [f"{branch}:{i}" for i in images]

    def _begin_forward(self, c: int, rows: int, n_tok: int) -> None:
        """A forward of the denoiser starts in call c (every layer runs once per forward): label its rows."""
        self._sub += 1
        self._sub_layers = set()
        labels = self._sub_forward_labels(rows)
        if self.row_labels[c] is None:
            self.row_labels[c], self._row_sum[c], self._row_n[c] = [], torch.zeros(0, n_tok), torch.zeros(0)
        self._sub_offset = len(self.row_labels[c])
        self.row_labels[c] = self.row_labels[c] + labels
        width = max(n_tok, self._row_sum[c].shape[1])  # the branches' texts may differ in length (Qwen-Image)
        self._row_sum[c] = torch.cat([F.pad(self._row_sum[c], (0, width - self._row_sum[c].shape[1])),
                                      torch.zeros(rows, width)])
        self._row_n[c] = torch.cat([self._row_n[c], torch.zeros(rows)])
        pos = {}
        for r, label in enumerate(self.row_labels[c]):
            pos.setdefault(label, r)
        self.cond_row[c] = [pos.get(f"{self.rows}:{i}", -1) for i in range(self.n_images)]
        mine = [(r, int(label.split(":")[1])) for r, label in enumerate(labels) if label.startswith(f"{self.rows}:")]
        self._sub_labels = (torch.tensor([r for r, _ in mine], dtype=torch.long),
                            torch.tensor([i for _, i in mine], dtype=torch.long))

    def _hw(self, pixels: int) -> tuple[int, int, int]:
        """(frames, h, w) of a layer with `pixels` positions: a packed latent's token grid; a transformer's latent
        grid / patch (a video's pixels are its latent frames times that grid); else the latent halved (rounding
        up) until it fits; else a square."""
        if self._token_hw is not None and pixels % (self._token_hw[0] * self._token_hw[1]) == 0:
            return (pixels // (self._token_hw[0] * self._token_hw[1]),) + self._token_hw
        if self._latent_hw is not None:
            h, w = self._latent_hw
            hp, wp = h // self._patch, w // self._patch
            if self._video and hp * wp and pixels % (hp * wp) == 0:
                return pixels // (hp * wp), hp, wp
            if self._patch > 1 and hp * wp == pixels:
                return 1, hp, wp
            while h * w > pixels:
                h, w = -(-h // 2), -(-w // 2)
            if h * w == pixels:
                return 1, h, w
        s = math.isqrt(pixels)
        if s * s != pixels:
            raise ShapefirstError(f"cannot tell the spatial size of a layer with {pixels} pixels",
                                  "call the denoiser with a 4-D latent sample")
        return 1, s, s

    def _record(self, layer: str, probs: torch.Tensor, spatial, share: torch.Tensor | None = None) -> None:
        c = self.n_calls - 1
        rows, heads, pixels, n_tok = probs.shape
        if self._sub_layers is None or layer in self._sub_layers:
            self._begin_forward(c, rows, n_tok)
        self._sub_layers.add(layer)
        if layer not in self.spatial:
            f, h, w = (1,) + tuple(spatial) if spatial else self._hw(pixels)
            self.spatial[layer], self.frames[layer], self.heads[layer] = (h, w), f, heads
        sel, img = self._sub_labels
        row_mass = probs.mean(dim=(1, 2)).cpu()
        self._row_sum[c][self._sub_offset:self._sub_offset + rows, :n_tok] += row_mass
        self._row_n[c][self._sub_offset:self._sub_offset + rows] += 1
        if len(sel):  # the captured branch's rows (their text length is that branch's)
            if self._mass_sum[c] is None:
                self._mass_sum[c], self._mass_n[c] = torch.zeros(self.n_images, n_tok), torch.zeros(self.n_images)
            self._mass_sum[c][img] += row_mass[sel]
            self._mass_n[c][img] += 1
        if share is not None:  # joint attention: [rows] text share of this layer
            if self._share_sum[c] is None:
                self._share_sum[c], self._share_n[c] = torch.zeros(self.n_images), torch.zeros(self.n_images)
            self._share_sum[c][img] += share.cpu()[sel].float()
            self._share_n[c][img] += 1
        if self.keep != "none" and (self.calls is None or c in self.calls):
            kept = probs if self.keep == "per_head" else probs.mean(dim=1)
            full = self.maps.get((c, layer))
            if full is None or (len(sel) and full.shape[-1] != n_tok):  # (a first forward of the other branch)
                full = torch.full((self.n_images,) + tuple(kept.shape[1:]), float("nan"))
            if len(sel):
                full[img] = kept[sel.to(kept.device)].cpu()
            self.maps[(c, layer)] = full

    # -- aggregation ---------------------------------------------------------------------
    @property
    def mass(self) -> torch.Tensor:
        """[calls, images, tokens]: attention mass per token, mean over layers, heads and pixels."""
        n_tok = next((s.shape[-1] for s in self._mass_sum if s is not None), 0)
        n = self.n_images or 0
        if not self.n_calls:
            return torch.zeros(0, n, n_tok)
        out = torch.full((self.n_calls, n, n_tok), float("nan"))
        for c, (s, k) in enumerate(zip(self._mass_sum, self._mass_n)):
            if s is not None:
                ok = k > 0
                out[c, ok] = s[ok] / k[ok].unsqueeze(-1)
        return out

    @property
    def text_share(self) -> torch.Tensor:
        """[calls, images]: joint attention only: the share of the image queries' joint softmax that lands on
        text tokens, mean over layers, heads and pixels (NaN where none was captured)."""
        out = torch.full((self.n_calls, self.n_images or 0), float("nan"))
        for c, (s, k) in enumerate(zip(self._share_sum, self._share_n)):
            if s is not None:
                ok = k > 0
                out[c, ok] = s[ok] / k[ok]
        return out

    @property
    def row_mass(self) -> list[torch.Tensor | None]:
        """Per call: [rows that ran, tokens] mass of every row, labelled by row_labels[call]."""
        return [s if s is None else s / n.clamp_min(1).unsqueeze(-1) for s, n in zip(self._row_sum, self._row_n)]

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
        for info in infos:
            if len(info.ids) != mass.shape[-1]:
                raise ShapefirstError(f"a TokenInfo of {len(info.ids)} positions for a capture of {mass.shape[-1]} "
                                      "text tokens", "pass tokens.denoiser_token_info(pipe, prompt) of the "
                                      "pipeline's call (same max_sequence_length)")
        return {cls: torch.stack([mass[:, i][:, info.class_mask(cls)].sum(-1) for i, info in enumerate(infos)], 1)
                for cls in TOKEN_CLASSES}

    def kept_calls(self) -> list[int]:
        return sorted({c for c, _ in self.maps})

    def token_maps(self, call: int, frame: int | None = None) -> torch.Tensor:
        """[images, tokens, h, w]: each layer's map (head mean; a video layer's mean over its latent frames, or
        its latent frame `frame`) resized bilinearly to the largest layer resolution, then averaged over layers."""
        layers = [layer for layer in self.layers if (call, layer) in self.maps]
        if not layers:
            raise ShapefirstError(f"no per-pixel maps were kept for call {call}",
                                  "capture with keep='mean' or 'per_head' and include this call in `calls`")
        size = max((self.spatial[layer] for layer in layers), key=lambda s: s[0] * s[1])
        acc = 0
        for layer in layers:
            m = self.maps[(call, layer)]
            m = m.mean(dim=1) if m.ndim == 4 else m
            (h, w), f = self.spatial[layer], self.frames.get(layer, 1)
            if frame is not None and not 0 <= frame < f:
                raise ShapefirstError(f"latent frame {frame} of layer {layer}, which has {f}",
                                      f"pass frame between 0 and {f - 1}, or None for the mean over frames")
            m = m.reshape(m.shape[0], f, h, w, -1)
            m = m.mean(dim=1) if frame is None else m[:, frame]
            acc = acc + F.interpolate(m.permute(0, 3, 1, 2), size=size, mode="bilinear", align_corners=False)
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
        if any(s is not None for s in self._share_sum):
            t["text_share"] = self.text_share.contiguous()
        meta = {"keep": self.keep, "rows": self.rows, "n_images": self.n_images, "n_calls": self.n_calls,
                "layers": self.layers, "spatial": self.spatial, "frames": self.frames, "heads": self.heads,
                "row_labels": self.row_labels, "calls": sorted(self.calls) if self.calls is not None else None}
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
        cap.frames = {k: int(v) for k, v in meta.get("frames", {}).items()} or {k: 1 for k in cap.spatial}
        ones = torch.ones(cap.n_images or 0)
        cap._mass_sum, cap._mass_n = list(t["mass"]), [ones.clone() for _ in range(cap.n_calls)]
        cap._row_sum = [t.get(f"row_mass.{c}") for c in range(cap.n_calls)]
        cap._row_n = [None if r is None else torch.ones(r.shape[0]) for r in cap._row_sum]
        share = t.get("text_share")
        cap._share_sum = list(share) if share is not None else [None] * cap.n_calls
        cap._share_n = [ones.clone() for _ in range(cap.n_calls)] if share is not None else [None] * cap.n_calls
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


def _denoisers(pipe) -> list[tuple[str, torch.nn.Module]]:
    """(prefix, module) of every denoiser to capture: a bare module; else the family's declared denoisers that the
    pipeline has (families.Family.denoisers; the first one's layers keep their names, the others are prefixed)."""
    if isinstance(pipe, torch.nn.Module):
        return [("", pipe)]
    mods, seen = [], set()
    for i, attr in enumerate(family(pipe).denoisers):
        mod = getattr(pipe, attr, None)
        if isinstance(mod, torch.nn.Module) and id(mod) not in seen:
            seen.add(id(mod))
            mods.append(("" if not mods else f"{attr}.", mod))
    return mods or [("", denoiser_of(pipe))]


def _layers_of(pipe, kind: str | None) -> dict[str, tuple[torch.nn.Module, str]]:
    """{captured layer name: (its denoiser, its module name)} of `kind` in every denoiser (see _denoisers)."""
    out = {}
    for prefix, den in _denoisers(pipe):
        if not any(hasattr(m, "set_processor") for m in den.modules()):
            raise ShapefirstError(f"{type(den).__name__} has no attention processors",
                                  "pass a supported pipeline or its denoiser (UNet or transformer)")
        for name in text_attention_layers(den, kind):
            out[prefix + name] = (den, name)
        unread = _unread_text_layers(den)
        if unread:
            raise ShapefirstError(f"attention capture does not read the processors of {type(den).__name__}'s text "
                                  f"layers: {', '.join(unread[:3])}", "capture a pipeline whose text layers run a "
                                  "processor of attention.PROCESSOR_KINDS or CLASSIC_PROCESSORS (a replaced one: put "
                                  "its default back)")
    return out


@contextmanager
def capture_attention(pipe, keep: str = "mean", layers=None, calls=None, rows: str = "cond",
                      n_images: int | None = None):
    """`with capture_attention(pipe) as cap: generate(pipe, ...)` -> cap.mass, cap.token_maps(call), ...

    keep: "mean" (head-mean maps [images, pixels, tokens] per call and layer), "per_head"
    ([images, heads, pixels, tokens]) or "none" (only the token mass). layers: names of
    text-attention layers to capture (default all of the family's kind: families.Family.attention). calls:
    capture call indices (0-based, counted inside this block: one per denoising step) whose maps are kept
    (default all; the mass is kept for every call). rows: the CFG branch stored per image. n_images: the
    batch size when it cannot be inferred. The original processors (the same objects) are back on exit, also
    after an exception."""
    fam = None if isinstance(pipe, torch.nn.Module) else family(pipe)  # a clear "not supported" error otherwise
    available = _layers_of(pipe, None if fam is None else fam.attention)
    chosen = list(available) if layers is None else [name[:-len(".processor")] if name.endswith(".processor")
                                                     else name for name in layers]
    if not available:  # e.g. LTX-Video's attn2 runs its own processor, not a classic one and not a mirrored one
        dens = ", ".join(type(den).__name__ for _, den in _denoisers(pipe))
        raise ShapefirstError(f"attention capture finds no text-attention layer it can read in {dens}",
                              "capture a pipeline of the families README's table marks for attention capture")
    unknown = sorted(set(chosen) - set(available))
    if unknown or not chosen:
        kind = "text-attention" if fam is None else f"{fam.attention}-attention"
        raise ShapefirstError(f"not {kind} layers: {unknown or 'none chosen'}",
                              f"pick from the {len(available)} names of text_attention_layers(denoiser)")
    dens = [den for _, den in _denoisers(pipe)]
    cap = AttentionCapture(keep, rows, calls, n_images, pipe=None if fam is None else pipe, denoiser=dens[0],
                           separate=fam if fam is not None and fam.cfg == "separate" else None)
    cap.layers = list(chosen)
    modules = [available[name][0].get_submodule(available[name][1]) for name in chosen]
    originals = [mod.processor for mod in modules]
    handles = []
    try:
        for name, mod, original in zip(chosen, modules, originals):
            mod.set_processor(capture_processor(original, cap, name))
        for den in dens:
            handles.append(den.register_forward_pre_hook(cap._pre_hook, with_kwargs=True))
        yield cap
    finally:
        for h in handles:
            h.remove()
        for mod, original in zip(modules, originals):
            mod.set_processor(original)
        cap.pipe = cap.denoiser = cap._module = None
