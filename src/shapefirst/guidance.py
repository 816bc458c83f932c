"""Guidance schedules: classifier-free guidance only while it matters, one denoiser branch after.

Mechanism (why a hook, not a callback): a `diffusers.hooks` ModelHook on the denoiser sees every
denoiser call with its inputs and outputs. While a sample is guided, both of its rows
([uncond, cond], diffusers' CFG batch order) run as usual. Once it is unguided, only the row of
the kept branch runs, and the hook returns that row's prediction in BOTH halves of the CFG batch,
so the pipeline's own formula u + w (c - u) yields exactly the kept branch (c - c == 0 exactly in
floating point). Hence:
- the pipeline's `__call__` is untouched (no copied pipeline, no private attributes written);
- it can stop before the very first call (stop=0), which a step-end callback cannot;
- every sample of a batch can stop at its own call (adaptive stops), which a callback that
  shrinks `prompt_embeds` cannot;
- the noise predictions are visible, so the same hook records trajectories;
- calls, not steps, are counted: PNDM makes 51 calls for 50 steps, Heun-type solvers ~2 per step.
  A new pipeline run is detected when the scheduler's `timesteps` tensor is replaced
  (every pipeline call runs `scheduler.set_timesteps`), and it has `len(scheduler.timesteps)` calls.

With no stop, every call runs the full batch through the original forward: images are
bit-identical to the plain pipeline.

Families (shapefirst.models.FAMILIES): SD 1.x/2.x and SDXL (UNet), PixArt-alpha/sigma and SD3
(transformer). Every tensor argument whose first dimension is the CFG batch is sliced to the rows
that run, also inside dicts and lists: SDXL's added_cond_kwargs (text_embeds, time_ids), SD3's
pooled_projections, PixArt's encoder_attention_mask, per-row timesteps and added_cond_kwargs
(resolution/aspect_ratio, None below 1024 px, left as is).

Is CFG on for a call? (`cfg_active`): the pipeline's own `do_classifier_free_guidance` where it
has one (SD, SDXL, SD3), else its `guidance_scale` attribute (> 1). PixArt has neither (its
guidance scale is a local variable of `__call__`), so there the rule reads the call itself: CFG
is on iff the row count is even and the two halves of the latent input are bitwise equal. Every
diffusers pipeline builds its CFG input as `torch.cat([latents] * 2)` (then an elementwise
`scale_model_input`), so the halves of a CFG call are always equal, while the images of a
non-CFG batch start from independent noise and never are (unless one passes the same latents for
image i and image i + N on purpose: then a stop would treat them as one image's branches). Nothing
private is read and nothing is written. The guidance weight used to record the combined
prediction there is the schedule's `scale`: pass it as the pipeline's guidance_scale (generate
does).

Not supported: SD3's skip-layer guidance (`skip_guidance_layers`: an extra denoiser call per step
with its own batch) raises a ShapefirstError; SDXL's `guidance_rescale` is applied by the pipeline
but not by the recorder's `combined`.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import torch
from diffusers.hooks import HookRegistry, ModelHook

from .errors import ShapefirstError

HOOK_NAME = "shapefirst_guidance"
AFTER_CHOICES = ("uncond", "cond")


@dataclass(frozen=True)
class AdaptiveStop:
    """Stop guidance per sample once the cosine similarity of its conditional and unconditional
    predictions reaches `threshold` (Adaptive Guidance, Castillo et al. 2023), never before call
    `min_call`; the stop takes effect from the next call.
    A sample whose similarity never reaches the threshold keeps full guidance."""

    threshold: float = 0.99
    min_call: int = 0

    def __post_init__(self):
        if not (0.0 < self.threshold < 1.0) or math.isnan(self.threshold):
            raise ShapefirstError(f"adaptive threshold {self.threshold} is outside (0, 1)",
                                  "pass a cosine similarity such as 0.99")
        if self.min_call < 0:
            raise ShapefirstError(f"adaptive min_call {self.min_call} is negative", "pass 0 or more")

    def settled(self, uncond: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Bool per row: has this sample's guidance direction stopped mattering?"""
        cos = torch.nn.functional.cosine_similarity(uncond.flatten(1).double(), cond.flatten(1).double(), dim=1)
        return cos >= self.threshold


