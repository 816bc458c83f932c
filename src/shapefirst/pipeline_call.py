"""Which pipeline call is running: the call a denoiser call belongs to, found from the call itself.

A denoiser can be shared by several pipelines (`from_pipe`, `Pipeline(**pipe.components)`, img2img,
inpaint and ControlNet pipelines built from a text-to-image one), called by several threads, or called
directly by a user. shapefirst's run state therefore belongs to the pipeline CALL, not to the pipeline
that applied a hook: `running_call()` walks the Python stack of the current thread up from the
denoiser call (`inspect.currentframe`, public since Python 2.1) to the frame of the pipeline's
`__call__` that made it. That frame identifies the run (one frame per call, per thread); its `self`
is the pipeline, whose own public attributes (`do_classifier_free_guidance`, `guidance_scale`,
`num_timesteps`, `scheduler`) describe this call. A denoiser call with no pipeline call above it
(a user's direct call) belongs to no run.

The walk reads `f_locals` only of frames whose first argument is `self` (a few frames from the hook to
the pipeline's `__call__` in practice), on the host: no device value is read.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from diffusers import DiffusionPipeline


@dataclass(frozen=True, eq=False)
class PipelineCall:
    """One pipeline call in progress: the pipeline and the frame of its `__call__` (the run's identity; None
    for a pipeline looked at outside a call, which then has no locals)."""

    pipe: DiffusionPipeline
    frame: object

    def local(self, name: str, default=None):
        """A local variable of the pipeline's `__call__` (its arguments included), e.g. `guidance_scale`."""
        return default if self.frame is None else self.frame.f_locals.get(name, default)


def _self_of(frame):
    code = frame.f_code
    if code.co_argcount and code.co_varnames[0] == "self":
        return frame.f_locals.get("self")
    return None


def running_call() -> PipelineCall | None:
    """The innermost pipeline call on this thread's stack (its `__call__` frame; else, for a pipeline that
    calls its denoiser from a method called outside `__call__`, its outermost method frame), or None."""
    frame = inspect.currentframe()
    pipe, found = None, None
    try:
        while frame is not None:
            obj = _self_of(frame)
            if pipe is None and isinstance(obj, DiffusionPipeline):
                pipe = obj
            if pipe is not None and obj is pipe:
                found = frame
                if frame.f_code.co_name == "__call__":
                    break
            frame = frame.f_back
        return None if found is None else PipelineCall(pipe, found)
    finally:
        del frame


def cfg_of_call(call: PipelineCall, sample: torch.Tensor) -> bool:
    """Does this denoiser call run classifier-free guidance (rows = [uncond..., cond...])? The pipeline's
    own `do_classifier_free_guidance` (a property that reads this pipeline's guidance scale), else the
    local of that name in its `__call__` (PixArt, Sana, ...), else its `guidance_scale` argument (or attribute)
    > 1. Only
    a pipeline with none of these falls back to the latents: two bitwise-equal halves (one host read)."""
    rows = sample.shape[0]
    if rows % 2:
        return False
    flag = getattr(call.pipe, "do_classifier_free_guidance", None)
    if flag is None:
        flag = call.local("do_classifier_free_guidance")
    if flag is None:  # the call's guidance_scale argument, else the pipeline's attribute of that name
        scale = call.local("guidance_scale", getattr(call.pipe, "guidance_scale", None))
        flag = float(scale) > 1.0 if isinstance(scale, (int, float)) else None
    if flag is None:
        half = rows // 2
        return bool(torch.equal(sample[:half], sample[half:]))
    return bool(flag)


def guidance_weight_of_call(call: PipelineCall, default: float) -> float:
    """w of this call: the pipeline's `guidance_scale` attribute, else its `guidance_scale` argument."""
    w = getattr(call.pipe, "guidance_scale", None)
    if w is None or callable(w):
        w = call.local("guidance_scale")
    return float(default if not isinstance(w, (int, float)) else w)


def calls_of_run(pipe) -> int | None:
    """Denoiser calls of the pipeline call in progress: the pipeline's `num_timesteps` (set before its
    loop; img2img's shortened schedule included), else the length of the scheduler's timesteps."""
    n = getattr(pipe, "num_timesteps", None)
    if isinstance(n, int) and n > 0:
        return n
    ts = getattr(pipe.scheduler, "timesteps", None)
    return len(ts) if ts is not None else None


CALL_DEFAULTS = "shapefirst_call_defaults"
"""The class attribute (a dict) of a pipeline class whose calls default to these arguments (report.page.
with_call_defaults): part of its fingerprint (outputs.model_fingerprint), so results made at another size are never
reused."""


def _own_parameters(pipe, method: str = "__call__"):
    """The parameters of `method` as each class in the pipeline's MRO defines it itself, nearest first (a subclass
    whose method only forwards *args, **kwargs is passed over by the callers that look for a name)."""
    for cls in type(pipe).__mro__:
        fn = cls.__dict__.get(method)
        try:
            yield inspect.signature(fn).parameters if callable(fn) else {}
        except (TypeError, ValueError):  # a callable without a signature Python can read
            yield {}


def call_default(pipe, name: str):
    """The value the pipeline's call takes for argument `name` when it is not given: a default its class gives every
    call (report.page.with_call_defaults, CALL_DEFAULTS), else the first `__call__` in its class's MRO that declares
    it (None when none does, or it has no default)."""
    given = getattr(type(pipe), CALL_DEFAULTS, None) or {}
    if name in given:
        return given[name]
    for params in _own_parameters(pipe):
        if name in params:
            return None if params[name].default is inspect.Parameter.empty else params[name].default
    return None


def named_argument(pipe, names: tuple[str, ...], method: str = "__call__", default: str | None = None) -> str:
    """Which of `names` (the alternatives diffusers' pipelines use for one argument) the pipeline's `method` takes,
    from the first class in its MRO whose own method names one; `default` (else names[0]) when none does."""
    for params in _own_parameters(pipe, method):
        for name in names:
            if name in params:
                return name
    return default or names[0]


def per_prompt_argument(pipe, method: str = "__call__") -> str:
    """The argument a pipeline's `__call__` (or `encode_prompt`) counts outputs per prompt with: video pipelines take
    `num_videos_per_prompt`, some (Latte, EasyAnimate) `num_images_per_prompt` like the image ones."""
    return named_argument(pipe, ("num_videos_per_prompt", "num_images_per_prompt"), method, "num_images_per_prompt")


def frames_argument(pipe) -> str:
    """The argument a video pipeline's `__call__` takes its frame count with: `num_frames`, or Latte's
    `video_length`."""
    return named_argument(pipe, ("num_frames", "video_length"))
