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
  A run has the pipeline's `num_timesteps` calls (img2img's shortened schedule included; else
  `len(scheduler.timesteps)`); see RunState for how runs begin and end.

Cooperating hooks (the diffusers way): the guidance hook, the late caches (shapefirst.cache), the
ControlNet hook (ControlNetRows), attention capture and the K/V intervention share ONE RunState per
pipeline (`run_state_of(pipe)`), created by `apply_guidance_schedule` and read through its public
fields. Every hook is stateful and implements `reset_state`; each new run resets them all through
`HookRegistry.reset_stateful_hooks`. Replacing the schedule keeps the RunState (what is bound to it
follows the new schedule); removing it removes the caches and the ControlNet hook too.

GPU cost: the per-call path makes no host synchronisation. The rows that run, the gather that
refills the CFG batch and the per-image counts are RowLayouts built on the denoiser's device once
per pattern of guided images and reused; bookkeeping (counts, guided flags) lives on the host and
never reads a device value. Exceptions, each a value a feature must read: the adaptive criterion
(cosine or shape) keeps its decision on the device and reads it back once per call (after
`AdaptiveStop.decides_from`); the shape criterion derives x0-hat on the device (shapefirst.trace's
predicted_x0 with the timestep tensor: no read); PixArt's CFG
rule compares the latent halves (one read per call); the trajectory recorder copies its tensors to
the host; pipelines detected by structure, not class, check their CFG batch once per run.

Pipelines (shapefirst.models): the classes of FAMILIES (text-to-image, SD img2img / inpainting /
ControlNet, SDXL img2img incl. the refiner layout), and others detected by their structure
(models.family_by_structure), whose CFG batch is verified while they run. ControlNet: the ControlNet
runs before the denoiser on the same CFG batch; ControlNetRows runs only the rows the denoiser will
run (from a run's second call on) and the guidance hook slices its residuals (the denoiser's
down/mid_block_additional_residual kwargs) like every other CFG-batch input; guess_mode (the
ControlNet called with the conditional rows only, zeros for the unconditional ones) and the
conditioning scale pass through unchanged.

With no stop, every call runs the full batch through the original forward: images are
bit-identical to the plain pipeline.

Other denoiser set-ups (tests/test_pipelines.py, tests/test_compile_offload.py): a LoRA
(`load_lora_weights`, unfused or `fuse_lora`), an IP-Adapter (`ip_adapter_image_embeds`: the image
embeddings are an added_cond_kwargs list, sliced like every CFG-batch input), attention slicing and fused
QKV projections need nothing special. torch.compile: `pipe.unet = torch.compile(pipe.unet)` keeps the hook
outside the compiled module (fullgraph works; a stop adds one graph, the batch dimension then being
dynamic; each late-cache phase one more); `pipe.unet.compile()` in place runs the hook inside it, so the
RunState's bookkeeping (prepare, finish, settle) is excluded from the graph (torch.compiler.disable: graph
breaks, no fullgraph). enable_model_cpu_offload: apply the schedule first. Offload installed before the
schedule wraps the guidance hook for one call only (diffusers re-installs accelerate's hooks over the
original forward after every call); a torch forward hook on the denoiser notices a call that bypassed the
guidance hook and raises a ShapefirstError instead of returning unguided images. A removed hook that some
wrapper still calls passes every call through.

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
from .pipeline import (  # noqa: F401 (public here too)
    cfg_active,
    denoiser_of,
    latent_input,
    timestep_input,
    timestep_value,
)

HOOK_NAME = "shapefirst_guidance"
AFTER_CHOICES = ("uncond", "cond")
CRITERIA = ("cosine", "shape")
DEFAULT_SHAPE_TOLERANCE = 0.02
"""The shape criterion's tolerance when none is given, and `--adaptive-shape auto` for a model other than the
embedded one (whose calibrated value is recipe.json's recommended "adaptive_shape_tolerance"): the relative
change of the low band of x0-hat between consecutive calls, per sample. A conservative choice: the change per
call shrinks with more steps, so a sample settles later (or never: full guidance) with fewer steps. Measured on
the embedded model (8 prompts, DDIM, patience 2): at 50 steps the first unguided call is 33 of 50 on average
(PSNR 38 dB against full guidance), at 20 steps most samples never settle."""
DEFAULT_PATIENCE = 2
SHAPE_EPS = 1e-12


def _real(x) -> bool:
    """A real number (numpy scalars included; not a bool, not a string)."""
    if isinstance(x, (bool, str)) or x is None:
        return False
    try:
        float(x)
    except (TypeError, ValueError):
        return False
    return True


