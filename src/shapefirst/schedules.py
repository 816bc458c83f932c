"""Guidance schedules, the configs: when classifier-free guidance runs (a fixed stop, a guidance interval,
a per-sample adaptive stop) and which single branch runs after it. Every value is checked when the
schedule is made: a wrong type or an impossible combination is one ShapefirstError naming the argument
and the fix, never an error later, mid-run. How a schedule is applied: shapefirst.guidance_hook."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from .errors import ShapefirstError
from .frequency import DEFAULT_RADIUS

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


def check_number(name: str, x, example, integer: bool = False, optional: bool = True):
    """One ShapefirstError naming `name` unless x is a real number (an integer if `integer`; None if `optional`)."""
    if x is None and optional:
        return
    kind = "an integer" if integer else "a number"
    if not _real(x) or (integer and float(x) != int(float(x))):
        got = f"{type(x).__name__} {x!r}"
        raise ShapefirstError(f"{name} is {got}, not {kind}", f"pass {kind} such as {name}={example!r}")


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
        check_number("threshold", self.threshold, 0.99, optional=False)
        check_number("min_call", self.min_call, 0, integer=True, optional=False)
        for name, eg, integer in (("tolerance", DEFAULT_SHAPE_TOLERANCE, False), ("patience", DEFAULT_PATIENCE, True),
                                  ("radius", DEFAULT_RADIUS, False)):
            check_number(name, getattr(self, name), eg, integer=integer)
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
    def from_dict(cls, d: dict) -> AdaptiveStop:
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
    stop_sigma / start_sigma: the same window in noise level, for any scheduler and step count: a call is
        guided while its noise level is in (stop_sigma, start_sigma] (sigma = sqrt((1 - alpha_bar) / alpha_bar)
        for epsilon and v models, the flow time in [0, 1] for flow matching; shapefirst.noise_levels maps them
        to the run's calls once per run). Give one kind per end (stop_sigma or stop / stop_step).
    alternate: after the stop, the calls with an even index stay guided (AUTOMATIC1111's "Negative Guidance
        minimum sigma" skips the unconditional pass on odd steps only; see `a1111_ngms`).
    """

    scale: float = 7.5
    stop: float | None = None
    stop_step: int | None = None
    after: str = "uncond"
    adaptive: AdaptiveStop | None = None
    start: float | None = None
    start_step: int | None = None
    stop_sigma: float | None = None
    start_sigma: float | None = None
    alternate: bool = False

    @classmethod
    def a1111_ngms(cls, scale: float, s_min_uncond: float, all_steps: bool = False) -> GuidanceSchedule:
        """AUTOMATIC1111's "Negative Guidance minimum sigma" (s_min_uncond): below that sigma the unconditional
        pass is skipped on every other step (its default; the conditional prediction is used), or on every step
        (its "all steps" option, `all_steps=True`)."""
        return cls(scale, stop_sigma=s_min_uncond, after="cond", alternate=not all_steps)

    @classmethod
    def a1111_skip_early(cls, scale: float, fraction: float) -> GuidanceSchedule:
        """AUTOMATIC1111's "Ignore negative prompt during early sampling" (skip_early_cond): no CFG for the first
        `fraction` of the steps, the conditional prediction instead. A1111 skips step i while i / steps <=
        fraction; this starts guidance at call round(fraction * calls): the two can differ by one call."""
        return cls(scale, start=fraction, after="cond")

    def __post_init__(self):
        check_number("scale", self.scale, 7.5, optional=False)
        for name, eg, integer in (("stop", 0.5, False), ("stop_step", 25, True), ("start", 0.2, False),
                                  ("start_step", 5, True), ("stop_sigma", 0.5, False), ("start_sigma", 5.4, False)):
            check_number(name, getattr(self, name), eg, integer=integer)
        self._check_sigmas()
        if self.adaptive is not None and not isinstance(self.adaptive, AdaptiveStop):
            raise ShapefirstError(f"adaptive is {type(self.adaptive).__name__} {self.adaptive!r}, not an AdaptiveStop",
                                  "pass adaptive=AdaptiveStop(threshold=0.99) (or AdaptiveStop(criterion='shape'))")
        if not math.isfinite(self.scale) or self.scale < 0:
            raise ShapefirstError(f"guidance scale {self.scale} is not a finite number >= 0",
                                  "pass e.g. --guidance 7.5")
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
        self._check_interval()
        if self.after not in AFTER_CHOICES:
            raise ShapefirstError(f"after={self.after!r} is not one of {AFTER_CHOICES}",
                                  "pass 'uncond' (the paper) or 'cond' (diffusers' callback)")
        if self.stops and self.scale <= 1.0:
            raise ShapefirstError(f"a guidance stop was given with guidance scale {self.scale} <= 1, which runs no "
                                  "guidance",
                                  "raise the guidance scale above 1 or drop the stop")

    def _check_sigmas(self) -> None:
        for name, other in (("stop_sigma", ("stop", "stop_step")), ("start_sigma", ("start", "start_step"))):
            v = getattr(self, name)
            if v is None:
                continue
            if not math.isfinite(v) or v < 0:
                raise ShapefirstError(f"{name} {v} is not a finite noise level >= 0", f"pass e.g. {name}=0.5")
            given = [o for o in other if getattr(self, o) is not None]
            if given:
                raise ShapefirstError(f"both {name} and {given[0]} were given",
                                      "pass one kind for each end of the window")
        if self.stop_sigma is not None and self.start_sigma is not None and self.start_sigma <= self.stop_sigma:
            raise ShapefirstError(f"start_sigma {self.start_sigma} is not above stop_sigma {self.stop_sigma}, so no "
                                  "call would be guided",
                                  "pass start_sigma > stop_sigma (guided: stop_sigma < sigma <= start_sigma)")
        if not isinstance(self.alternate, bool):
            raise ShapefirstError(f"alternate is {type(self.alternate).__name__} {self.alternate!r}",
                                  "pass True or False")

    @property
    def uses_sigma(self) -> bool:
        return self.stop_sigma is not None or self.start_sigma is not None

    def _check_interval(self) -> None:
        """Refuse a guidance interval [start, stop) that is empty at every call count it admits (it would run no
        guidance at all), in any mix of fractions and call indices. A stop at 0 with no start is allowed: no
        guidance from the first call on, the branch `after` throughout."""
        start = self.start_step if self.start_step is not None else self.start
        stop = self.stop_step if self.stop_step is not None else self.stop
        if not start or stop is None:
            return
        if self.start_step is not None and self.stop_step is not None:
            empty = self.start_step >= self.stop_step
        elif self.start is not None and self.stop is not None:
            empty = self.start >= self.stop
        elif self.start is not None:  # a fraction start before a call-index stop: n_calls >= stop_step
            empty = math.floor(self.start * self.stop_step + 0.5) >= self.stop_step
        else:  # a call-index start before a fraction stop: empty for every run only if the stop is 0
            empty = self.stop == 0
        if empty:
            what_start = f"start_step={self.start_step}" if self.start_step is not None else f"start={self.start}"
            what_stop = f"stop_step={self.stop_step}" if self.stop_step is not None else f"stop={self.stop}"
            raise ShapefirstError(f"guidance {what_start} is after the stop ({what_stop}) or at it, so no call would "
                                  "be guided", "pass a start before the stop (the guided calls are [start, stop))")

    @property
    def stops(self) -> bool:
        """Can this schedule stop guidance at all?"""
        fixed = (self.stop is not None and self.stop < 1.0) or self.stop_step is not None
        fixed = fixed or self.stop_sigma is not None
        late_start = bool(self.start) or bool(self.start_step) or self.start_sigma is not None
        return fixed or late_start or self.adaptive is not None

    def first_guided_call(self, n_calls: int, sigmas: list[float] | None = None) -> int:
        """k0: calls before k0 run one branch (a guidance interval starts late); 0 = from the first call.
        `sigmas`: the noise level of each of the run's calls (needed for start_sigma)."""
        if self.start_sigma is not None:
            return _first_at_or_below(self._sigmas(sigmas, n_calls), self.start_sigma)
        if self.start_step is not None:
            if self.start_step > n_calls:
                raise ShapefirstError(f"guidance start step {self.start_step} is beyond the {n_calls} denoiser calls "
                                      "of this run", f"pass a step between 0 and {n_calls}")
            return int(self.start_step)
        if self.start is None:
            return 0
        return min(n_calls, int(math.floor(self.start * n_calls + 0.5)))

    def first_unguided_call(self, n_calls: int, sigmas: list[float] | None = None) -> int:
        """k: calls 0..k-1 are guided, k.. are not (n_calls = never stop); with stop_sigma, the first call whose
        noise level is at or below it."""
        if self.stop_sigma is not None:
            return _first_at_or_below(self._sigmas(sigmas, n_calls), self.stop_sigma)
        if self.stop_step is not None:
            if self.stop_step > n_calls:
                raise ShapefirstError(f"guidance stop step {self.stop_step} is beyond the {n_calls} denoiser calls of "
                                      "this run",
                                      f"pass a step between 0 and {n_calls}")
            return int(self.stop_step)
        if self.stop is None:
            return n_calls
        return min(n_calls, int(math.floor(self.stop * n_calls + 0.5)))

    def _sigmas(self, sigmas, n_calls: int) -> list[float]:
        if sigmas is None or len(sigmas) != n_calls:
            raise ShapefirstError("a noise-level window needs the noise level of each call of the run",
                                  "apply it with apply_guidance_schedule / guidance_schedule (the run maps it)")
        return sigmas

    def to_dict(self) -> dict:
        d = asdict(self)
        d["adaptive"] = self.adaptive.to_dict() if self.adaptive is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict) -> GuidanceSchedule:
        d = dict(d)
        if d.get("adaptive"):
            d["adaptive"] = AdaptiveStop.from_dict(d["adaptive"])
        return cls(**d)


def _first_at_or_below(sigmas: list[float], level: float) -> int:
    """The first call whose noise level is <= level (len(sigmas) if none): noise levels fall along a run."""
    return next((c for c, s in enumerate(sigmas) if s <= level), len(sigmas))