@dataclass(frozen=True)
class GuidanceSchedule:
    """When classifier-free guidance runs, and which single branch runs after it stops.

    scale: the guidance weight w (pass it as the pipeline's `guidance_scale`; shapefirst's
        `generate` does). w <= 1 means no CFG at all, so a stop makes no sense with it.
    stop: fraction of denoiser calls that stay guided (0 = none, 1 or None = all). The first
        unguided call is k = round(stop * n_calls), halves rounded up.
    stop_step: the index k of the first unguided denoiser call, counted over the scheduler's
        real timesteps (calls, not steps). Give `stop` or `stop_step`, not both.
    after: "uncond" keeps the unconditional branch after the stop (the paper: w = 0). With a
        negative prompt, the unconditional branch IS the negative prompt's branch, so the late
        calls then follow the negative prompt. "cond" keeps the conditional branch (what diffusers'
        SDCFGCutoffCallback does, there from the step after its cutoff index).
    adaptive: optional per-sample stop (see AdaptiveStop); combined with a fixed stop, a sample
        stops at whichever comes first.
    start / start_step: the first guided call (fraction or index; default 0). Calls before it run
        the `after` branch alone: a guidance interval [start, stop) (Guidance Interval,
        Kynkaanniemi et al. 2024, uses after="cond" outside the interval).
    """

    scale: float = 7.5
    stop: float | None = None
    stop_step: int | None = None
    after: str = "uncond"
    adaptive: AdaptiveStop | None = None
    start: float | None = None
    start_step: int | None = None

    def __post_init__(self):
        if self.scale is None or math.isnan(self.scale) or self.scale < 0:
            raise ShapefirstError(f"guidance scale {self.scale} is not a number >= 0", "pass e.g. --guidance 7.5")
        for what, frac, step, eg, first in (("stop", self.stop, self.stop_step, 0.5, "unguided"),
                                            ("start", self.start, self.start_step, 0.2, "guided")):
            if frac is not None and step is not None:
                raise ShapefirstError(f"both a {what} fraction and a {what} step were given", "pass only one of them")
            if frac is not None and (math.isnan(frac) or not 0.0 <= frac <= 1.0):
                raise ShapefirstError(f"guidance {what} {frac} is outside [0, 1]",
                                      f"pass a fraction of the denoiser calls, e.g. {eg}")
            if step is not None and (int(step) != step or step < 0):
                raise ShapefirstError(f"guidance {what} step {step} is not an integer >= 0",
                                      f"pass the index of the first {first} denoiser call")
        if self.start is not None and self.stop is not None and self.start > self.stop:
            raise ShapefirstError(f"guidance start {self.start} is after the stop {self.stop}",
                                  "pass start <= stop (the guided interval is [start, stop))")
        if self.after not in AFTER_CHOICES:
            raise ShapefirstError(f"after={self.after!r} is not one of {AFTER_CHOICES}",
                                  "pass 'uncond' (the paper) or 'cond' (diffusers' callback)")
        if self.stops and self.scale <= 1.0:
            raise ShapefirstError(f"a guidance stop was given with guidance scale {self.scale} <= 1, which runs no guidance",
                                  "raise the guidance scale above 1 or drop the stop")

    @property
    def stops(self) -> bool:
        """Can this schedule stop guidance at all?"""
        fixed = (self.stop is not None and self.stop < 1.0) or self.stop_step is not None
        late_start = bool(self.start) or bool(self.start_step)
        return fixed or late_start or self.adaptive is not None

    def first_guided_call(self, n_calls: int) -> int:
        """k0: calls before k0 run one branch (a guidance interval starts late); 0 = from the first call."""
        if self.start_step is not None:
            if self.start_step > n_calls:
                raise ShapefirstError(f"guidance start step {self.start_step} is beyond the {n_calls} denoiser calls "
                                      "of this run", f"pass a step between 0 and {n_calls}")
            return int(self.start_step)
        if self.start is None:
            return 0
        return min(n_calls, int(math.floor(self.start * n_calls + 0.5)))

    def first_unguided_call(self, n_calls: int) -> int:
        """k: calls 0..k-1 are guided, k.. are not (n_calls = never stop)."""
        if self.stop_step is not None:
            if self.stop_step > n_calls:
                raise ShapefirstError(f"guidance stop step {self.stop_step} is beyond the {n_calls} denoiser calls of this run",
                                      f"pass a step between 0 and {n_calls}")
            return int(self.stop_step)
        if self.stop is None:
            return n_calls
        return min(n_calls, int(math.floor(self.stop * n_calls + 0.5)))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GuidanceSchedule":
        d = dict(d)
        if d.get("adaptive"):
            d["adaptive"] = AdaptiveStop(**d["adaptive"])
        return cls(**d)


