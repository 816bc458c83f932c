"""Late-stage caching: save more than one denoiser branch once guidance has stopped.

After the guidance stop the text hardly matters and the image changes slowly, so parts of the
denoiser can reuse what they computed before. Two options, each alone or combined, both active
only in the late phase (every sample of the batch past its guided calls, as the guidance hook
reports), so with the stop at the end nothing changes: images are bit-identical.

- `cross_attention`: T-GATE style (Liu et al., TMLR 2025). At the last guided call every
  cross-attention module's output is kept per sample ("mean": the mean of its two CFG rows, as
  T-GATE does; "kept": the row of the branch that runs after the stop), and every later call
  returns it instead of computing queries, attention and the output projection. The text then no
  longer enters the denoiser at all. Families with separate cross-attention (`attn2`): SD, SDXL,
  PixArt. SD3's joint attention mixes text and image tokens in one attention: not supported.
- `deep_interval` N >= 2: DeepCache style (Ma et al., CVPR 2024) for UNets (SD, SDXL). In the late
  phase the full UNet runs at the first late call and every N-th call after; in between only the
  outermost `deep_depth` levels run (conv_in, the first down blocks, the last up blocks) and the
  deeper blocks return what they returned at the last full call (the high-level features).

Mechanism: `diffusers.hooks` ModelHooks on the attention modules and UNet blocks, which read the
phase from the RunState (shapefirst.guidance) that the guidance hook on the same pipeline shares:
apply a guidance schedule first (`generate(..., cache=LateCache(...))` does both). A schedule that
replaces it keeps the RunState, so the caches follow the new schedule; removing the schedule removes
the caches. Every cache hook is stateful (`reset_state` clears what it kept; every new run resets
them). Removal restores the plain forwards. A cache hook acts only inside a call the guidance hook has
prepared (`RunState.prepared`); any other call runs the plain forward. The DeepCache phase is decided
when the call is prepared (a RunState listener), so a compiled UNet reads only booleans (no recompile per
call).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
from diffusers.hooks import HookRegistry, ModelHook

from .errors import ShapefirstError
from .guidance_hook import session_of, uninstall_if_unused

HOOK_NAME = "shapefirst_cache"
CROSS_MODES = ("mean", "kept")


@dataclass(frozen=True)
class LateCache:
    """What to reuse after the guidance stop (see module docstring). Default: nothing."""

    cross_attention: str | None = None  # None, "mean" (T-GATE) or "kept"
    deep_interval: int = 0  # 0 = off; N >= 2: full UNet every N-th late call
    deep_depth: int = 1  # outer UNet levels that always run

    def __post_init__(self):
        if self.cross_attention not in (None,) + CROSS_MODES:
            raise ShapefirstError(f"cross_attention={self.cross_attention!r} is not one of {CROSS_MODES}",
                                  "pass 'mean' (T-GATE), 'kept' or None")
        if int(self.deep_interval) != self.deep_interval or self.deep_interval < 0 or self.deep_interval == 1:
            raise ShapefirstError(f"deep_interval {self.deep_interval} is not 0 (off) or an integer >= 2",
                                  "pass e.g. 3 (the full UNet every third late call)")
        if int(self.deep_depth) != self.deep_depth or self.deep_depth < 1:
            raise ShapefirstError(f"deep_depth {self.deep_depth} is not an integer >= 1", "pass 1 or 2")

    @property
    def active(self) -> bool:
        return self.cross_attention is not None or self.deep_interval >= 2

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def label(self) -> str:
        """The spec `parse` reads back: 'mean', 'kept', 'deep3', 'deep3d2', 'mean+deep3', 'none'."""
        parts = [self.cross_attention] if self.cross_attention else []
        if self.deep_interval >= 2:
            parts.append(f"deep{self.deep_interval}" + (f"d{self.deep_depth}" if self.deep_depth != 1 else ""))
        return "+".join(parts) or "none"

    @classmethod
    def parse(cls, spec: str) -> "LateCache | None":
        """'none' -> None; 'mean' / 'kept' (cross-attention reuse), 'deepN' or 'deepNdD' (DeepCache every N
        calls, D outer levels), joined with '+': 'mean+deep3'."""
        import re

        spec = (spec or "none").strip().lower()
        if spec in ("", "none"):
            return None
        kw = {}
        for part in spec.split("+"):
            m = re.fullmatch(r"deep(\d+)(?:d(\d+))?", part)
            if part in CROSS_MODES and "cross_attention" not in kw:
                kw["cross_attention"] = part
            elif m and "deep_interval" not in kw:
                kw["deep_interval"] = int(m.group(1))
                kw["deep_depth"] = int(m.group(2) or 1)
            else:
                raise ShapefirstError(f"late-stage cache spec {spec!r} is not understood (at {part!r})",
                                      "pass none, mean, kept, deepN (e.g. deep3) or a '+' join such as mean+deep3")
        return cls(**kw)


class CrossAttentionReuse(ModelHook):
    """On one cross-attention module: within a run whose late cache reuses cross-attention, record per sample
    at the calls after which a sample may stop, replay in the late phase. What it keeps is the run's own
    (`RunState.kept[slot]`): a new run starts with nothing, two runs at once never share."""

    def __init__(self, session):
        super().__init__()
        self.session, self.slot = session, session.new_slot()

    def reset_state(self, module):
        return module

    def new_forward(self, module, *args, **kwargs):
        st = self.session.current() if self.session is not None else None
        mode = _mode(st, "cross_attention")
        if mode is None:  # no run, or its late cache does not reuse cross-attention: the plain forward
            return self.fn_ref.original_forward(*args, **kwargs)
        hs = args[0] if args else kwargs["hidden_states"]
        kept = st.kept[self.slot]
        if st.late and kept is not None and kept.shape[0] == st.batch:
            return kept.index_select(0, st.row_sample.to(kept.device)).to(hs.dtype)
        out = self.fn_ref.original_forward(*args, **kwargs)
        if st.may_stop_next and not st.late:
            st.kept[self.slot] = _record(out, st, kept, mode)
        return out


def _mode(st, field: str):
    """The run's late-cache setting `field` (None without a run or a late cache)."""
    cache = st.binding.cache if st is not None else None
    return getattr(cache, field) if cache is not None else None


