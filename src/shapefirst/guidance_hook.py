"""The guidance hook: a `diffusers.hooks` ModelHook on the denoiser that applies each pipeline call's
guidance schedule (shapefirst.schedules), and `apply_guidance_schedule` / `guidance_schedule(...)`.

While a sample is guided, both of its rows ([uncond, cond]) run as usual. Once it is unguided, only
the row of the kept branch runs, and the hook returns that row's prediction in BOTH halves of the
CFG batch, so the pipeline's own formula u + w (c - u) yields exactly the kept branch (c - c == 0).
With no stop, every call runs the full batch through the original forward: bit-identical to the
plain pipeline.

Whose schedule: the hook sits on the denoiser, which pipelines can share; its Session
(shapefirst.session) finds the pipeline call each denoiser call belongs to and gives every call its
own RunState. A schedule acts on the calls of the pipeline it was applied to only: another pipeline
sharing the denoiser (`from_pipe`, `**pipe.components`) runs untouched unless it has its own
schedule, and a denoiser call outside a pipeline call passes through.

Nesting: `apply_guidance_schedule` replaces what the pipeline has applied (the innermost wins); the
context manager `guidance_schedule` restores, on leaving, what was applied before it (also after an
exception), so contexts nest, and `shapefirst.generate` inside a user's context leaves that context as
it found it. Removal works on the denoiser the schedule was applied to, also after `pipe.unet` /
`pipe.transformer` was replaced (e.g. by `torch.compile(pipe.unet)`).

GPU cost: the per-call path makes no host synchronisation (see shapefirst.run_state for the two
documented exceptions). torch.compile: the bookkeeping (finding the run, prepare, finish, settle) is
excluded from graphs (torch.compiler.disable). enable_model_cpu_offload: apply the schedule first; a
torch forward hook notices a call that bypassed the guidance hook and raises a ShapefirstError.
Not supported: SD3's skip-layer guidance (an extra denoiser call per step with its own batch)."""
from __future__ import annotations

import threading
import weakref
from contextlib import contextmanager

import torch
from diffusers.hooks import HookRegistry, ModelHook

from .controlnet_rows import apply_controlnet_rows
from .errors import ShapefirstError
from .families import family, listed_family
from .pipeline import denoiser_of, latent_input, timestep_input, timestep_value
from .rows import main_output, replace_output, rows_of
from .schedules import GuidanceSchedule
from .separate import SeparateCalls
from .session import Binding, Session

HOOK_NAME = "shapefirst_guidance"
_SESSIONS: "weakref.WeakSet[Session]" = weakref.WeakSet()  # every live session, for removal after a swap


class GuidanceHook(ModelHook):
    """The hook on one denoiser; `session` holds what each pipeline applied and each call's RunState."""

    _is_stateful = False  # nothing to reset: the state of a run is its own RunState

    def __init__(self, session: Session):
        super().__init__()
        self.session, self.active, self.watch, self.copied = session, True, None, False
        self.seen = threading.local()

    def __deepcopy__(self, memo):
        """A deep copy of a hooked denoiser keeps diffusers' hooked forward, which runs the ORIGINAL module and
        its hooks: the copy gets a hook that says so when it is called (see _watch)."""
        dead = GuidanceHook.__new__(GuidanceHook)
        dead.__dict__.update(session=None, active=False, watch=None, copied=True, seen=None)
        return dead

    def _watch(self, module, args, kwargs, output):
        """A torch forward hook on the denoiser: did this call go through the guidance hook? Not when something
        replaced the denoiser's forward after the schedule was applied: stop with a clear error."""
        if self.copied:
            raise ShapefirstError(f"this {type(module).__name__} is a deep copy made while a shapefirst schedule was "
                                  "applied: its forward is still the original module's hooked forward (diffusers' "
                                  "hooks do not survive copy.deepcopy), so it would run the original weights",
                                  "deep-copy the pipeline before applying the schedule (or after leaving its "
                                  "context), then apply a schedule to the copy")
        if not getattr(self.seen, "flag", False):
            raise ShapefirstError(f"the guidance hook is no longer on {type(module).__name__}.forward (something "
                                  "replaced the forward after the schedule was applied: enable_model_cpu_offload "
                                  "re-installs accelerate's hooks after every pipeline call)",
                                  "call enable_model_cpu_offload() before apply_guidance_schedule (or generate)")
        self.seen.flag = False
        return output

    def reset_state(self, module):
        return module

    @torch.compiler.disable
    def _state_for(self, sample):
        return self.session.state_for(sample)

    def new_forward(self, module, *args, **kwargs):
        forward = self.fn_ref.original_forward
        if not self.active:  # removed, but a wrapper kept by someone else (accelerate's offload hooks) still calls it
            return forward(*args, **kwargs)
        self.seen.flag = True
        sample = latent_input(args, kwargs)
        st = self._state_for(sample)
        if st is None:  # no pipeline call with a schedule above this call: untouched
            return forward(*args, **kwargs)
        if st.binding.family is not None and st.binding.family.cfg == "separate":
            return SeparateCalls(self.fn_ref.original_forward)(st, sample, args, kwargs)
        if kwargs.get("skip_layers") is not None:
            raise ShapefirstError("SD3 skip-layer guidance (skip_guidance_layers) is not supported with a guidance "
                                  "schedule or trajectory", "call the pipeline without skip_guidance_layers")
        self.session.enter(st, sample)
        try:
            call = self._cfg_call if st.cfg_now else self._plain_call
            out = call(st, sample, args, kwargs)
        except BaseException:
            self.session.leave(st, ok=False)
            raise
        self.session.leave(st, ok=True)
        return out

    def _plain_call(self, st, sample, args, kwargs):
        out = self.fn_ref.original_forward(*args, **kwargs)
        if st.recorder is not None:
            pred = main_output(out)
            st.recorder.record(st.call, _timestep(args, kwargs), sample, None, pred, pred,
                               torch.zeros(sample.shape[0], dtype=torch.bool))
        return out

    def _cfg_call(self, st, sample, args, kwargs):
        lay, forward = st.layout, self.fn_ref.original_forward
        rows, batch = sample.shape[0], st.batch
        if lay.full:
            out = forward(*args, **kwargs)  # the untouched path: bit-identical to the plain pipeline
            full = main_output(out)
        else:
            out = forward(*rows_of(args, rows, lay.run_dev), **rows_of(kwargs, rows, lay.run_dev))
            sub = main_output(out)
            full = sub.index_select(0, lay.src.to(sub.device))
            out = replace_output(out, full)
        uncond, cond = full[:batch], full[batch:]
        ad = st.schedule.adaptive
        if ad is not None and ad.criterion == "shape":
            t = _timestep_tensor(args, kwargs, sample.device)
            st.settle(uncond, cond, sample[batch:], t, st.guidance_weight())
        else:
            st.settle(uncond, cond)
        if st.recorder is not None:
            w = st.guidance_weight()
            g = lay.guided.to(uncond.device).view(-1, *[1] * (uncond.dim() - 1))
            combined = torch.where(g, uncond + w * (cond - uncond), cond)
            st.recorder.record(st.call, _timestep(args, kwargs), sample[batch:], uncond, cond, combined,
                               st.guided.clone(), st.schedule.after)
        return out


