"""Interventions on the text a denoiser sees, beside attention capture (shapefirst.attention): each changes what
the conditional rows get and nothing else, and finds those rows with the one row-labelling rule
(shapefirst.rows.row_images).

- embedding edits (a prompt's [N, L, D] text embeddings, before the pipeline call): `keep_first_eos` keeps the
  first n tokens of the [EOS] block and zeroes (or pads) the rest; `replace_class` zeroes (or noises) the positions
  of token classes (shapefirst.tokens: sos, semantic, eos, eos_pad, pad);
- the [EOS] switch (`eos_switch`): from a denoising step on, the conditional rows' text embeddings become others.
  Batched CFG: a torch forward pre-hook on the denoiser (it sees the pipeline's whole CFG batch, before
  shapefirst's guidance hook). Guidance as separate calls (Family.cfg "separate": Wan, Flux): the pipeline's own
  step-end callback returns the new `prompt_embeds` at the end of the step before (from step 0: the new
  embeddings are the call's prompt_embeds), so every later conditional call is given them by the pipeline itself
  and shapefirst.separate still tells the branches apart (by identity); pass `switch.call_kwargs` to the pipeline
  call (the context says so in one line if they were not passed);
- K/V substitution (`kv_substitution`): the keys and/or values of the cross-attention layers are computed from
  another context for the conditional rows (attention processors, set with `set_attn_processor` and restored on
  exit, also after an exception; fused QKV projections refused; diffusers' classic `Attention` cross-attention
  layers only: SD, SDXL, PixArt)."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable

import torch
from diffusers.models.attention_processor import Attention

from .errors import ShapefirstError
from .families import family
from .guidance_hook import run_state_of
from .pipeline import EMBEDDING_FAMILIES, denoiser_of, require_embeddings  # noqa: F401 (public here too)
from .rows import row_images
from .tokens import TokenInfo, check_embedding, require_eos

KV_MODES = ("keys", "values", "both")


def keep_first_eos(emb: torch.Tensor, info: TokenInfo, n: int, fill: str = "zero",
                   pad_of: torch.Tensor | None = None) -> torch.Tensor:
    """Keep the first n positions of the [EOS] block (eos, then eos_pad/pad), replace the rest.

    Positions eos..eos+n-1 are kept, positions eos+n..L-1 are replaced (n=0 replaces the whole
    block, the first EOS included). fill="zero": by zeros. fill="pad_of": by the same positions
    of the tensor `pad_of` ([B or 1, L, D], e.g. the embedding of an empty prompt)."""
    check_embedding(emb, info)
    if n < 0:
        raise ShapefirstError(f"n={n} is negative", "pass n >= 0")
    start = min(require_eos(info, "") + n, emb.shape[1])
    out = emb.clone()
    if fill == "zero":
        out[:, start:] = 0
    elif fill == "pad_of":
        if pad_of is None or pad_of.dim() != 3 or pad_of.shape[1:] != emb.shape[1:]:
            raise ShapefirstError("fill='pad_of' needs pad_of of shape [B or 1, L, D] like emb",
                                  "pass pad_of=<reference prompt embedding>")
        out[:, start:] = pad_of.to(device=emb.device, dtype=emb.dtype)[:, start:]
    else:
        raise ShapefirstError(f"unknown fill {fill!r}", "use 'zero' or 'pad_of'")
    return out


def replace_class(emb: torch.Tensor, info: TokenInfo, cls_set: str | Iterable[str], how: str = "zero",
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Replace the positions of the given classes by zeros (how="zero") or by Gaussian noise
    rescaled to each original vector's L2 norm (how="noise", per row and position)."""
    check_embedding(emb, info)
    classes = {cls_set} if isinstance(cls_set, str) else set(cls_set)
    pos = sorted(p for c in classes for p in info.positions(c))
    out = emb.clone()
    if not pos:
        return out
    idx = torch.tensor(pos, device=emb.device)
    if how == "zero":
        out[:, idx] = 0
    elif how == "noise":
        orig = emb[:, idx].float()
        gen_device = generator.device if generator is not None else emb.device
        noise = torch.randn(orig.shape, generator=generator, device=gen_device).to(emb.device)
        noise = noise / noise.norm(dim=-1, keepdim=True).clamp_min(1e-12) * orig.norm(dim=-1, keepdim=True)
        out[:, idx] = noise.to(emb.dtype)
    else:
        raise ShapefirstError(f"unknown how {how!r}", "use 'zero' or 'noise'")
    return out


# -- families -------------------------------------------------------------------------------------


