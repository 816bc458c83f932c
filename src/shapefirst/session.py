"""A denoiser's session: which pipelines sharing it have what applied, and the runs in progress.

One Session per denoiser module, held by the guidance hook on it (shapefirst.guidance_hook). It keeps
- per pipeline, a stack of Bindings (what that pipeline has applied: schedule, trajectory recorder,
  late cache). `apply_*` replaces the top, a context manager pushes one and leaving it truncates the
  stack back to where it was (contexts nest and restore). A schedule acts on the calls of the
  pipeline it was applied to only; another pipeline sharing the denoiser runs untouched unless it has
  its own.
- per pipeline call in progress, one RunState (shapefirst.run_state), found from the call that is
  running (shapefirst.pipeline_call): two pipelines sharing the denoiser, two threads, or a pipeline
  called inside another's call each get their own. A denoiser call outside any pipeline call, or of
  a pipeline with nothing applied, belongs to no run and passes through.
- the RunState of the denoiser call in progress on each thread (`current()`), which the cooperating
  hooks (late caches, attention capture, K/V substitution) read while the denoiser runs.
"""
from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass, field, replace

from diffusers.hooks import HookRegistry

from .families import Family
from .pipeline_call import cfg_of_call, running_call
from .run_state import RunState
from .schedules import GuidanceSchedule


@dataclass(frozen=True, eq=False)
class Binding:
    """What one pipeline has applied on the denoiser: its schedule, trajectory recorder and late cache
    (shapefirst.cache.LateCache or None); `verify`: its CFG batch is checked (detected by structure);
    `family`: its declaration (shapefirst.families)."""

    schedule: GuidanceSchedule
    recorder: object = None
    cache: object = None
    verify: bool = False
    family: Family | None = None

    def with_(self, **changes) -> "Binding":
        return replace(self, **changes)


@dataclass(eq=False)
class PipeEntry:
    """A pipeline's stack of Bindings on one denoiser, its run count and its last run (for read-outs)."""

    pipe: weakref.ref
    stack: list = field(default_factory=list)
    runs: int = 0
    last: RunState | None = None


def separate_cfg(family: Family, call) -> bool:
    """Does a "separate" family's pipeline call run CFG: its declared local (Flux: do_true_cfg), else its
    `do_classifier_free_guidance` property."""
    if family.cfg_local:
        return bool(call.local(family.cfg_local, False))
    return bool(getattr(call.pipe, "do_classifier_free_guidance", False))