def _timestep(args, kwargs) -> float:
    return timestep_value(timestep_input(args, kwargs))


def _timestep_tensor(args, kwargs, device) -> torch.Tensor:
    """The call's timestep as a 0-dim tensor, left where it is (no host read; every row has the same one)."""
    t = timestep_input(args, kwargs)
    if isinstance(t, torch.Tensor):
        return t.detach().reshape(-1)[0] if t.dim() else t.detach()
    return torch.tensor(float(t), device=device)


def _none() -> torch.Tensor:
    return torch.zeros(0, dtype=torch.long)


class ScheduleHandle:
    """What `apply_guidance_schedule` returns: read-outs of the pipeline's current or last run (counts, stop
    calls), also after the schedule was removed."""

    def __init__(self, session: Session, pipe):
        self.session, self.entry = session, session.entry(pipe, create=True)

    @property
    def state(self):
        """The RunState of the pipeline's current or last run (None before its first)."""
        return self.entry.last

    schedule = property(lambda self: self.entry.stack[-1].schedule if self.entry.stack else None)
    recorder = property(lambda self: self.entry.stack[-1].recorder if self.entry.stack else None)
    call = property(lambda self: self.state.call if self.state is not None else 0)
    n_calls = property(lambda self: self.state.n_calls if self.state is not None else None)
    evaluations = property(lambda self: self.state.evaluations if self.state is not None else _none())
    stop_calls = property(lambda self: self.state.stop_calls if self.state is not None else _none())

    def evaluations_per_image(self) -> list[int]:
        return [int(v) for v in self.evaluations]


def guidance_hook_of(pipe_or_denoiser) -> GuidanceHook | None:
    """The guidance hook on a pipeline's denoiser (or on a denoiser module), through HookRegistry."""
    den = pipe_or_denoiser if isinstance(pipe_or_denoiser, torch.nn.Module) else denoiser_of(pipe_or_denoiser)
    return HookRegistry.check_if_exists_or_initialize(den).get_hook(HOOK_NAME)


def session_of(pipe_or_denoiser) -> Session | None:
    hook = guidance_hook_of(pipe_or_denoiser)
    return None if hook is None else hook.session


def run_state_of(pipe_or_denoiser):
    """The RunState of the denoiser call in progress on this thread if there is one, else (given a pipeline)
    that pipeline's last run; None without a guidance schedule."""
    session = session_of(pipe_or_denoiser)
    if session is None:
        return None
    st = session.current()
    if st is not None or isinstance(pipe_or_denoiser, torch.nn.Module):
        return st
    return session.last_run(pipe_or_denoiser)