class EosSwitch:
    """Forward pre-hook of the denoiser: from call `from_call` on, the conditional rows of
    `encoder_hidden_states` become `cond` ([N, L, D]). Rows: 2N = CFG [uncond, cond] (the second
    half is replaced); N = no CFG (every row). `call` counts the denoiser calls seen.
    For a family that guides in separate calls (`separate=True`) it is the pipeline's step-end callback instead
    (`step_end`, with `call_kwargs`): `call` counts the steps, `switched` the steps run with `cond`."""

    def __init__(self, cond: torch.Tensor, from_call: int, separate: bool = False):
        if from_call < 0:
            raise ShapefirstError(f"switch call {from_call} is negative", "pass a call index >= 0")
        self.cond, self.from_call, self.call, self.switched = cond, int(from_call), 0, 0
        self.separate, self.denoiser_calls = separate, 0

    @property
    def call_kwargs(self) -> dict:
        """What the pipeline call must be given (separate calls: the step-end callback, and from step 0 the new
        embeddings as its prompt_embeds); nothing for batched CFG."""
        if not self.separate:
            return {}
        out = {"callback_on_step_end": self.step_end, "callback_on_step_end_tensor_inputs": ["prompt_embeds"]}
        return {**out, "prompt_embeds": self.cond} if self.from_call == 0 else out

    def step_end(self, pipe, step: int, timestep, callback_kwargs: dict) -> dict:
        """The pipeline's callback_on_step_end: after step from_call - 1, its prompt_embeds become `cond`."""
        self.call = step + 1
        if step >= self.from_call:
            self.switched += 1
        if step + 1 != self.from_call:
            return {}
        now = callback_kwargs["prompt_embeds"]
        if self.cond.shape != now.shape:
            raise ShapefirstError(f"the switch embeddings have shape {tuple(self.cond.shape)}, the pipeline's "
                                  f"prompt_embeds {tuple(now.shape)}", "make them from the same prompts and "
                                  "max_sequence_length, one per video")
        return {"prompt_embeds": self.cond.to(device=now.device, dtype=now.dtype)}

    def count(self, module, args, kwargs):
        """Forward pre-hook of a separate-call family's denoiser: counts its calls, changes nothing."""
        self.denoiser_calls += 1

    def __call__(self, module, args, kwargs):
        call = self.call
        self.call += 1
        if call < self.from_call:
            return None
        positional = "encoder_hidden_states" not in kwargs
        ehs = args[2] if positional and len(args) > 2 else kwargs.get("encoder_hidden_states")
        if ehs is None:
            raise ShapefirstError("the denoiser was called without encoder_hidden_states",
                                  "use a text-conditioned UNet")
        idx = row_images(ehs.shape[0], self.cond.shape[0], None, what="switch embeddings")
        new, sel = ehs.clone(), idx >= 0
        new[sel.to(ehs.device)] = self.cond.to(device=ehs.device, dtype=ehs.dtype)[idx[sel].to(ehs.device)]
        self.switched += 1
        if positional:
            args = args[:2] + (new,) + tuple(args[3:])
        else:
            kwargs = {**kwargs, "encoder_hidden_states": new}
        return args, kwargs


@contextmanager
def eos_switch(pipe, cond: torch.Tensor, from_call: int):
    """`with eos_switch(pipe, swapped_cond, a) as sw: generate(..., **sw.call_kwargs)`: the conditional rows
    become `cond` from call a on (one call per step; see the module docstring for separate-call families)."""
    separate = not isinstance(pipe, torch.nn.Module) and family(pipe).cfg == "separate"
    hook = EosSwitch(cond, from_call, separate)
    handle = denoiser_of(pipe).register_forward_pre_hook(hook.count if separate else hook, with_kwargs=True)
    try:
        yield hook
    finally:
        handle.remove()
    if separate and hook.denoiser_calls and not hook.call:
        raise ShapefirstError(f"{type(pipe).__name__} guides in separate calls: the [EOS] switch is its step-end "
                              "callback, and the pipeline ran without it", "pass **switch.call_kwargs to the "
                              "pipeline call (or to shapefirst.generate)")


class KVState:
    """What the KV processors read: `alt` [N, L, D] (conditional rows' alternative context) and
    `mode` ("keys", "values" or "both"); alt None = processors pass through to the originals."""

    def __init__(self, pipe=None):
        self.pipe = pipe
        self.alt: torch.Tensor | None = None
        self.mode: str | None = None
        self.substituted = 0  # layer calls that used the alternative

    def set(self, alt: torch.Tensor, mode: str) -> "KVState":
        if mode not in KV_MODES:
            raise ShapefirstError(f"K/V substitution mode {mode!r} is not one of {KV_MODES}",
                                  "pass 'keys', 'values' or 'both'")
        if alt.dim() != 3:
            raise ShapefirstError(f"the alternative context has shape {tuple(alt.shape)}", "pass [N, L, D] embeddings")
        self.alt, self.mode = alt, mode
        return self

    def clear(self) -> None:
        self.alt, self.mode = None, None

    def row_images(self, rows: int) -> torch.Tensor:
        """Per row of this attention call: the image whose conditional row it is, or -1 (rows.row_images: inside
        a call a guidance schedule prepared, its layout decides; else the pipeline's CFG flag)."""
        st = run_state_of(self.pipe) if self.pipe is not None else None
        if st is not None and st.prepared:  # inside a call the guidance hook prepared: its decision and rows
            lay = st.layout if st.batch == self.alt.shape[0] else None
            return row_images(rows, self.alt.shape[0], st.cfg_now, lay, what="substitution embeddings")
        cfg = getattr(self.pipe, "do_classifier_free_guidance", None) if self.pipe is not None else None
        return row_images(rows, self.alt.shape[0], cfg, what="substitution embeddings")


