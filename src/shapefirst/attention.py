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
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers.models.attention import AttentionModuleMixin
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_qwenimage import apply_rotary_emb_qwen

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
def attention_probs(attn, hidden_states, encoder_hidden_states, attention_mask=None, temb=None, scale=None):
    """softmax(q k^T * scale) of one diffusers `Attention` call, float32 [rows, heads, pixels, tokens],
    and the spatial size (h, w) when the input is 4-D (else None). Same steps as AttnProcessor:
    spatial_norm, 4-D reshape, group_norm, to_q, norm_cross, to_k, per-head split, norm_q/norm_k,
    mask added to the scores. scale defaults to attn.scale."""
    q, k, mask, spatial = _classic_qk(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
    scores = (q.float() @ k.float().transpose(-1, -2)) * float(attn.scale if scale is None else scale)
    if mask is not None:
        scores = scores + mask.float()
    return scores.softmax(dim=-1), spatial


def _classic_qk(attn, hidden_states, encoder_hidden_states, attention_mask=None, temb=None):
    """AttnProcessor's steps up to the scores: (q, k [rows, heads, n, d], the mask as the processor adds it
    [rows, heads, 1 or n, keys] or None, the spatial size of a 4-D input or None)."""
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
    mask = None
    if attention_mask is not None:
        m = attn.prepare_attention_mask(attention_mask, n_tok, b)
        mask = m.view(b, heads, -1, m.shape[-1])
    return q, k, mask, spatial


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


@dataclass
class QueryKeys:
    """What an attention layer's image queries attend over, as its processor computes it before the softmax:
    q [rows, heads, image queries, d], k [rows, heads, keys, d] (every key of the queries' softmax, in the
    processor's order), `text` the text keys among them, `mask` the additive bias the processor adds (broadcast
    to [rows, heads, queries, keys]; None if none), `scale` the softmax scale."""

    q: torch.Tensor
    k: torch.Tensor
    text: slice
    mask: torch.Tensor | None
    scale: float


def text_probs(qk: QueryKeys, chunk_elements: int = 2 ** 25) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 ([rows, heads, queries, text keys] probabilities on the text keys renormalised to sum 1,
    [rows, heads, queries] share of the softmax on the text keys), computed in chunks of queries."""
    q, k = qk.q.float(), qk.k.float()
    b, heads, n, _ = q.shape
    mask = None if qk.mask is None else qk.mask.float()
    step = max(1, chunk_elements // max(1, b * heads * k.shape[2]))
    probs, shares = [], []
    for i in range(0, n, step):
        scores = (q[:, :, i:i + step] @ k.transpose(-1, -2)) * qk.scale
        if mask is not None:
            scores = scores + (mask[:, :, i:i + step] if mask.dim() == 4 and mask.shape[2] == n else mask)
        txt = scores.softmax(dim=-1)[..., qk.text]
        share = txt.sum(-1)
        probs.append(txt / share.unsqueeze(-1))
        shares.append(share)
    return torch.cat(probs, dim=2), torch.cat(shares, dim=2)


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[rows, n, heads * d] -> [rows, heads, n, d]."""
    return x.unflatten(-1, (heads, -1)).transpose(1, 2)


def _additive(mask, attn, keys: int, rows: int):
    """A processor's attention mask as an additive bias [rows, heads or 1, 1 or queries, keys] (a bool mask:
    False -> -inf), or None. A classic `Attention` prepares it as its processors do."""
    if mask is None:
        return None
    if isinstance(attn, Attention) and mask.dim() < 4:
        m = attn.prepare_attention_mask(mask, keys, rows)
        m = m.view(rows, attn.heads, -1, m.shape[-1])
    else:
        m = mask.view(rows, 1, 1, -1) if mask.dim() == 2 else mask
    if m.dtype == torch.bool:
        m = torch.zeros(m.shape, device=m.device).masked_fill(~m, float("-inf"))
    return m


def _queries(mask, start: int):
    """The rows of an additive mask that belong to the queries from `start` on (a mask with one row is shared)."""
    return mask if mask is None or mask.dim() < 4 or mask.shape[2] == 1 else mask[:, :, start:]


def _hunyuan_qk(attn, a: dict, cap) -> QueryKeys:
    """HunyuanAttnProcessor2_0: AttnProcessor's steps, then the image RoPE on the query (and on the key of a
    self-attention layer); SDPA's scale."""
    q, k, mask, _ = _classic_qk(attn, a["hidden_states"], a.get("encoder_hidden_states"), a.get("attention_mask"),
                                a.get("temb"))
    rope = a.get("image_rotary_emb")
    if rope is not None:
        q = apply_rotary_emb(q, rope)
        if not attn.is_cross_attention:
            k = apply_rotary_emb(k, rope)
    return QueryKeys(q, k, slice(0, k.shape[2]), mask, q.shape[-1] ** -0.5)


def _sana_qk(attn, a: dict, cap) -> QueryKeys:
    """SanaAttnProcessor2_0: to_q / to_k, norm_q / norm_k over all heads BEFORE the head split, the encoder mask
    prepared as the processor does; SDPA's scale."""
    x, ctx = a["hidden_states"], a.get("encoder_hidden_states")
    ctx = x if ctx is None else ctx
    q, k = attn.to_q(x), attn.to_k(ctx)
    if attn.norm_q is not None:
        q = attn.norm_q(q)
    if attn.norm_k is not None:
        k = attn.norm_k(k)
    q, k = _heads(q, attn.heads), _heads(k, attn.heads)
    mask = _additive(a.get("attention_mask"), attn, ctx.shape[1], x.shape[0])
    return QueryKeys(q, k, slice(0, k.shape[2]), mask, q.shape[-1] ** -0.5)


def _wan_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """WanAttnProcessor's rotary embedding on [rows, n, heads, d] (interleaved pairs)."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    c, s = cos[..., 0::2], sin[..., 1::2]
    return torch.stack([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1).flatten(-2).type_as(x)


def _wan_qk(attn, a: dict, cap) -> QueryKeys:
    """WanAttnProcessor on a cross-attention layer: an image-to-video layer (add_k_proj) keeps its image context
    (the first positions) for a separate softmax, the text is the rest (the processor's own split: the last 512
    positions); to_q / to_k (to_kv when fused), norm_q / norm_k over all heads, then the head split; SDPA's scale."""
    x, ctx = a["hidden_states"], a["encoder_hidden_states"]
    if attn.add_k_proj is not None:
        ctx = ctx[:, ctx.shape[1] - 512:]
    q = attn.to_q(x)
    k = attn.to_kv(ctx).chunk(2, dim=-1)[0] if getattr(attn, "fused_projections", False) else attn.to_k(ctx)
    q, k = attn.norm_q(q).unflatten(2, (attn.heads, -1)), attn.norm_k(k).unflatten(2, (attn.heads, -1))
    rope = a.get("rotary_emb")
    if rope is not None:
        q, k = _wan_rope(q, *rope), _wan_rope(k, *rope)
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    mask = _additive(a.get("attention_mask"), attn, k.shape[2], x.shape[0])
    return QueryKeys(q, k, slice(0, k.shape[2]), mask, q.shape[-1] ** -0.5)


def _flux_qk(attn, a: dict, cap) -> QueryKeys:
    """FluxAttnProcessor. Double-stream layer (encoder_hidden_states given): image q/k from to_q / to_k, text
    q/k from add_q_proj / add_k_proj (to_qkv / to_added_qkv when fused), per-head RMS norms, the sequence
    [text; image] rotated by image_rotary_emb. Single-stream layer: its input is [text; image] already, the text
    length is the denoiser call's. SDPA's scale."""
    x, ctx, rope = a["hidden_states"], a.get("encoder_hidden_states"), a.get("image_rotary_emb")
    fused = getattr(attn, "fused_projections", False)
    q, k = attn.to_qkv(x).chunk(3, dim=-1)[:2] if fused else (attn.to_q(x), attn.to_k(x))
    q = attn.norm_q(q.unflatten(-1, (-1, attn.head_dim)))
    k = attn.norm_k(k.unflatten(-1, (-1, attn.head_dim)))
    if ctx is not None and attn.added_kv_proj_dim is not None:
        eq, ek = (attn.to_added_qkv(ctx).chunk(3, dim=-1)[:2] if fused and hasattr(attn, "to_added_qkv")
                  else (attn.add_q_proj(ctx), attn.add_k_proj(ctx)))
        eq = attn.norm_added_q(eq.unflatten(-1, (-1, attn.head_dim)))
        ek = attn.norm_added_k(ek.unflatten(-1, (-1, attn.head_dim)))
        q, k, n_txt = torch.cat([eq, q], dim=1), torch.cat([ek, k], dim=1), ctx.shape[1]
    else:
        n_txt = cap.text_length()
    if rope is not None:
        q = apply_rotary_emb(q, rope, sequence_dim=1)
        k = apply_rotary_emb(k, rope, sequence_dim=1)
    q, k = q[:, n_txt:].transpose(1, 2), k.transpose(1, 2)
    mask = _queries(_additive(a.get("attention_mask"), attn, k.shape[2], x.shape[0]), n_txt)
    return QueryKeys(q, k, slice(0, n_txt), mask, attn.head_dim ** -0.5)


def _cogvideox_qk(attn, a: dict, cap) -> QueryKeys:
    """CogVideoXAttnProcessor2_0: [text; video] concatenated, to_q / to_k, per-head norm_q / norm_k, the RoPE on
    the video part (of the key too unless cross-attention), the mask prepared as the processor does; SDPA's
    scale."""
    ctx = a["encoder_hidden_states"]
    n_txt = ctx.shape[1]
    x = torch.cat([ctx, a["hidden_states"]], dim=1)
    q, k = _heads(attn.to_q(x), attn.heads), _heads(attn.to_k(x), attn.heads)
    if attn.norm_q is not None:
        q = attn.norm_q(q)
    if attn.norm_k is not None:
        k = attn.norm_k(k)
    q = q[:, :, n_txt:]
    rope = a.get("image_rotary_emb")
    if rope is not None:
        q = apply_rotary_emb(q, rope)
        if not attn.is_cross_attention:
            k = torch.cat([k[:, :, :n_txt], apply_rotary_emb(k[:, :, n_txt:], rope)], dim=2)
    mask = _queries(_additive(a.get("attention_mask"), attn, x.shape[1], x.shape[0]), n_txt)
    return QueryKeys(q, k, slice(0, n_txt), mask, q.shape[-1] ** -0.5)


def _qwen_qk(attn, a: dict, cap) -> QueryKeys:
    """QwenDoubleStreamAttnProcessor2_0: image q/k from to_q / to_k, text k from add_k_proj, per-head norms, each
    stream rotated by its own frequencies (image_rotary_emb = (image, text)), keys [text; image], the text mask
    (encoder_hidden_states_mask) on the text keys; SDPA's scale."""
    x, ctx, rope = a["hidden_states"], a["encoder_hidden_states"], a.get("image_rotary_emb")
    d = attn.inner_dim // attn.heads
    q, k, ek = (t.unflatten(-1, (-1, d)) for t in (attn.to_q(x), attn.to_k(x), attn.add_k_proj(ctx)))
    if attn.norm_q is not None:
        q = attn.norm_q(q)
    if attn.norm_k is not None:
        k = attn.norm_k(k)
    if attn.norm_added_k is not None:
        ek = attn.norm_added_k(ek)
    if rope is not None:
        img_freqs, txt_freqs = rope
        q, k = apply_rotary_emb_qwen(q, img_freqs, use_real=False), apply_rotary_emb_qwen(k, img_freqs, use_real=False)
        ek = apply_rotary_emb_qwen(ek, txt_freqs, use_real=False)
    k = torch.cat([ek, k], dim=1)
    mask = a.get("encoder_hidden_states_mask")
    if mask is not None:
        mask = torch.cat([mask.bool(), torch.ones(x.shape[:2], dtype=torch.bool, device=mask.device)], dim=1)
    return QueryKeys(q.transpose(1, 2), k.transpose(1, 2), slice(0, ctx.shape[1]),
                     _additive(mask, attn, k.shape[1], x.shape[0]), d ** -0.5)


def _cogview4_qk(attn, a: dict, cap) -> QueryKeys:
    """CogView4AttnProcessor: [text; image] concatenated, to_q / to_k, per-head norms, the image RoPE (halves
    layout), and its text mask as the processor builds it (a 0/1 FLOAT mask that SDPA adds to the scores)."""
    ctx, x = a["encoder_hidden_states"], a["hidden_states"]
    n_txt = ctx.shape[1]
    h = torch.cat([ctx, x], dim=1)
    q, k = attn.to_q(h).unflatten(2, (attn.heads, -1)).transpose(1, 2), attn.to_k(h).unflatten(
        2, (attn.heads, -1)).transpose(1, 2)
    if attn.norm_q is not None:
        q = attn.norm_q(q)
    if attn.norm_k is not None:
        k = attn.norm_k(k)
    q = q[:, :, n_txt:]
    rope = a.get("image_rotary_emb")
    if rope is not None:
        q = apply_rotary_emb(q, rope, use_real_unbind_dim=-2)
        k = torch.cat([k[:, :, :n_txt], apply_rotary_emb(k[:, :, n_txt:], rope, use_real_unbind_dim=-2)], dim=2)
    mask = a.get("attention_mask")
    if mask is not None:  # image query rows of (mix mix^T > 0): the key mask itself, as 0/1 added to the scores
        mix = torch.ones(h.shape[:2], device=q.device)
        mix[:, :n_txt] = mask.float().to(q.device)
        mask = (mix > 0).to(q.dtype)[:, None, None, :]
    return QueryKeys(q, k, slice(0, n_txt), mask, q.shape[-1] ** -0.5)


def _lumina2_probs(attn, a: dict, cap) -> tuple[torch.Tensor, torch.Tensor]:
    """Lumina2AttnProcessor2_0 on a joint layer: row i's sequence is its L_i unmasked caption positions, then the image
    tokens (Lumina2Transformer2DModel packs them so), padded to the batch's longest with a mask (L_i: the mask's
    length minus the image tokens). to_q / to_k with grouped key heads, per-head norms, the complex RoPE, the scale
    attn.scale (times sqrt(log_base(length)) with base_sequence_length). Probabilities on the caption's positions
    (0 on its padding, which is not in the sequence) [rows, heads, image tokens, caption length]."""
    x, ctx = a["hidden_states"], a["encoder_hidden_states"]
    b, s, _ = x.shape
    q, k = attn.to_q(x), attn.to_k(ctx)
    d = q.shape[-1] // attn.heads
    q, k = q.view(b, -1, attn.heads, d), k.view(b, -1, k.shape[-1] // d, d)
    if attn.norm_q is not None:
        q = attn.norm_q(q)
    if attn.norm_k is not None:
        k = attn.norm_k(k)
    rope = a.get("image_rotary_emb")
    if rope is not None:
        q, k = apply_rotary_emb(q, rope, use_real=False), apply_rotary_emb(k, rope, use_real=False)
    base = a.get("base_sequence_length")
    scale = math.sqrt(math.log(s, base)) * attn.scale if base is not None else attn.scale
    k = k.unsqueeze(3).repeat(1, 1, 1, attn.heads // k.shape[2], 1).flatten(2, 3)
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    joint = a.get("attention_mask")  # True on row i's L_i + image tokens, or None when every row has them all
    mask = _additive(joint, attn, s, b)
    n_cap, n_img = cap.text_length(), cap.image_tokens()
    lengths = [s - n_img] * b if joint is None else (joint.reshape(b, -1).sum(-1) - n_img).tolist()
    probs = q.new_zeros((b, attn.heads, n_img, n_cap), dtype=torch.float32)
    share = q.new_zeros((b, attn.heads, n_img), dtype=torch.float32)
    for i, n in enumerate(lengths):
        qk = QueryKeys(q[i:i + 1, :, n:n + n_img], k[i:i + 1], slice(0, n),
                       None if mask is None else mask[i:i + 1], scale)
        probs[i, :, :, :n], share[i] = (t[0] for t in text_probs(qk))
    return probs, share


def _lumina2_joint(name: str) -> bool:
    """Lumina 2's joint layers are `layers.*`; its context refiner (text alone) and noise refiner (image alone) run
    the same processor."""
    return not name.split(".")[0].endswith("refiner")


# processor class name -> (the kind of text attention it computes, what its image queries attend over: QueryKeys or
# the (probabilities, text share) themselves, which of its layers attend to text by name or None: all)
PROCESSOR_KINDS = {
    "WanAttnProcessor": ("cross", _wan_qk, None),
    "HunyuanAttnProcessor2_0": ("cross", _hunyuan_qk, None),
    "SanaAttnProcessor2_0": ("cross", _sana_qk, None),
    "FluxAttnProcessor": ("joint", _flux_qk, None),
    "CogVideoXAttnProcessor2_0": ("joint", _cogvideox_qk, None),
    "QwenDoubleStreamAttnProcessor2_0": ("joint", _qwen_qk, None),
    "CogView4AttnProcessor": ("joint", _cogview4_qk, None),
    "Lumina2AttnProcessor2_0": ("joint", _lumina2_probs, _lumina2_joint),
}


# -- which layers, and how each is read ------------------------------------------------------------------------
# processors of diffusers' classic `Attention` that compute AttnProcessor's queries and keys (or SD3's joint ones):
# read with attention_probs / joint_attention_probs (IP-Adapter's: its text part)
CLASSIC_PROCESSORS = frozenset({
    "AttnProcessor", "AttnProcessor2_0", "AttnProcessorNPU", "XFormersAttnProcessor", "SlicedAttnProcessor",
    "FusedAttnProcessor2_0", "XLAFlashAttnProcessor2_0", "IPAdapterAttnProcessor", "IPAdapterAttnProcessor2_0",
    "IPAdapterXFormersAttnProcessor", "JointAttnProcessor2_0", "FusedJointAttnProcessor2_0",
    "XFormersJointAttnProcessor", "KVSubstituteProcessor"})


def layer_kind(module, name: str = "") -> str | None:
    """"cross", "joint" or None (not a text-attention layer shapefirst reads) for one attention module named `name`:
    its processor's entry in PROCESSOR_KINDS (a "cross" processor on a self-attention layer is None, a layer its
    name rule leaves out too), else for a classic diffusers `Attention` its structure (is_cross_attention; SD3's
    add_k_proj: joint)."""
    proc = unwrapped(getattr(module, "processor", None))
    listed = PROCESSOR_KINDS.get(type(proc).__name__)
    if listed is not None:
        if listed[2] is not None and not listed[2](name):
            return None
        return listed[0] if listed[0] == "joint" or getattr(module, "is_cross_attention", False) else None
    if isinstance(module, Attention) and type(proc).__name__ in CLASSIC_PROCESSORS:
        return "cross" if module.is_cross_attention else "joint" if is_joint_attention(module) else None
    return None


def _unread_text_layers(denoiser) -> list[str]:
    """Attention modules that attend to text (a cross-attention layer, or a layer with text projections) through a
    processor shapefirst cannot read (neither in PROCESSOR_KINDS nor, on a classic `Attention`, in
    CLASSIC_PROCESSORS)."""
    out = []
    for name, mod in denoiser.named_modules():
        proc = type(unwrapped(getattr(mod, "processor", None))).__name__
        if not isinstance(mod, (Attention, AttentionModuleMixin)) or proc in PROCESSOR_KINDS:
            continue
        if isinstance(mod, Attention) and proc in CLASSIC_PROCESSORS:
            continue
        if getattr(mod, "is_cross_attention", False) or getattr(mod, "add_k_proj", None) is not None:
            out.append(f"{name} ({proc})")
    return out


def text_attention_layers(denoiser, kind: str | None = None) -> list[str]:
    """Names (without ".processor") of the denoiser's text-attention modules of `kind` ("cross" or "joint"; None:
    both), in module order (see layer_kind)."""
    return [name for name, mod in denoiser.named_modules()
            if (k := layer_kind(mod, name)) is not None and (kind is None or k == kind)]


def cross_attention_layers(unet) -> list[str]:
    """Names (without ".processor") of the denoiser's text-attention modules, cross and joint (text_attention_layers
    with no kind: what a bare denoiser module is captured on)."""
    return text_attention_layers(unet)


def read_layer(attn, original, a: dict, cap) -> tuple[torch.Tensor, torch.Tensor | None, tuple | None] | None:
    """(probabilities [rows, heads, queries, text tokens], text share [rows, heads, queries] for joint attention
    else None, the spatial size of a 4-D input or None) of one processor call with the named arguments `a`, or
    None when the call attends to no text (a joint layer called without it)."""
    original = unwrapped(original)
    listed = PROCESSOR_KINDS.get(type(original).__name__)
    if listed is not None:
        got = listed[1](attn, a, cap)
        probs, share = text_probs(got) if isinstance(got, QueryKeys) else got
        return probs, share if listed[0] == "joint" else None, None
    x, ctx = a["hidden_states"], a.get("encoder_hidden_states")
    if is_joint_attention(attn):
        if ctx is None:
            return None
        return (*joint_attention_probs(attn, x, ctx), None)
    sdpa = isinstance(original, AttnProcessor2_0)  # SDPA's scale is 1/sqrt(head_dim), not attn.scale
    scale = (attn.to_k.out_features // attn.heads) ** -0.5 if sdpa else None
    probs, spatial = attention_probs(attn, x, ctx, a.get("attention_mask"), a.get("temb"), scale)
    return probs, None, spatial


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


class CaptureProcessor:
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


def unwrapped(processor):
    """The processor a capture wraps (through nested captures), or the processor itself."""
    while isinstance(processor, CaptureProcessor):
        processor = processor.original
    return processor


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
