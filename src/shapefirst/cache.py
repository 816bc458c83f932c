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
from .guidance import denoiser_of, run_state_of

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
    """On one cross-attention module: record per sample at calls after which a sample may stop,
    replay in the late phase. Reads the pipeline's RunState; its cache is cleared by `reset_state`
    (at every new run)."""

    _is_stateful = True

    def __init__(self, state, mode: str):
        super().__init__()
        self.state, self.mode = state, mode
        self.cache = None  # [batch, tokens, channels]

    def reset_state(self, module):
        self.cache = None
        return module

    def new_forward(self, module, *args, **kwargs):
        st = self.state
        hs = args[0] if args else kwargs["hidden_states"]
        if not st.prepared:  # a denoiser call the guidance hook did not see (it raises a clear error after it)
            return self.fn_ref.original_forward(*args, **kwargs)
        if st.late and self.cache is not None and self.cache.shape[0] == st.batch:
            return self.cache.index_select(0, st.row_sample.to(self.cache.device)).to(hs.dtype)
        out = self.fn_ref.original_forward(*args, **kwargs)
        if st.may_stop_next and not st.late:
            self._record(out, st)
        return out

    def _record(self, out: torch.Tensor, st) -> None:
        lay = st.layout
        if self.cache is None or self.cache.shape[0] != st.batch or self.cache.shape[1:] != out.shape[1:]:
            self.cache = out.new_zeros((st.batch,) + tuple(out.shape[1:]))
        if self.mode == "kept":  # the row of the branch that runs after the stop
            self.cache.index_copy_(0, lay.kept_sample, out.index_select(0, lay.kept_pos))
            return
        shape = (-1,) + (1,) * (out.dim() - 1)
        total = out.new_zeros(self.cache.shape).index_add_(0, lay.row_sample, out)
        count = lay.sample_count.to(out.dtype).view(shape)
        self.cache = torch.where(count > 0, total / count.clamp(min=1), self.cache)


class DeepSkip(ModelHook):
    """On one deep UNet block: record its output at full late calls, replay it at shallow ones."""

    _is_stateful = True

    def __init__(self, state):
        super().__init__()
        self.state = state
        self.out = None

    def reset_state(self, module):
        self.out = None
        return module

    def new_forward(self, module, *args, **kwargs):
        prepared = self.state.run_state.prepared  # else: a call the guidance hook did not see
        if prepared and self.state.shallow and self.out is not None:
            return self.out
        out = self.fn_ref.original_forward(*args, **kwargs)
        if prepared and self.state.recording:
            self.out = out
        return out


class _DeepState(ModelHook):
    """Decides whether a late call is full (recording) or shallow (replaying): a listener of the RunState
    (`on_call`, when the guidance hook prepares the call, outside a compiled UNet, which then reads only
    the two booleans), and a stateful hook on the UNet's conv_in (its forward unchanged) so that every
    new run resets it."""

    _is_stateful = True

    def __init__(self, run_state, interval: int):
        super().__init__()
        self.run_state, self.interval = run_state, interval
        self.shallow = self.recording = False
        self.first_late = None

    def reset_state(self, module):
        self.shallow = self.recording = False
        self.first_late = None
        return module

    def on_call(self, st) -> None:
        if st.late and self.first_late is None:
            self.first_late = st.call
        phase = (st.call - self.first_late) % self.interval if st.late else None
        self.recording = phase == 0
        self.shallow = phase is not None and phase != 0


def _cross_attention_modules(den) -> list:
    from diffusers.models.attention_processor import Attention

    mods = [m for n, m in den.named_modules() if isinstance(m, Attention) and m.is_cross_attention and n.endswith("attn2")]
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


def apply_late_cache(pipe, cache: LateCache) -> None:
    """Attach the cache hooks (after `apply_guidance_schedule`: they read its RunState, and follow a
    schedule that replaces it; `remove_guidance_schedule` removes them too); replaces earlier ones."""
    den = denoiser_of(pipe)
    state = run_state_of(pipe)
    if state is None:
        raise ShapefirstError("a late-stage cache needs a guidance schedule on the pipeline (it acts after the stop)",
                              "apply_guidance_schedule(pipe, ...) first, or pass cache= to shapefirst.generate")
    remove_late_cache(pipe)
    targets = []
    if cache.cross_attention is not None:
        targets += [(m, CrossAttentionReuse(state, cache.cross_attention)) for m in _cross_attention_modules(den)]
    if cache.deep_interval >= 2:
        blocks = _deep_blocks(den, cache.deep_depth)
        deep = _DeepState(state, cache.deep_interval)
        targets += [(b, DeepSkip(deep)) for b in blocks]
        targets.append((den.conv_in, deep))
        state.listeners.append(deep)
    for mod, hook in targets:
        HookRegistry.check_if_exists_or_initialize(mod).register_hook(hook, HOOK_NAME)
    HookRegistry.check_if_exists_or_initialize(den).invalidate_child_registries_cache()


def remove_late_cache(pipe) -> None:
    state = run_state_of(pipe)
    if state is not None:
        state.listeners[:] = [x for x in state.listeners if not isinstance(x, _DeepState)]
    reg = HookRegistry.check_if_exists_or_initialize(denoiser_of(pipe))
    reg.remove_hook(HOOK_NAME, recurse=True)
    reg.invalidate_child_registries_cache()


@contextmanager
def late_cache(pipe, cache: LateCache | None):
    """`with guidance_schedule(pipe, s), late_cache(pipe, LateCache(cross_attention="mean")): pipe(...)`"""
    if cache is None or not cache.active:
        yield
        return
    apply_late_cache(pipe, cache)
    try:
        yield
    finally:
        remove_late_cache(pipe)