def _swap_input(replacement: torch.Tensor, fired: list):
    """Forward pre-hook for a key or value projection: its input becomes `replacement`."""
    def hook(module, args):
        fired.append(module)
        return (replacement,) + tuple(args[1:])
    return hook


class KVSubstituteProcessor:
    """Cross-attention processor: keys and/or values of the conditional rows from `state.alt`.

    It calls the ORIGINAL processor; while that runs, forward pre-hooks on `attn.to_k` / `attn.to_v`
    give the key / value projection the substituted context (normalised by the layer's
    `norm_encoder_hidden_states` where `norm_cross` is set, as the processor does for its own)."""

    def __init__(self, original, state: KVState):
        self.original, self.state = original, state

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):  # AttnProcessor's parameter names: Attention.forward filters by them
        st = self.state
        extra = {"temb": temb} if temb is not None else {}

        def original():
            return self.original(attn, hidden_states, encoder_hidden_states=encoder_hidden_states,
                                 attention_mask=attention_mask, **extra, **kwargs)

        if st.alt is None or encoder_hidden_states is None:
            return original()
        if getattr(attn, "fused_projections", False):
            raise ShapefirstError("K/V substitution needs separate key and value projections, but this attention "
                                  "layer's projections are fused",
                                  "call unfuse_qkv_projections() on the pipeline first")
        ctx = encoder_hidden_states
        idx = st.row_images(ctx.shape[0])
        alt = ctx.clone()
        sel = idx >= 0
        alt[sel.to(ctx.device)] = st.alt.to(device=ctx.device, dtype=ctx.dtype)[idx[sel].to(ctx.device)]
        if attn.norm_cross:
            alt = attn.norm_encoder_hidden_states(alt)
        targets = [m for m, on in ((attn.to_k, st.mode in ("keys", "both")),
                                   (attn.to_v, st.mode in ("values", "both")))
                   if on]
        fired: list = []
        handles = [m.register_forward_pre_hook(_swap_input(alt, fired)) for m in targets]
        try:
            out = original()
        finally:
            for h in handles:
                h.remove()
        if len(fired) < len(targets):
            raise ShapefirstError(f"the attention processor {type(self.original).__name__} did not call the key/value "
                                  "projections (to_k / to_v), so nothing could be substituted",
                                  "use diffusers' default attention processor "
                                  "(pipe.unet.set_default_attn_processor())")
        st.substituted += 1
        return out


def cross_attention_processor_names(unet) -> list[str]:
    return [name for name in unet.attn_processors if name.endswith("attn2.processor")]


@contextmanager
def kv_substitution(pipe, state: KVState | None = None):
    """`with kv_substitution(pipe) as st: st.set(alt, "keys"); generate(...)`; originals back on exit."""
    unet = pipe if isinstance(pipe, torch.nn.Module) else denoiser_of(pipe)
    if not hasattr(unet, "attn_processors") or not hasattr(unet, "set_attn_processor"):
        raise ShapefirstError(f"{type(unet).__name__} has no attention processors", "pass a UNet-based pipeline")
    names = cross_attention_processor_names(unet)
    if not names:
        raise ShapefirstError(f"K/V substitution replaces the keys and values of cross-attention layers ('...attn2'), "
                              f"and {type(unet).__name__} has none (joint attention reads text and image in one)",
                              "run it on SD 1.x/2.x, SDXL or PixArt")
    other = sorted({type(m).__name__ for m in (unet.get_submodule(n[:-len(".processor")]) for n in names)
                    if not isinstance(m, Attention)})
    if other:
        raise ShapefirstError(f"K/V substitution reads diffusers' classic Attention layers, and these are {other[0]}",
                              "run it on SD 1.x/2.x, SDXL or PixArt")
    state = state or KVState(None if isinstance(pipe, torch.nn.Module) else pipe)
    original = dict(unet.attn_processors)
    try:
        new = dict(original)
        for name in names:
            new[name] = KVSubstituteProcessor(original[name], state)
        unet.set_attn_processor(new)
        yield state
    finally:
        state.clear()
        unet.set_attn_processor(dict(original))