def _check_schedule(schedule) -> None:
    if not isinstance(schedule, GuidanceSchedule):
        raise ShapefirstError(f"the schedule is {type(schedule).__name__} {schedule!r}, not a GuidanceSchedule",
                              f"pass shapefirst.GuidanceSchedule(...), e.g. GuidanceSchedule(stop={schedule!r})"
                              if isinstance(schedule, (int, float)) else "pass shapefirst.GuidanceSchedule(...)")


def denoisers_of(pipe) -> list:
    """Every denoiser module of the pipeline, in the order they run (families.Family.denoisers: Wan 2.2 has two)."""
    names = family(pipe).denoisers
    found = [getattr(pipe, n, None) for n in names]
    found = [m for m in found if isinstance(m, torch.nn.Module)]
    return found or [denoiser_of(pipe)]


def install(pipe) -> Session:
    """The session on `pipe`'s denoiser(s), created with its hooks (the guidance hook and the offload watch on
    every denoiser, the ControlNet rows on `pipe.controlnet`) if there is none."""
    dens = denoisers_of(pipe)
    hook = HookRegistry.check_if_exists_or_initialize(dens[0]).get_hook(HOOK_NAME)
    session = hook.session if hook is not None and hook.session is not None else Session(dens)
    for den in dens:
        reg = HookRegistry.check_if_exists_or_initialize(den)
        have = reg.get_hook(HOOK_NAME)
        if have is not None and have.session is session:
            continue
        if have is not None:  # a deep copy's dead hook, or another session's on a second expert
            reg.remove_hook(HOOK_NAME, recurse=False)
        hook = GuidanceHook(session)
        reg.register_hook(hook, HOOK_NAME)
        hook.watch = den.register_forward_hook(hook._watch, with_kwargs=True)
        if den not in session.denoisers:
            session.denoisers.append(den)
    _SESSIONS.add(session)
    apply_controlnet_rows(pipe, session)
    return session


def _binding(pipe, schedule: GuidanceSchedule, recorder, session: Session) -> Binding:
    cfg = getattr(denoiser_of(pipe), "config", {})
    if schedule.stops and cfg.get("time_cond_proj_dim") is not None:
        raise ShapefirstError("this model is guidance-distilled (its denoiser takes the guidance scale as an input, "
                              "time_cond_proj_dim) and runs no classifier-free guidance, so there is nothing to "
                              "remove",
                              "drop the guidance stop")
    old = session.binding_of(pipe)
    cache = old.cache if old is not None else None
    return Binding(schedule, recorder, cache, listed_family(pipe) is None, family(pipe))


def apply_guidance_schedule(pipe, schedule: GuidanceSchedule, recorder=None) -> ScheduleHandle:
    """Attach the schedule to `pipe` (replacing what it had applied; a late cache it has stays and follows the
    new schedule from its next call). Call the pipeline as usual with guidance_scale=schedule.scale; remove
    with `remove_guidance_schedule(pipe)`, or use the `guidance_schedule(...)` context manager."""
    _check_schedule(schedule)
    session = install(pipe)
    session.set_top(pipe, _binding(pipe, schedule, recorder, session))
    return ScheduleHandle(session, pipe)


def _sessions_of(pipe) -> list[Session]:
    """The sessions where `pipe` has something applied (its denoiser's, and any it was applied on before a swap)."""
    return [s for s in list(_SESSIONS) if s.depth(pipe)]


def remove_guidance_schedule(pipe) -> None:
    """Remove everything `pipe` applied (schedule, late cache, recorder), on whatever denoiser it was applied
    to; the hooks leave the denoiser once no pipeline sharing it has anything applied."""
    for session in _sessions_of(pipe):
        session.drop(pipe)
        uninstall_if_unused(session)


def uninstall_if_unused(session: Session) -> None:
    """Once no pipeline sharing the denoiser has anything applied: remove every hook the session added (the
    guidance hook, the late caches', the ControlNet rows') and forget the session."""
    if not session.empty():
        return
    session.remove_added()
    for den in session.denoisers:
        reg = HookRegistry.check_if_exists_or_initialize(den)
        hook = reg.get_hook(HOOK_NAME)
        if hook is not None and hook.session is session:
            hook.active = False
            if hook.watch is not None:
                hook.watch.remove()
                hook.watch = None
            reg.remove_hook(HOOK_NAME, recurse=False)
    _SESSIONS.discard(session)


@contextmanager
def guidance_schedule(pipe, schedule: GuidanceSchedule, recorder=None):
    """`with guidance_schedule(pipe, GuidanceSchedule(stop=0.5)) as hook: pipe(prompt, guidance_scale=7.5)`;
    leaving restores what `pipe` had applied before (nothing, or an outer context's schedule)."""
    _check_schedule(schedule)
    session = install(pipe)
    depth = session.push(pipe, _binding(pipe, schedule, recorder, session))
    try:
        yield ScheduleHandle(session, pipe)
    finally:
        session.truncate(pipe, depth)
        uninstall_if_unused(session)
