"""The maths of diffusers' attention processors, mirrored: how each processor turns a layer's inputs into the
image queries' attention probabilities over the text keys (shapefirst.attention captures them).

One reader per processor kind (PROCESSOR_KINDS: Wan, Flux and Chroma, CogVideoX and CogView3Plus, Qwen-Image,
CogView4, Lumina 2, Sana, HunyuanDiT; CLASSIC_PROCESSORS: the classic `Attention` of SD, SDXL, PixArt, SD3), each
tested by reproducing the processor's own output from what it reads (tests/test_family_analyses.py). A layer whose
processor is not mirrored is refused, never read with the wrong maths."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from diffusers.models.attention import AttentionModuleMixin
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_qwenimage import apply_rotary_emb_qwen



class ProcessorWrapper:
    """A processor that wraps another (shapefirst.attention's capture): `original` is the wrapped one."""

    original = None


def unwrapped(processor):
    """The processor a capture wraps (through nested captures), or the processor itself."""
    while isinstance(processor, ProcessorWrapper):
        processor = processor.original
    return processor


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
    heads = attn.heads
    q, k = _normed_heads(attn, attn.to_q(x), attn.to_k(ctx), b)
    mask = None
    if attention_mask is not None:
        m = attn.prepare_attention_mask(attention_mask, n_tok, b)
        mask = m.view(b, heads, -1, m.shape[-1])
    return q, k, mask, spatial


def _normed_heads(attn, q, k, b: int):
    """Projected queries and keys [b, tokens, heads * d] -> [b, heads, tokens, d], with norm_q / norm_k where the
    module has them (the processors' steps)."""
    d = k.shape[-1] // attn.heads
    q = q.view(b, -1, attn.heads, d).transpose(1, 2)
    k = k.view(b, -1, attn.heads, d).transpose(1, 2)
    if getattr(attn, "norm_q", None) is not None:
        q = attn.norm_q(q)
    if getattr(attn, "norm_k", None) is not None:
        k = attn.norm_k(k)
    return q, k


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
    q, k = _normed_heads(attn, attn.to_q(x), attn.to_k(x), b)
    d = k.shape[-1]
    ek = attn.add_k_proj(ctx).view(b, -1, heads, d).transpose(1, 2)
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


def _joint_heads(attn, x: torch.Tensor, n_txt: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The heads of a [text; image] sequence as CogVideoX's and CogView4's processors make them: to_q / to_k, their
    per-head norms; the image queries [B, heads, image, d] and every key [B, heads, text + image, d]."""
    q, k = _heads(attn.to_q(x), attn.heads), _heads(attn.to_k(x), attn.heads)
    if attn.norm_q is not None:
        q = attn.norm_q(q)
    if attn.norm_k is not None:
        k = attn.norm_k(k)
    return q[:, :, n_txt:], k


def _cogvideox_qk(attn, a: dict, cap) -> QueryKeys:
    """CogVideoXAttnProcessor2_0: [text; video] concatenated, to_q / to_k, per-head norm_q / norm_k, the RoPE on
    the video part (of the key too unless cross-attention), the mask prepared as the processor does; SDPA's
    scale."""
    n_txt = a["encoder_hidden_states"].shape[1]
    x = torch.cat([a["encoder_hidden_states"], a["hidden_states"]], dim=1)
    q, k = _joint_heads(attn, x, n_txt)
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
    q, k = _joint_heads(attn, h, n_txt)
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