def _record(out: torch.Tensor, st, kept: torch.Tensor | None, mode: str) -> torch.Tensor:
    """The cross-attention output kept per sample: the row of the branch that runs after the stop ("kept"), or
    the mean of the sample's rows that ran ("mean", T-GATE)."""
    lay = st.layout
    if kept is None or kept.shape[0] != st.batch or kept.shape[1:] != out.shape[1:]:
        kept = out.new_zeros((st.batch,) + tuple(out.shape[1:]))
    if mode == "kept":
        return kept.index_copy(0, lay.kept_sample, out.index_select(0, lay.kept_pos))
    shape = (-1,) + (1,) * (out.dim() - 1)
    total = out.new_zeros(kept.shape).index_add_(0, lay.row_sample, out)
    count = lay.sample_count.to(out.dtype).view(shape)
    return torch.where(count > 0, total / count.clamp(min=1), kept)


class DeepSkip(ModelHook):
    """On one deep UNet block: within a run whose late cache is DeepCache-style, record its output at full late
    calls and replay it at shallow ones (the phase: _DeepState; the output: the run's `kept[slot]`)."""

    def __init__(self, session):
        super().__init__()
        self.session, self.slot = session, session.new_slot()

    def reset_state(self, module):
        return module

    def new_forward(self, module, *args, **kwargs):
        st = self.session.current() if self.session is not None else None
        if st is not None and st.deep_shallow:  # a shallow call follows a full (recording) late call of the run
            return st.kept[self.slot]
        out = self.fn_ref.original_forward(*args, **kwargs)
        if st is not None and st.deep_recording:
            st.kept[self.slot] = out
        return out


class _DeepState:
    """Decides whether a late call is full (recording) or shallow (replaying): a listener of the session
    (`on_call`, when the guidance hook prepares a call, outside a compiled UNet, which then reads only the
    run's two booleans `deep_shallow` and `deep_recording`)."""

    def on_call(self, st) -> None:
        interval = _mode(st, "deep_interval") or 0
        if st.late and st.first_late is None:
            st.first_late = st.call
        phase = (st.call - st.first_late) % interval if st.late and interval >= 2 else None
        st.deep_shallow, st.deep_recording = phase is not None and phase != 0, phase == 0


def _cross_attention_modules(den) -> list:
    from diffusers.models.attention_processor import Attention

    mods = [m for n, m in den.named_modules()
            if isinstance(m, Attention) and m.is_cross_attention and n.endswith("attn2")]
    if not mods:
        raise ShapefirstError(f"{type(den).__name__} has no separate cross-attention modules (attn2) to reuse "
                              "(SD3 mixes text and image tokens in one joint attention)",
                              "drop cross_attention from the LateCache for this model")
    return mods