class Session:
    """See the module docstring."""

    def __init__(self, denoisers: list):
        self.denoisers = list(denoisers)  # every denoiser of the pipeline (Wan 2.2: transformer, transformer_2)
        self.denoiser = self.denoisers[0]
        self.entries: dict[int, PipeEntry] = {}  # id(pipe) -> its entry (the pipe held weakly)
        self.runs: dict[int, RunState] = {}  # id(frame of the pipeline call) -> its RunState
        self.listeners: list = []  # objects with on_call(state), run when a call is prepared
        self.layouts: dict = {}
        self.local = threading.local()
        self.added: list = []  # [(module, hook name)] hooks the cooperating features added for this session
        self.slots = 0  # RunState.kept slots handed out to the hooks that keep a tensor per run

    def new_slot(self) -> int:
        self.slots += 1
        return self.slots - 1

    def __deepcopy__(self, memo):
        """A deep copy of a hooked module copies the hooks that refer to the session; they are never called (the
        copy's forward is the original's, see GuidanceHook.__deepcopy__), so the copy shares nothing."""
        return None

    def add_hook(self, module, hook, name: str) -> None:
        """Register `hook` on `module` under `name` (replacing an earlier one), to be removed with the session."""
        reg = HookRegistry.check_if_exists_or_initialize(module)
        if reg.get_hook(name) is not None:
            reg.remove_hook(name, recurse=False)
        reg.register_hook(hook, name)
        if (module, name) not in self.added:
            self.added.append((module, name))

    def remove_added(self, name: str | None = None) -> None:
        """Remove the hooks added under `name` (all of them if None) from their modules."""
        keep = []
        for module, n in self.added:
            if name is not None and n != name:
                keep.append((module, n))
                continue
            reg = HookRegistry.check_if_exists_or_initialize(module)
            if reg.get_hook(n) is not None:
                reg.remove_hook(n, recurse=False)
        self.added = keep
        HookRegistry.check_if_exists_or_initialize(self.denoiser).invalidate_child_registries_cache()

    # -- bindings --------------------------------------------------------------------------
    def entry(self, pipe, create: bool = False) -> PipeEntry | None:
        e = self.entries.get(id(pipe))
        if e is not None and e.pipe() is not pipe:  # a dead pipeline's id, reused
            self.entries.pop(id(pipe), None)
            e = None
        if e is None and create:
            e = self.entries[id(pipe)] = PipeEntry(weakref.ref(pipe))
        return e

    def binding_of(self, pipe) -> Binding | None:
        e = self.entry(pipe)
        return e.stack[-1] if e is not None and e.stack else None

    def depth(self, pipe) -> int:
        e = self.entry(pipe)
        return len(e.stack) if e is not None else 0

    def set_top(self, pipe, binding: Binding) -> None:
        e = self.entry(pipe, create=True)
        if e.stack:
            e.stack[-1] = binding
        else:
            e.stack.append(binding)

    def push(self, pipe, binding: Binding) -> int:
        """Push a binding (a context entered); returns the depth to truncate back to on leaving."""
        e = self.entry(pipe, create=True)
        e.stack.append(binding)
        return len(e.stack) - 1

    def truncate(self, pipe, depth: int) -> None:
        e = self.entry(pipe)
        if e is not None:
            del e.stack[depth:]
            if not e.stack:
                self.drop(pipe)

    def drop(self, pipe) -> None:
        """Forget everything `pipe` applied (its runs in progress too)."""
        self.entries.pop(id(pipe), None)
        for key, st in list(self.runs.items()):
            if st.pipe is pipe:
                self.runs.pop(key, None)

    def live_bindings(self) -> list[Binding]:
        return [b for e in list(self.entries.values()) if e.pipe() is not None for b in e.stack]

    def empty(self) -> bool:
        return not any(e.stack and e.pipe() is not None for e in self.entries.values())

    def last_run(self, pipe) -> RunState | None:
        e = self.entry(pipe)
        return None if e is None else e.last

    # -- runs ------------------------------------------------------------------------------
    def state_for(self, sample, create: bool = True) -> RunState | None:
        """The RunState of the pipeline call this denoiser call belongs to (with `create`, a new run at its first
        call), or None: no pipeline call above it, or one of a pipeline with nothing applied here. Without
        `create` (the ControlNet, called before the denoiser), only a run under way whose CFG batch this is."""
        call = running_call()
        if call is None:
            return None
        binding = self.binding_of(call.pipe)
        if binding is None:
            return None
        st = self.runs.get(id(call.frame))
        ours = st is not None and st.frame is call.frame and st.binding is binding
        if ours and st.prepared:
            return st  # prepared already (by the ControlNet, before the denoiser)
        separate = binding.family is not None and binding.family.cfg == "separate"
        cfg = separate_cfg(binding.family, call) if separate else cfg_of_call(call, sample)
        batch = sample.shape[0] // 2 if cfg and not separate else sample.shape[0]
        if not create:
            return st if ours and cfg and st.batch == batch and not st.done else None
        if not ours or st.batch != batch or st.done:
            st = self.begin_run(call, binding, batch)
        st.cfg_pending = cfg
        return st

    def begin_run(self, call, binding: Binding, batch: int) -> RunState:
        """A new run; runs of the same pipeline on this thread that were cut short are forgotten. diffusers' own
        stateful hooks (its caches) are left to diffusers: a pipeline resets them at the end of its call, and
        resetting them here would clear the cache context the pipeline has just opened for this call."""
        e = self.entry(call.pipe, create=True)
        e.runs += 1
        st = RunState(self, call, binding, batch, e.runs)
        for key, old in list(self.runs.items()):
            if old.pipe is call.pipe and old.thread == st.thread:
                self.runs.pop(key, None)
        self.runs[id(call.frame)] = st
        e.last = st
        if st.recorder is not None:
            st.recorder.start_run(call.pipe, batch)
        return st

    def layout(self, key, make):
        if key not in self.layouts:
            self.layouts[key] = make()
        return self.layouts[key]

    # -- the call in progress on this thread ---------------------------------------------------
    def current(self) -> RunState | None:
        """The RunState whose denoiser call is in progress on this thread (prepared), else None."""
        st = getattr(self.local, "current", None)
        return st if st is not None and st.prepared else None

    def enter(self, st: RunState, sample) -> None:
        st.prepare(sample, st.cfg_pending)
        self.local.current = st

    def leave(self, st: RunState, ok: bool) -> None:
        if ok:
            st.finish()
        else:
            st.prepared = False
        self.local.current = None
        self.release_if_done(st)

    def release_if_done(self, st: RunState) -> None:
        """A run that made its last call lets go of the pipeline call's frame (its locals: latents, embeddings and,
        later, the decoded images) and of what the cooperating hooks kept; its counts stay readable."""
        if not st.done or st.frame is None:
            return
        if self.runs.get(id(st.frame)) is st:
            del self.runs[id(st.frame)]
        st.frame = st.pipeline_call = st.step_first = st.step_out = None
        st.kept = [None] * len(st.kept)