def _rows_of(x: Any, rows: int, idx: torch.Tensor) -> Any:
    """Slice every tensor whose first dimension is the CFG batch; recurse into dicts, lists, tuples."""
    if isinstance(x, torch.Tensor):
        return x[idx.to(x.device)] if x.dim() > 0 and x.shape[0] == rows else x
    if isinstance(x, dict):
        return {k: _rows_of(v, rows, idx) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_rows_of(v, rows, idx) for v in x)
    return x


def _main_output(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return out[0]
    return out.sample


def _replace_output(out: Any, new: torch.Tensor) -> Any:
    if isinstance(out, torch.Tensor):
        return new
    if isinstance(out, tuple):
        return (new,) + tuple(out[1:])
    if isinstance(out, list):
        return [new] + list(out[1:])
    out.sample = new
    return out


def _timestep(args, kwargs) -> float:
    t = args[1] if len(args) > 1 else kwargs.get("timestep")
    return float(t.flatten()[0]) if isinstance(t, torch.Tensor) else float(t)


def latent_input(args, kwargs):
    """The denoiser's latent input: positional first argument (UNet, PixArt) or `sample=` /
    `hidden_states=` (SD3 passes every argument by keyword)."""
    if args:
        return args[0]
    return kwargs["sample"] if "sample" in kwargs else kwargs.get("hidden_states")


def cfg_active(pipe, sample: torch.Tensor) -> bool:
    """Does this denoiser call run classifier-free guidance (rows = [uncond..., cond...])?
    See the module docstring for the rule per family."""
    rows = sample.shape[0]
    if rows % 2:
        return False
    flag = getattr(pipe, "do_classifier_free_guidance", None)
    if flag is None and hasattr(pipe, "guidance_scale") and not callable(pipe.guidance_scale):
        try:
            flag = float(pipe.guidance_scale) > 1.0
        except (TypeError, ValueError):
            flag = None
    if flag is None:  # PixArt: read the call itself
        half = rows // 2
        return bool(torch.equal(sample[:half], sample[half:]))
    return bool(flag)


def denoiser_of(pipe) -> torch.nn.Module:
    for name in ("unet", "transformer"):
        mod = getattr(pipe, name, None)
        if isinstance(mod, torch.nn.Module):
            return mod
    raise ShapefirstError(f"{type(pipe).__name__} has no `unet` or `transformer` denoiser",
                          "pass a diffusers text-to-image pipeline")


class GuidanceHook(ModelHook):
    """The hook that applies a GuidanceSchedule to one pipeline's denoiser (see module docstring)."""

    def __init__(self, pipe, schedule: GuidanceSchedule, recorder=None):
        super().__init__()
        self.pipe = pipe
        self.schedule = schedule
        self.recorder = recorder
        self.cfg_now = None  # did the current (last) denoiser call run CFG? (see cfg_active)
        # Read by late-stage caches (shapefirst.cache) while the denoiser runs:
        self.late = False  # this call is past the guided phase for every sample (one row per sample)
        self.may_stop_next = False  # some sample is guided now and may be unguided from the next call
        self.row_sample = None  # image index of every row the denoiser runs in this call
        self.row_branch = None  # its branch: 0 uncond, 1 cond (CFG calls)
        self._timesteps_ref = None
        self.reset_run(0)

    # -- run bookkeeping -------------------------------------------------------------
    def reset_run(self, batch: int):
        self.call = 0
        self.batch = batch
        self.evaluations = torch.zeros(batch, dtype=torch.long)  # rows through the denoiser, per image
        self.stopped = torch.zeros(batch, dtype=torch.bool)  # adaptive stops, per image
        self.stop_calls = torch.full((batch,), -1, dtype=torch.long)  # first unguided call, -1 = never
        self.n_calls = None

    def _maybe_new_run(self, batch: int):
        ts = getattr(self.pipe.scheduler, "timesteps", None)
        if ts is not self._timesteps_ref or batch != self.batch:
            self._timesteps_ref = ts
            self.reset_run(batch)
            self.n_calls = len(ts) if ts is not None else None
            if self.recorder is not None:
                self.recorder.start_run(self.pipe, batch)

    def _cfg_active(self, sample: torch.Tensor) -> bool:
        return cfg_active(self.pipe, sample)

    def guidance_weight(self) -> float:
        """w of this run: the pipeline's guidance_scale attribute, else (PixArt) the schedule's."""
        w = getattr(self.pipe, "guidance_scale", None)
        return float(self.schedule.scale if w is None or callable(w) else w)

    def guided_now(self) -> torch.Tensor:
        """Bool per image: does this call run guidance for it?"""
        n = self.n_calls if self.n_calls is not None else 10**9
        k0, k = self.schedule.first_guided_call(n), self.schedule.first_unguided_call(n)
        g = torch.full((self.batch,), k0 <= self.call < k, dtype=torch.bool)
        ad = self.schedule.adaptive
        if ad is not None:
            g &= ~self.stopped
        return g

    def _set_phase(self, guided: torch.Tensor) -> None:
        n = self.n_calls if self.n_calls is not None else 10**9
        k0, k = self.schedule.first_guided_call(n), self.schedule.first_unguided_call(n)
        self.late = self.call >= k0 and not bool(guided.any())
        ad = self.schedule.adaptive
        self.may_stop_next = bool(guided.any()) and (self.call + 1 >= k or (ad is not None and self.call >= ad.min_call))

    # -- the hook ----------------------------------------------------------------------
    def new_forward(self, module, *args, **kwargs):
        forward = self.fn_ref.original_forward
        if kwargs.get("skip_layers") is not None:
            raise ShapefirstError("SD3 skip-layer guidance (skip_guidance_layers) is not supported with a guidance "
                                  "schedule or trajectory", "call the pipeline without skip_guidance_layers")
        sample = latent_input(args, kwargs)
        rows = sample.shape[0]
        self.cfg_now = self._cfg_active(sample)
        if not self.cfg_now:
            self._maybe_new_run(rows)
            self.late, self.may_stop_next = False, False
            self.row_sample, self.row_branch = torch.arange(rows), torch.ones(rows, dtype=torch.long)
            out = forward(*args, **kwargs)
            self.evaluations += 1
            if self.recorder is not None:
                pred = _main_output(out)
                self.recorder.record(self.call, _timestep(args, kwargs), sample, None, pred, pred,
                                     torch.zeros(rows, dtype=torch.bool))
            self.call += 1
            return out

        batch = rows // 2
        self._maybe_new_run(batch)
        guided = self.guided_now()
        self._set_phase(guided)
        if bool(guided.all()):
            self.row_sample, self.row_branch = torch.arange(rows) % batch, torch.arange(rows) // batch
            out = forward(*args, **kwargs)  # the untouched path: bit-identical to the plain pipeline
            full = _main_output(out)
        else:
            kept = torch.arange(batch) + (batch if self.schedule.after == "cond" else 0)
            uncond_rows = torch.arange(batch)[guided]
            cond_rows = torch.arange(batch)[guided] + batch
            run_rows = torch.sort(torch.cat([uncond_rows, cond_rows, kept[~guided]])).values
            self.row_sample, self.row_branch = run_rows % batch, run_rows // batch
            sub_args = _rows_of(args, rows, run_rows)
            sub_kwargs = _rows_of(kwargs, rows, run_rows)
            out = forward(*sub_args, **sub_kwargs)
            sub = _main_output(out)
            full = sub.new_empty((rows,) + tuple(sub.shape[1:]))
            full[run_rows.to(sub.device)] = sub
            pos = {int(r): i for i, r in enumerate(run_rows)}
            for i in torch.nonzero(~guided).flatten().tolist():
                branch = sub[pos[int(kept[i])]]
                full[i] = branch
                full[i + batch] = branch
            out = _replace_output(out, full)
            newly = (self.stop_calls < 0) & ~guided
            self.stop_calls[newly] = self.call
        self.evaluations += torch.where(guided, 2, 1)

        uncond, cond = full[:batch], full[batch:]
        if self.schedule.adaptive is not None and bool(guided.any()):
            ad = self.schedule.adaptive
            if self.call >= ad.min_call:
                settle = ad.settled(uncond.float(), cond.float()) & guided.to(uncond.device)
                self.stopped |= settle.cpu()
        if self.recorder is not None:
            w = self.guidance_weight()
            combined = torch.where(guided.view(-1, *[1] * (uncond.dim() - 1)).to(uncond.device),
                                   uncond + w * (cond - uncond), cond)
            self.recorder.record(self.call, _timestep(args, kwargs), sample[batch:], uncond, cond, combined, guided,
                                 self.schedule.after)
        self.call += 1
        return out

    def evaluations_per_image(self) -> list[int]:
        return [int(v) for v in self.evaluations]


def apply_guidance_schedule(pipe, schedule: GuidanceSchedule, recorder=None) -> GuidanceHook:
    """Attach the schedule to `pipe` (replacing an earlier one). Returns the hook (counts, stop calls).

    Call the pipeline as usual with guidance_scale=schedule.scale; remove with
    `remove_guidance_schedule(pipe)` or use the `guidance_schedule(...)` context manager."""
    from .models import family_of_pipe

    family_of_pipe(pipe)  # a clear "not supported" error for other pipelines
    cfg = getattr(denoiser_of(pipe), "config", {})
    if schedule.stops and cfg.get("time_cond_proj_dim") is not None:
        raise ShapefirstError("this model is guidance-distilled (its denoiser takes the guidance scale as an input, "
                              "time_cond_proj_dim) and runs no classifier-free guidance, so there is nothing to remove",
                              "drop the guidance stop")
    remove_guidance_schedule(pipe)
    hook = GuidanceHook(pipe, schedule, recorder)
    HookRegistry.check_if_exists_or_initialize(denoiser_of(pipe)).register_hook(hook, HOOK_NAME)
    return hook


def remove_guidance_schedule(pipe) -> None:
    den = denoiser_of(pipe)
    reg = getattr(den, "_diffusers_hook", None)
    if reg is not None and reg.get_hook(HOOK_NAME) is not None:
        reg.remove_hook(HOOK_NAME, recurse=False)


@contextmanager
def guidance_schedule(pipe, schedule: GuidanceSchedule, recorder=None):
    """`with guidance_schedule(pipe, GuidanceSchedule(stop=0.5)) as hook: pipe(prompt, guidance_scale=7.5)`"""
    hook = apply_guidance_schedule(pipe, schedule, recorder)
    try:
        yield hook
    finally:
        remove_guidance_schedule(pipe)