@dataclass(frozen=True)
class AdaptiveStop:
    """A per-sample stop of guidance, decided while it runs, never before call `min_call`; the stop
    takes effect from the next call. A sample that never meets its criterion keeps full guidance.

    criterion "cosine" (the default): once the cosine similarity of the sample's conditional and
        unconditional predictions reaches `threshold` (Adaptive Guidance, Castillo et al. 2023).
    criterion "shape": once the sample's shape has settled: the low band (shapefirst.frequency.split_bands,
        FFT disc of `radius` x Nyquist) of its guided x0-hat (the combined CFG prediction's x0-hat, the one
        the sampler follows, derived as the trajectory recorder does: shapefirst.trace.predicted_x0) changes
        by less than `tolerance` (||low_c - low_c-1|| / ||low_c||) at `patience` consecutive calls.
        The earliest decision is at call max(min_call, patience).
    `threshold` is the cosine criterion's; `tolerance`, `patience` and `radius` the shape criterion's
    (None: DEFAULT_SHAPE_TOLERANCE, DEFAULT_PATIENCE, frequency.DEFAULT_RADIUS)."""

    threshold: float = 0.99
    min_call: int = 0
    criterion: str = "cosine"
    tolerance: float | None = None
    patience: int | None = None
    radius: float | None = None

    def __post_init__(self):
        if self.criterion not in CRITERIA:
            raise ShapefirstError(f"adaptive criterion {self.criterion!r} is not one of {CRITERIA}",
                                  "pass 'cosine' (branch agreement) or 'shape' (x0-hat's low band settled)")
        if isinstance(self.min_call, bool) or int(self.min_call) != self.min_call or self.min_call < 0:
            raise ShapefirstError(f"adaptive min_call {self.min_call} is not an integer >= 0", "pass 0 or more")
        if self.criterion == "cosine":
            if math.isnan(self.threshold) or not 0.0 < self.threshold < 1.0:
                raise ShapefirstError(f"adaptive threshold {self.threshold} is outside (0, 1)",
                                      "pass a cosine similarity such as 0.99")
            given = [k for k in ("tolerance", "patience", "radius") if getattr(self, k) is not None]
            if given:
                raise ShapefirstError(f"adaptive {', '.join(given)}: only the shape criterion takes "
                                      f"{'it' if len(given) == 1 else 'them'}, and this one is 'cosine'",
                                      "pass criterion='shape' as well, or drop them")
            return
        from .frequency import DEFAULT_RADIUS

        tol = DEFAULT_SHAPE_TOLERANCE if self.tolerance is None else self.tolerance
        pat = DEFAULT_PATIENCE if self.patience is None else self.patience
        rad = DEFAULT_RADIUS if self.radius is None else self.radius
        if not _real(tol) or not math.isfinite(tol) or tol <= 0:
            raise ShapefirstError(f"adaptive shape tolerance {tol} is not a finite number > 0",
                                  f"pass a relative change such as {DEFAULT_SHAPE_TOLERANCE}")
        if not _real(pat) or not math.isfinite(pat) or int(pat) != pat or pat < 1:
            raise ShapefirstError(f"adaptive patience {pat} is not an integer >= 1",
                                  f"pass the settled calls in a row needed, e.g. {DEFAULT_PATIENCE}")
        if not _real(rad) or math.isnan(rad) or not 0.0 < rad <= 1.0:
            raise ShapefirstError(f"adaptive radius {rad} is outside (0, 1]",
                                  f"pass a fraction of the Nyquist frequency, e.g. {DEFAULT_RADIUS}")
        object.__setattr__(self, "tolerance", float(tol))
        object.__setattr__(self, "patience", int(pat))
        object.__setattr__(self, "radius", float(rad))

    @property
    def decides_from(self) -> int:
        """The earliest call at which a sample can be found settled (it is unguided from the next call)."""
        return self.min_call if self.criterion == "cosine" else max(self.min_call, self.patience)

    def settled(self, uncond: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Cosine criterion. Bool per row: has this sample's guidance direction stopped mattering?"""
        cos = torch.nn.functional.cosine_similarity(uncond.flatten(1).double(), cond.flatten(1).double(), dim=1)
        return cos >= self.threshold

    def shape_change(self, low: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
        """Shape criterion. Per row: relative change ||low - prev|| / (||low|| + eps) of x0-hat's low band."""
        low, prev = low.flatten(1), prev.flatten(1)
        return (low - prev).norm(dim=1) / (low.norm(dim=1) + SHAPE_EPS)

    def to_dict(self) -> dict:
        """The constructor's arguments: {threshold, min_call} for the cosine criterion (as before the shape
        criterion existed), {criterion, tolerance, patience, radius, min_call} for the shape criterion."""
        if self.criterion == "cosine":
            return {"threshold": self.threshold, "min_call": self.min_call}
        return {"criterion": self.criterion, "tolerance": self.tolerance, "patience": self.patience,
                "radius": self.radius, "min_call": self.min_call}

    @classmethod
    def from_dict(cls, d: dict) -> "AdaptiveStop":
        return cls(**d)

    @property
    def label(self) -> str:
        """How a sweep names it: 'adaptive=0.99' or 'adaptive-shape=0.01'."""
        return f"adaptive={self.threshold}" if self.criterion == "cosine" else f"adaptive-shape={self.tolerance}"


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
    adaptive: optional per-sample stop (see AdaptiveStop: cosine or shape criterion); combined with a
        fixed stop, a sample stops at whichever comes first.
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
        if not _real(self.scale) or not math.isfinite(self.scale) or self.scale < 0:
            raise ShapefirstError(f"guidance scale {self.scale} is not a finite number >= 0", "pass e.g. --guidance 7.5")
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
        d = asdict(self)
        d["adaptive"] = self.adaptive.to_dict() if self.adaptive is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "GuidanceSchedule":
        d = dict(d)
        if d.get("adaptive"):
            d["adaptive"] = AdaptiveStop.from_dict(d["adaptive"])
        return cls(**d)


def _rows_of(x: Any, rows: int, idx: torch.Tensor) -> Any:
    """Slice every tensor whose first dimension is the CFG batch; recurse into dicts, lists, tuples.
    `idx` lives on the denoiser's device (a no-op `.to` for tensors there)."""
    if isinstance(x, torch.Tensor):
        return x[idx.to(x.device)] if x.dim() > 0 and x.shape[0] == rows else x
    if isinstance(x, dict):
        return {k: _rows_of(v, rows, idx) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_rows_of(v, rows, idx) for v in x)
    return x


def _expand_rows(x: Any, n_run: int, src: torch.Tensor) -> Any:
    """The inverse of _rows_of for outputs: every tensor with `n_run` rows becomes the full CFG batch,
    row r taken from computed row src[r] (recursing into lists and tuples)."""
    if isinstance(x, torch.Tensor):
        return x.index_select(0, src.to(x.device)) if x.dim() > 0 and x.shape[0] == n_run else x
    if isinstance(x, (list, tuple)):
        return type(x)(_expand_rows(v, n_run, src) for v in x)
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
    return timestep_value(timestep_input(args, kwargs))


def _timestep_tensor(args, kwargs, device) -> torch.Tensor:
    """The call's timestep as a 0-dim tensor, left where it is (no host read; every row has the same one)."""
    t = timestep_input(args, kwargs)
    if isinstance(t, torch.Tensor):
        return t.detach().reshape(-1)[0] if t.dim() else t.detach()
    return torch.tensor(float(t), device=device)


def guidance_hook_of(pipe_or_denoiser) -> "GuidanceHook | None":
    """The guidance hook on a pipeline's denoiser (or on a denoiser module), through HookRegistry."""
    den = pipe_or_denoiser if isinstance(pipe_or_denoiser, torch.nn.Module) else denoiser_of(pipe_or_denoiser)
    return HookRegistry.check_if_exists_or_initialize(den).get_hook(HOOK_NAME)


def run_state_of(pipe_or_denoiser) -> "RunState | None":
    """The RunState that shapefirst's hooks on this pipeline share, or None without a guidance schedule."""
    hook = guidance_hook_of(pipe_or_denoiser)
    return None if hook is None else hook.state


@dataclass(frozen=True)
class RowLayout:
    """The rows one denoiser call runs, for one pattern of guided images; built once per pattern and
    device, then reused (the per-call path creates no index tensors).

    run: host LongTensor, the rows of the CFG batch that run, in order. On the denoiser's device:
    run_dev (the same), src (for each of the 2N CFG rows, the computed row that fills it: an unguided
    image's kept row fills both its halves), row_sample / row_branch (image and branch, 0 uncond 1 cond,
    of every computed row), kept_pos / kept_sample (computed rows of the branch kept after the stop, and
    their images), sample_count (computed rows per image), guided (bool per image)."""

    run: torch.Tensor
    run_dev: torch.Tensor
    src: torch.Tensor
    row_sample: torch.Tensor
    row_branch: torch.Tensor
    kept_pos: torch.Tensor
    kept_sample: torch.Tensor
    sample_count: torch.Tensor
    guided: torch.Tensor
    full: bool


def _layout(run: torch.Tensor, src: torch.Tensor, n: int, kept_branch: int, guided: torch.Tensor, device) -> RowLayout:
    sample, branch = run % n, run // n
    kept_pos = torch.nonzero(branch == kept_branch).flatten()
    to = lambda t: t.to(device)  # noqa: E731
    return RowLayout(run, to(run), to(src), to(sample), to(branch), to(kept_pos), to(sample[kept_pos]),
                     to(torch.bincount(sample, minlength=n)), to(guided), bool(guided.all()))


def cfg_layout(guided: tuple[bool, ...], after: str, device) -> RowLayout:
    """The layout of a CFG call ([uncond 0..N-1, cond 0..N-1]) where image i is guided iff guided[i]."""
    n = len(guided)
    g, ar = torch.tensor(guided, dtype=torch.bool), torch.arange(n)
    kept = ar + (n if after == "cond" else 0)
    run = torch.sort(torch.cat([ar[g], ar[g] + n, kept[~g]])).values
    pos = torch.full((2 * n,), -1, dtype=torch.long)
    pos[run] = torch.arange(len(run))
    src = pos.clone()
    src[ar[~g]] = pos[kept[~g]]
    src[ar[~g] + n] = pos[kept[~g]]
    return _layout(run, src, n, 1 if after == "cond" else 0, g, device)


def plain_layout(rows: int, device) -> RowLayout:
    """A call without CFG: every row is the conditional row of its own image."""
    ar, one = torch.arange(rows), torch.ones(rows, dtype=torch.long)
    to = lambda t: t.to(device)  # noqa: E731
    return RowLayout(ar, to(ar), to(ar), to(ar), to(one), to(ar), to(ar), to(one), to(one.bool()), True)


def _supported() -> str:
    from .models import SUPPORTED

    return SUPPORTED


def calls_of_run(pipe) -> int | None:
    """Denoiser calls of the pipeline call in progress: the pipeline's `num_timesteps` (set before its
    loop; img2img's shortened schedule included), else the length of the scheduler's timesteps."""
    n = getattr(pipe, "num_timesteps", None)
    if isinstance(n, int) and n > 0:
        return n
    ts = getattr(pipe.scheduler, "timesteps", None)
    return len(ts) if ts is not None else None


class RunState:
    """What shapefirst's hooks on one pipeline share while it runs: one object per pipeline, created by
    `apply_guidance_schedule` and kept when the schedule is replaced (so everything bound to it follows
    the new schedule). Public fields, read by the late caches, the ControlNet hook, attention capture
    and the K/V intervention:
      schedule, recorder    what the guidance hook applies
      run                   runs begun so far; call: index of the current (or next) denoiser call
      batch, n_calls        images and denoiser calls of the current run (calls_of_run)
      cfg_now, guided       does the current call run CFG; bool per image (host): is it guided now
      layout                the current call's RowLayout (row_sample, row_branch: the rows that run)
      late                  past the guided phase for every sample (one row per sample)
      may_stop_next         some sample is guided now and may be unguided from the next call
      evaluations, stop_calls  per image (host): rows through the denoiser; first unguided call (-1 never)
      stopped               adaptive stops per image, on the denoiser's device (None before any)
      shape_low, shape_streak  the shape criterion's state per image, on the denoiser's device: the low band of
                            the last guided call's x0-hat, and the calls in a row it has been settled
      listeners             objects whose on_call(state) runs once per call, when the call is prepared (before
                            the denoiser's own forward): per-call decisions that read host counters (the
                            DeepCache phase) are made there, outside a compiled denoiser, which then sees
                            only their boolean results (torch.compile: no recompile per call)
    Runs: a run ends after n_calls calls, or when diffusers resets the stateful hooks (every shapefirst
    hook implements `reset_state`; pipelines call `maybe_free_model_hooks` at the end, which resets
    denoisers with diffusers' CacheMixin). The next call then begins a new run, which resets every
    stateful hook of the denoiser (`HookRegistry.reset_stateful_hooks`). A run cut short (an exception)
    is caught by the scheduler's `timesteps` being a new tensor: every pipeline call runs set_timesteps."""

    def __init__(self, pipe, schedule: "GuidanceSchedule", recorder=None):
        self.pipe, self.denoiser = pipe, denoiser_of(pipe)
        self.schedule, self.recorder = schedule, recorder
        self.run, self.finished, self.prepared = 0, True, False
        self.verify = False  # check the CFG batch layout (pipelines detected by structure, not by class)
        self.timesteps = None  # the scheduler's timesteps tensor of the current run (compared by identity)
        self.layouts: dict = {}
        self.cfg_now, self.layout = None, None
        self.listeners: list = []  # objects with on_call(state), run once per call at the end of `prepare`
        self._reset(0)

    def _reset(self, batch: int) -> None:
        self.call, self.batch, self.n_calls = 0, batch, None
        self.evaluations = torch.zeros(batch, dtype=torch.long)
        self.stop_calls = torch.full((batch,), -1, dtype=torch.long)
        self.stopped = None
        self.shape_low = self.shape_streak = None
        self.guided = torch.ones(batch, dtype=torch.bool)
        self.late = self.may_stop_next = False

    def bind(self, schedule: "GuidanceSchedule", recorder=None) -> None:
        """A new schedule (and recorder) for the next run."""
        self.schedule, self.recorder = schedule, recorder
        self.layouts.clear()
        self.end_run()

    def end_run(self) -> None:
        """The next denoiser call begins a new run (the last run's counts stay readable until then)."""
        self.finished = True

    @property
    def row_sample(self) -> torch.Tensor:
        return self.layout.row_sample

    def needs_new_run(self, batch: int) -> bool:
        ts = getattr(self.pipe.scheduler, "timesteps", None)
        done = self.n_calls is not None and self.call >= self.n_calls
        if self.verify and done and not self.finished and ts is self.timesteps:
            raise ShapefirstError(f"{type(self.pipe).__name__} makes more denoiser calls in one run than its "
                                  f"{self.n_calls} timesteps (extra guidance passes?), which guidance schedules do not "
                                  "support", f"use a pipeline with diffusers' standard CFG loop, e.g. {_supported()}")
        return self.finished or done or batch != self.batch or ts is not self.timesteps

    def verify_cfg_batch(self, sample: torch.Tensor) -> None:
        """For a pipeline detected by its structure (models.family_by_structure), once per run: a CFG call
        must be [uncond, cond] of the same latents (two bitwise-equal halves: one host read per run)."""
        rows = sample.shape[0]
        if not getattr(self.pipe, "do_classifier_free_guidance", False):
            return
        if rows % 2 or not torch.equal(sample[:rows // 2], sample[rows // 2:]):
            raise ShapefirstError(f"{type(self.pipe).__name__} runs classifier-free guidance with a denoiser batch of "
                                  f"{rows} rows that is not [uncond, cond] of the same latents, which guidance schedules "
                                  "do not support", f"use a pipeline with diffusers' standard CFG batch, e.g. {_supported()}")

    def begin_run(self, batch: int) -> None:
        HookRegistry.check_if_exists_or_initialize(self.denoiser).reset_stateful_hooks(recurse=True)
        self._reset(batch)
        self.finished, self.run = False, self.run + 1
        self.timesteps = getattr(self.pipe.scheduler, "timesteps", None)
        self.n_calls = calls_of_run(self.pipe)
        if self.recorder is not None:
            self.recorder.start_run(self.pipe, batch)

    def guided_at(self, call: int) -> torch.Tensor:
        """Bool per image (host): is it guided at `call`? With adaptive stops this reads the device's
        stop flags once (the one device-to-host read of a call, only after `AdaptiveStop.decides_from`)."""
        n = self.n_calls if self.n_calls is not None else 10**9
        k0, k = self.schedule.first_guided_call(n), self.schedule.first_unguided_call(n)
        g = torch.full((self.batch,), k0 <= call < k, dtype=torch.bool)
        ad = self.schedule.adaptive
        if ad is not None and self.stopped is not None and call > ad.decides_from and bool(g.any()):
            g &= ~self.stopped.cpu()
        return g

    def _set_phase(self, guided: torch.Tensor) -> None:
        n = self.n_calls if self.n_calls is not None else 10**9
        k0, k = self.schedule.first_guided_call(n), self.schedule.first_unguided_call(n)
        ad, some = self.schedule.adaptive, bool(guided.any())
        self.late = self.call >= k0 and not some
        self.may_stop_next = some and (self.call + 1 >= k or (ad is not None and self.call >= ad.decides_from))

    @torch.compiler.disable
    def prepare(self, sample: torch.Tensor) -> None:
        """Begin the current denoiser call (idempotent until `finish`): new run?, CFG?, guided images, layout."""
        if self.prepared:
            return
        rows = sample.shape[0]
        self.cfg_now = cfg_active(self.pipe, sample)
        batch = rows // 2 if self.cfg_now else rows
        if self.needs_new_run(batch):
            self.begin_run(batch)
            if self.verify:
                self.verify_cfg_batch(sample)
        if self.cfg_now:
            self.guided = self.guided_at(self.call)
            self._set_phase(self.guided)
            key = (tuple(self.guided.tolist()), self.schedule.after, sample.device)
            make = lambda: cfg_layout(key[0], key[1], key[2])  # noqa: E731
        else:
            self.guided = torch.ones(rows, dtype=torch.bool)
            self.late = self.may_stop_next = False
            key = ("plain", rows, sample.device)
            make = lambda: plain_layout(rows, sample.device)  # noqa: E731
        if key not in self.layouts:
            self.layouts[key] = make()
        self.layout, self.prepared = self.layouts[key], True
        for listener in self.listeners:
            listener.on_call(self)

    @torch.compiler.disable
    def finish(self) -> None:
        """End the current denoiser call: count it, note first unguided calls."""
        if self.cfg_now:
            self.evaluations += torch.where(self.guided, 2, 1)
            newly = (self.stop_calls < 0) & ~self.guided
            self.stop_calls[newly] = self.call
        else:
            self.evaluations += 1
        self.call += 1
        self.prepared = False

    @torch.compiler.disable
    def settle(self, uncond: torch.Tensor, cond: torch.Tensor, x_t: torch.Tensor | None = None,
               timestep=None, weight: float | None = None) -> None:
        """Adaptive stops: flag (on the device) the guided samples that meet the criterion; effect from the next
        call. Cosine: their branches agree. Shape: the low band of x0-hat (from x_t, the call's latent input for
        one branch, the timestep, a tensor on the device, and the combined prediction u + weight (c - u)) has
        changed by less than the tolerance at `patience` calls in a row. Nothing is read back to the host."""
        ad = self.schedule.adaptive
        if ad is None or not bool(self.guided.any()):
            return
        if ad.criterion == "shape":
            settle = self._shape_settled(ad, uncond, cond, x_t, timestep, weight)
        elif self.call >= ad.min_call:
            settle = ad.settled(uncond.float(), cond.float())
        else:
            return
        if settle is None:
            return
        settle = settle & self.layout.guided.to(settle.device)
        self.stopped = settle if self.stopped is None else self.stopped | settle

    def _shape_settled(self, ad: AdaptiveStop, uncond, cond, x_t, timestep, weight) -> torch.Tensor | None:
        """The shape criterion's per-call update (see settle); None before `min_call`."""
        from .frequency import split_bands
        from .trace import predicted_x0

        if x_t is None or timestep is None or weight is None:
            raise ShapefirstError("the shape-settled adaptive stop needs the call's latent input, timestep and "
                                  "guidance weight", "call RunState.settle(uncond, cond, x_t, timestep, weight)")
        u = uncond.float()
        combined = u + float(weight) * (cond.float() - u)  # what the sampler follows (unguided rows: c - c == 0)
        x0 = predicted_x0(self.pipe.scheduler, timestep.to(u.device), x_t.float(), combined)
        low = split_bands(x0, ad.radius)[0]
        prev, streak = self.shape_low, self.shape_streak
        if prev is None or prev.shape != low.shape or streak is None:
            streak = torch.zeros(low.shape[0], dtype=torch.long, device=low.device)
        else:
            streak = torch.where(ad.shape_change(low, prev) < ad.tolerance, streak + 1, 0)
        self.shape_low, self.shape_streak = low, streak
        return streak >= ad.patience if self.call >= ad.min_call else None


class GuidanceHook(ModelHook):
    """The hook that applies a GuidanceSchedule to one pipeline's denoiser (see module docstring).
    Its state (counts, rows, phase) is `self.state`, a RunState shared with the other shapefirst hooks."""

    _is_stateful = True

    def __init__(self, pipe, schedule: GuidanceSchedule, recorder=None, state: RunState | None = None):
        super().__init__()
        self.pipe = pipe
        self.state = state if state is not None else RunState(pipe, schedule, recorder)
        self.state.bind(schedule, recorder)
        self.active, self.seen, self.watch = True, False, None

    def _watch(self, module, args, kwargs, output):
        """A torch forward hook on the denoiser: did this call go through the guidance hook? Not when something
        replaced the denoiser's forward after the schedule was applied (diffusers' model CPU offload re-installs
        accelerate's hooks after every pipeline call): then stop with a clear error, not unguided images."""
        if not self.seen:
            raise ShapefirstError(f"the guidance hook is no longer on {type(module).__name__}.forward (something "
                                  "replaced the forward after the schedule was applied: enable_model_cpu_offload "
                                  "re-installs accelerate's hooks after every pipeline call)",
                                  "call enable_model_cpu_offload() before apply_guidance_schedule (or generate)")
        self.seen = False
        return output

    def reset_state(self, module):
        self.state.end_run()
        return module

    # -- read-outs (of the current or last run) -----------------------------------------
    schedule = property(lambda self: self.state.schedule)
    recorder = property(lambda self: self.state.recorder)
    call = property(lambda self: self.state.call)
    n_calls = property(lambda self: self.state.n_calls)
    evaluations = property(lambda self: self.state.evaluations)
    stop_calls = property(lambda self: self.state.stop_calls)

    def evaluations_per_image(self) -> list[int]:
        return [int(v) for v in self.state.evaluations]

    def guidance_weight(self) -> float:
        """w of this run: the pipeline's guidance_scale attribute, else (PixArt) the schedule's."""
        w = getattr(self.pipe, "guidance_scale", None)
        return float(self.schedule.scale if w is None or callable(w) else w)

    # -- the hook ----------------------------------------------------------------------
    def new_forward(self, module, *args, **kwargs):
        if not self.active:  # removed, but a wrapper kept by someone else (accelerate's offload hooks) still calls it
            return self.fn_ref.original_forward(*args, **kwargs)
        self.seen = True
        if kwargs.get("skip_layers") is not None:
            raise ShapefirstError("SD3 skip-layer guidance (skip_guidance_layers) is not supported with a guidance "
                                  "schedule or trajectory", "call the pipeline without skip_guidance_layers")
        st = self.state
        sample = latent_input(args, kwargs)
        st.prepare(sample)
        try:
            out = self._cfg_call(sample, args, kwargs) if st.cfg_now else self._plain_call(sample, args, kwargs)
        except BaseException:
            st.prepared = False
            raise
        st.finish()
        return out

    def _plain_call(self, sample, args, kwargs):
        out = self.fn_ref.original_forward(*args, **kwargs)
        if self.recorder is not None:
            pred = _main_output(out)
            self.recorder.record(self.state.call, _timestep(args, kwargs), sample, None, pred, pred,
                                 torch.zeros(sample.shape[0], dtype=torch.bool))
        return out

    def _cfg_call(self, sample, args, kwargs):
        st, lay, forward = self.state, self.state.layout, self.fn_ref.original_forward
        rows, batch = sample.shape[0], st.batch
        if lay.full:
            out = forward(*args, **kwargs)  # the untouched path: bit-identical to the plain pipeline
            full = _main_output(out)
        else:
            out = forward(*_rows_of(args, rows, lay.run_dev), **_rows_of(kwargs, rows, lay.run_dev))
            sub = _main_output(out)
            full = sub.index_select(0, lay.src.to(sub.device))
            out = _replace_output(out, full)
        uncond, cond = full[:batch], full[batch:]
        ad = self.schedule.adaptive
        if ad is not None and ad.criterion == "shape":
            st.settle(uncond, cond, sample[batch:], _timestep_tensor(args, kwargs, sample.device), self.guidance_weight())
        else:
            st.settle(uncond, cond)
        if self.recorder is not None:
            w = self.guidance_weight()
            g = lay.guided.to(uncond.device).view(-1, *[1] * (uncond.dim() - 1))
            combined = torch.where(g, uncond + w * (cond - uncond), cond)
            self.recorder.record(st.call, _timestep(args, kwargs), sample[batch:], uncond, cond, combined,
                                 st.guided.clone(), self.schedule.after)
        return out


CONTROLNET_HOOK = "shapefirst_controlnet_rows"


class ControlNetRows(ModelHook):
    """On the pipeline's ControlNet, which runs before the denoiser on the same CFG batch: from the second
    call of a run on (once the RunState knows the batch), a CFG call runs only the rows the denoiser will
    run, and its residuals come back for the whole CFG batch (a dropped row holds its kept row's values),
    which the guidance hook slices again. Anything else (the first call, diffusers' guess_mode, which
    calls the ControlNet with the conditional rows only, return_dict=True) runs untouched."""

    def __init__(self, state: RunState):
        super().__init__()
        self.state = state

    def _acts(self, sample, kwargs) -> bool:
        st = self.state
        rows = sample.shape[0]
        if kwargs.get("return_dict", True) or st.batch == 0 or rows != 2 * st.batch or st.needs_new_run(st.batch):
            return False
        return cfg_active(st.pipe, sample)

    def new_forward(self, module, *args, **kwargs):
        forward, sample = self.fn_ref.original_forward, latent_input(args, kwargs)
        if not self._acts(sample, kwargs):
            return forward(*args, **kwargs)
        st = self.state
        st.prepare(sample)
        lay, rows = st.layout, sample.shape[0]
        try:
            if lay.full:
                return forward(*args, **kwargs)
            out = forward(*_rows_of(args, rows, lay.run_dev), **_rows_of(kwargs, rows, lay.run_dev))
        except BaseException:  # as the guidance hook does: the next run must begin afresh
            st.prepared = False
            raise
        return _expand_rows(out, len(lay.run), lay.src)


def apply_controlnet_rows(pipe, state: RunState) -> None:
    """Put the ControlNetRows hook on `pipe.controlnet` (a ControlNet or MultiControlNet), if it has one."""
    net = getattr(pipe, "controlnet", None)
    if not isinstance(net, torch.nn.Module):
        return
    remove_controlnet_rows(pipe)
    HookRegistry.check_if_exists_or_initialize(net).register_hook(ControlNetRows(state), CONTROLNET_HOOK)


def remove_controlnet_rows(pipe) -> None:
    net = getattr(pipe, "controlnet", None)
    if isinstance(net, torch.nn.Module):
        reg = HookRegistry.check_if_exists_or_initialize(net)
        if reg.get_hook(CONTROLNET_HOOK) is not None:
            reg.remove_hook(CONTROLNET_HOOK, recurse=False)



def _remove_dependents(pipe) -> None:
    """Remove the hooks that read the guidance hook's RunState (late caches, ControlNet rows)."""
    from .cache import remove_late_cache

    remove_late_cache(pipe)
    remove_controlnet_rows(pipe)


def apply_guidance_schedule(pipe, schedule: GuidanceSchedule, recorder=None) -> GuidanceHook:
    """Attach the schedule to `pipe`. Returns the hook (counts, stop calls; its RunState is `.state`).

    Replacing an earlier schedule keeps its RunState, so a late cache attached to the pipeline follows
    the new schedule (from the next call on, a new run). Call the pipeline as usual with
    guidance_scale=schedule.scale; remove with `remove_guidance_schedule(pipe)` (which also removes the
    late caches) or use the `guidance_schedule(...)` context manager."""
    from .models import family_of_pipe, listed_family

    family_of_pipe(pipe)  # a clear "not supported" error for other pipelines
    den = denoiser_of(pipe)
    cfg = getattr(den, "config", {})
    if schedule.stops and cfg.get("time_cond_proj_dim") is not None:
        raise ShapefirstError("this model is guidance-distilled (its denoiser takes the guidance scale as an input, "
                              "time_cond_proj_dim) and runs no classifier-free guidance, so there is nothing to remove",
                              "drop the guidance stop")
    reg = HookRegistry.check_if_exists_or_initialize(den)
    old = reg.get_hook(HOOK_NAME)
    if old is not None:
        _deactivate(old)
        reg.remove_hook(HOOK_NAME, recurse=False)
    hook = GuidanceHook(pipe, schedule, recorder, old.state if old is not None else None)
    hook.state.verify = listed_family(pipe) is None
    reg.register_hook(hook, HOOK_NAME)
    hook.watch = den.register_forward_hook(hook._watch, with_kwargs=True)
    apply_controlnet_rows(pipe, hook.state)
    return hook


def remove_guidance_schedule(pipe) -> None:
    """Remove the schedule and everything bound to its RunState (late caches, the ControlNet hook)."""
    reg = HookRegistry.check_if_exists_or_initialize(denoiser_of(pipe))
    if reg.get_hook(HOOK_NAME) is not None:
        _remove_dependents(pipe)
        _deactivate(reg.get_hook(HOOK_NAME))
        reg.remove_hook(HOOK_NAME, recurse=False)


def _deactivate(hook: GuidanceHook) -> None:
    """A removed hook passes every call through (a wrapper that outlives the removal calls it) and stops watching."""
    hook.active = False
    if hook.watch is not None:
        hook.watch.remove()
        hook.watch = None


@contextmanager
def guidance_schedule(pipe, schedule: GuidanceSchedule, recorder=None):
    """`with guidance_schedule(pipe, GuidanceSchedule(stop=0.5)) as hook: pipe(prompt, guidance_scale=7.5)`"""
    hook = apply_guidance_schedule(pipe, schedule, recorder)
    try:
        yield hook
    finally:
        remove_guidance_schedule(pipe)