def _deep_blocks(den, depth: int) -> list:
    if not (hasattr(den, "down_blocks") and hasattr(den, "up_blocks") and hasattr(den, "mid_block")):
        raise ShapefirstError(f"deep_interval needs a UNet; {type(den).__name__} has no down/mid/up blocks",
                              "drop deep_interval from the LateCache for this model (SD, SDXL only)")
    n = len(den.down_blocks)
    if depth >= n:
        raise ShapefirstError(f"deep_depth {depth} leaves no UNet level to cache ({n} levels)",
                              f"pass a depth between 1 and {n - 1}")
    return list(den.down_blocks[depth:]) + [den.mid_block] + list(den.up_blocks[: n - depth])


def _session_and_binding(pipe):
    session = session_of(pipe)
    binding = session.binding_of(pipe) if session is not None else None
    if binding is None:
        raise ShapefirstError("a late-stage cache needs a guidance schedule on the pipeline (it acts after the stop)",
                              "apply_guidance_schedule(pipe, ...) first, or pass cache= to shapefirst.generate")
    if binding.family is not None and binding.family.cfg == "separate":
        raise ShapefirstError("late-stage caches reuse rows of a batched [uncond, cond] call, "
                              f"and {type(pipe).__name__} "
                              "calls its denoiser once per branch", "drop the late cache for this pipeline")
    return session, binding


def _hooks(session, cls) -> list:
    regs = [HookRegistry.check_if_exists_or_initialize(m) for m, n in session.added if n == HOOK_NAME]
    return [r.get_hook(HOOK_NAME) for r in regs if isinstance(r.get_hook(HOOK_NAME), cls)]


def _install(session, cache: LateCache) -> None:
    """Add the hooks `cache` needs on the session's denoiser (once per session; they act per run)."""
    den = session.denoiser
    if cache.cross_attention is not None and not _hooks(session, CrossAttentionReuse):
        for m in _cross_attention_modules(den):
            session.add_hook(m, CrossAttentionReuse(session), HOOK_NAME)
    if cache.deep_interval >= 2:
        blocks = _deep_blocks(den, cache.deep_depth)
        have = _hooks(session, DeepSkip)
        if have and len(have) != len(blocks):
            raise ShapefirstError(f"another pipeline sharing this denoiser has a DeepCache-style late cache "
                                  "at another "
                                  f"depth than deep_depth {cache.deep_depth}", "use the same deep_depth for both")
        if not have:
            session.listeners.append(_DeepState())
            for b in blocks:
                session.add_hook(b, DeepSkip(session), HOOK_NAME)
    HookRegistry.check_if_exists_or_initialize(den).invalidate_child_registries_cache()


def _prune(session) -> None:
    """Remove the cache hooks that no binding on the session needs any more."""
    caches = [b.cache for b in session.live_bindings() if b.cache is not None]
    keep_cross = any(c.cross_attention is not None for c in caches)
    keep_deep = any(c.deep_interval >= 2 for c in caches)
    if keep_cross and keep_deep:
        return
    drop = [] if keep_cross else _hooks(session, CrossAttentionReuse)
    drop += [] if keep_deep else _hooks(session, DeepSkip)
    if not keep_deep:
        session.listeners[:] = [x for x in session.listeners if not isinstance(x, _DeepState)]
    for module, name in list(session.added):
        reg = HookRegistry.check_if_exists_or_initialize(module)
        if name == HOOK_NAME and reg.get_hook(name) in drop:
            reg.remove_hook(name, recurse=False)
            session.added.remove((module, name))
    HookRegistry.check_if_exists_or_initialize(session.denoiser).invalidate_child_registries_cache()


def apply_late_cache(pipe, cache: LateCache) -> None:
    """Give the pipeline's guidance schedule a late cache (replacing one it had; apply the schedule first).
    It acts on that pipeline's runs only and follows a schedule that replaces it; `remove_guidance_schedule`
    removes it too."""
    session, binding = _session_and_binding(pipe)
    _install(session, cache)
    session.set_top(pipe, binding.with_(cache=cache))
    _prune(session)


def remove_late_cache(pipe) -> None:
    session = session_of(pipe)
    binding = session.binding_of(pipe) if session is not None else None
    if binding is not None and binding.cache is not None:
        session.set_top(pipe, binding.with_(cache=None))
        _prune(session)


@contextmanager
def late_cache(pipe, cache: LateCache | None):
    """`with guidance_schedule(pipe, s), late_cache(pipe, LateCache(cross_attention="mean")): pipe(...)`;
    leaving restores what the pipeline had before."""
    if cache is None or not cache.active:
        yield
        return
    session, binding = _session_and_binding(pipe)
    _install(session, cache)
    depth = session.push(pipe, binding.with_(cache=cache))
    try:
        yield
    finally:
        session.truncate(pipe, depth)
        _prune(session)
        uninstall_if_unused(session)
