"""Checks of what a user typed, before any work: ranges, lists, devices, options that would do nothing.

Each check raises a ShapefirstError with one line (problem; fix) or returns the cleaned value;
`noop_warnings` returns the warnings for options that would change nothing.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from .devices import device  # noqa: F401 (the CLI's checks.device)
from .errors import ShapefirstError
from .guidance import GuidanceSchedule
from .models import default_shape_tolerance
from .models import embedded_model_path

SEED_LIMIT = 2**63  # torch.Generator.manual_seed takes 64-bit seeds; seed + i must stay below this
MAX_BATCH = 64  # images per pipeline call the CLI allows (memory: the default is 8)


MAX_COUNT = 10**6  # prompts, batches, calls: anything larger is a typo, not a plan


def positive(value: int, option: str, example: int = 8) -> int:
    if int(value) != value or value < 1:
        raise ShapefirstError(f"{option} {value} is not a positive integer", f"pass e.g. {option} {example}")
    return count(value, option, 1)


def count(value: int, option: str, low: int = 0) -> int:
    """An integer in [low, MAX_COUNT]."""
    if int(value) != value or not low <= value <= MAX_COUNT:
        raise ShapefirstError(f"{option} {value} is outside [{low}, {MAX_COUNT}]",
                              f"pass {option} between {low} and {MAX_COUNT}")
    return int(value)


def out_path(value, option: str = "--out") -> Path:
    """An output folder path as typed: an empty or blank one is refused (Path("") is the current folder)."""
    if isinstance(value, Path):
        return value
    if not isinstance(value, str):
        raise ShapefirstError(f"{option} {value!r} is not a path", f"pass a folder path, e.g. {option} results")
    if not value.strip():
        raise ShapefirstError(f"{option} {value!r} is an empty path",
                              f"pass a folder path, e.g. {option} results ({option} . for the current folder)")
    return Path(value)


def batch_size(value: int, option: str = "--batch") -> int:
    positive(value, option)
    if value > MAX_BATCH:
        raise ShapefirstError(f"{option} {value} is more than {MAX_BATCH} images per pipeline call",
                              f"pass {option} {MAX_BATCH} or less (more images are split into batches anyway)")
    return int(value)


def seed(value: int, count: int = 1) -> int:
    if value < 0 or value + max(count, 1) > SEED_LIMIT:
        raise ShapefirstError(f"seed {value} is outside [0, 2^63 - {max(count, 1)}] for {count} image(s)",
                              "pass a seed such as 0 (image i uses seed + i)")
    return int(value)


def guidance(value: float) -> float:
    if value is None:
        return value

    GuidanceSchedule(value)  # the library's own rule: a finite number >= 0
    return float(value)


def learning_rate(value: float, option: str) -> float:
    if not math.isfinite(value) or not 0 < value < 1:
        raise ShapefirstError(f"{option} {value} is not a learning rate in (0, 1)", f"pass e.g. {option} 2e-4")
    return float(value)


def train_timesteps(model: str) -> int | None:
    """num_train_timesteps of a local model folder's scheduler (None when it cannot be read)."""

    folder = embedded_model_path() if model == "embedded" else Path(model).expanduser()
    cfg = folder / "scheduler" / "scheduler_config.json"
    try:
        return int(json.loads(cfg.read_text())["num_train_timesteps"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def steps(values, model: str, option: str = "--steps") -> list[int]:
    values = [values] if isinstance(values, int) else list(values)
    limit = train_timesteps(model)
    for s in values:
        positive(s, option, 50)
        within_training(s, limit, option)
    return values


def within_training(steps: int, limit: int | None, option: str = "--steps") -> int:
    """Fewer steps than the model's training timesteps: at exactly that many, DDIM, PNDM, DPM++ and UniPC
    (steps_offset 1) ask for timestep `limit`, one past the last, and fail inside diffusers."""
    if limit is not None and steps > limit:
        raise ShapefirstError(f"{option} {steps} is more than the model's {limit} training timesteps",
                              f"pass {option} between 1 and {limit - 1}")
    if limit is not None and steps == limit:
        raise ShapefirstError(f"{option} {steps} equals the model's {limit} training timesteps: the schedulers would "
                              f"step past the last one", f"pass {option} between 1 and {limit - 1}")
    return steps


def unique(values: list, option: str) -> list:
    """The list without repeats (first occurrence kept); an empty list is an error."""
    out = []
    for v in values:
        if v not in out:
            out.append(v)
    if not out:
        raise ShapefirstError(f"{option} is empty", f"pass at least one value to {option}")
    return out


def int_list(text: str, option: str) -> list[int]:
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError as e:
        raise ShapefirstError(f"{option} {text!r} is not a comma-separated list of integers", "pass e.g. 20,50") from e
    return unique(vals, option)


def numbers(text: str, option: str, ok, problem: str, fix: str, example: str) -> list[float]:
    """A comma list of numbers, each passing ok(v) (else "{option} value {v} {problem}; {fix}"), without repeats."""
    try:
        vals = [float(x) for x in text.split(",") if x.strip()]
    except ValueError as e:
        raise ShapefirstError(f"{option} {text!r} is not a comma-separated list of numbers",
                              f"pass e.g. {example}") from e
    for v in vals:
        if not ok(v):
            raise ShapefirstError(f"{option} value {v} {problem}", fix)
    return unique(vals, option)


def fractions(text: str, option: str) -> list[float]:
    return numbers(text, option, lambda v: 0 <= v <= 1, "is outside [0, 1]", "pass fractions of the denoiser calls",
                   "0.25,0.5")


def noise_levels(text: str, option: str = "--stop-sigmas") -> list[float]:
    """A comma list of noise levels (finite numbers > 0: sigma, or the flow time for flow matching); '' -> []."""
    if not text.strip():
        return []
    return numbers(text, option, lambda v: math.isfinite(v) and v > 0, "is not a noise level > 0",
                   "pass sigma values, e.g. 1.0,2.2 (the flow time in (0, 1] for flow matching)", "1.0,2.2")


def thresholds(text: str, option: str = "--adaptive") -> list[float]:
    if not text.strip():
        return []
    vals = fractions(text, option)
    for v in vals:
        if not 0 < v < 1:
            raise ShapefirstError(f"{option} threshold {v} is outside (0, 1)", "pass cosine similarities such as 0.99")
    return vals


def shape_tolerances(text: str | None, model: str, option: str = "--adaptive-shape") -> list[float]:
    """`--adaptive-shape`: comma-separated shape-settling tolerances (finite numbers > 0) or `auto` (the model's
    default: models.default_shape_tolerance); '' or None -> []."""
    if text is None or not str(text).strip():
        return []

    vals = []
    for part in (x.strip() for x in str(text).split(",")):
        if not part:
            continue
        if part.lower() == "auto":
            vals.append(default_shape_tolerance(model))
            continue
        try:
            v = float(part)
        except ValueError:
            v = None
        if v is None or not math.isfinite(v) or v <= 0:
            raise ShapefirstError(f"{option} value {part!r} is not a finite number > 0 or 'auto'",
                                  f"pass a relative change of x0-hat's low band per call, e.g. {option} 0.02, "
                                  f"or {option} auto")
        vals.append(v)
    return unique(vals, option)


def names(text: str, option: str, allowed) -> list[str]:
    vals = unique([s.strip() for s in text.split(",") if s.strip()], option)
    for v in vals:
        if v not in allowed:
            raise ShapefirstError(f"{option} value {v!r} is not known", f"use some of: {', '.join(allowed)}")
    return vals


def noop_warnings(schedule, cache, n_calls: int | None = None) -> list[str]:
    """Options that were given but would change nothing in this run."""
    out = []
    if cache is not None and not schedule.stops:
        out.append("--cache acts only after a guidance stop, and none was given: it changes nothing "
                   "(pass --guidance-stop or --adaptive)")
    ad = schedule.adaptive
    if ad is not None and n_calls is not None and ad.min_call >= n_calls:
        out.append(f"--adaptive-min-call {ad.min_call} is at or beyond the {n_calls} denoiser calls: the adaptive "
                   "stop can never act (pass a smaller --adaptive-min-call)")
    if cache is not None and cache.deep_interval and n_calls is not None and cache.deep_interval >= n_calls:
        out.append(f"deep-cache interval {cache.deep_interval} is at or beyond the {n_calls} denoiser calls: the deep "
                   "blocks are computed once after the stop and replayed for the rest (pass e.g. deep3)")
    return out
