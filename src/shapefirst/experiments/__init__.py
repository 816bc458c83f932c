"""The paper's analyses, each a function pipeline + settings -> Result (+ plots).

`run_analysis(name, pipe, out, ...)` runs one by name, saves the Result into `out/<name>/`
(results.json + arrays.safetensors + figure PNGs) and returns it; a folder that already holds a
result with the same settings is reused (nothing is recomputed).
"""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import ShapefirstError
from ..results import Result

ANALYSES = ("stages", "frequency", "attention", "eos-swap", "token-ablation")


def _world_or_prompts(n: int, seed: int, prompts: list[str] | None, world: bool):
    from .stages import world_prompts

    if prompts:
        return prompts[:n] if n else prompts, None
    if not world:
        raise ShapefirstError("this model is not the shapes world, so there are no built-in prompts",
                              "pass --prompts FILE (one prompt per line)")
    return world_prompts(n, seed)


def run_analysis(name: str, pipe, out: str | Path, n: int = 16, steps: int = 50, seed: int = 0,
                 guidance: float = 7.5, prompts: list[str] | None = None, pairs: list | None = None,
                 clip=None, world: bool = True, batch: int = 8, reuse: bool = True) -> Result:
    """Run analysis `name` on `pipe` and save it under out/name. world: the pipe is the shapes world
    (its judge scores images and built-in prompts/pairs are available)."""
    from ..guidance import GuidanceSchedule

    if name not in ANALYSES:
        raise ShapefirstError(f"unknown analysis {name!r}", f"use one of: {', '.join(ANALYSES)}")
    folder = Path(out) / name
    settings = {"n": n, "steps": steps, "seed": seed, "guidance": guidance, "prompts": prompts, "pairs": pairs,
                "world": world}
    stamp = folder / "settings.json"
    if reuse and stamp.exists() and (folder / "results.json").exists():
        if json.loads(stamp.read_text()) == json.loads(json.dumps(settings)):
            return Result.load(folder)
    schedule = GuidanceSchedule(scale=guidance)
    if name == "stages":
        from .stages import plot_stages, run_stages

        ps, targets = _world_or_prompts(n, seed, prompts, world)
        if not world and clip is None:
            raise ShapefirstError("stages on a model other than the shapes world needs a CLIP scorer",
                                  "pass --clip PATH (a local CLIP model folder)")
        schedules = {"full": schedule, "stop 0.5 uncond": GuidanceSchedule(guidance, stop=0.5)}
        res = run_stages(pipe, ps, targets, steps=steps, seed=seed, schedules=schedules, batch=batch,
                         clip=clip, mode="judge" if world else "clip")
        plot = plot_stages
    elif name == "frequency":
        from .frequency import plot_frequency, run_frequency

        ps, _ = _world_or_prompts(n, seed, prompts, world)
        res = run_frequency(pipe, n_images=len(ps), seed=seed, steps=steps, prompts=ps, schedule=schedule, batch=batch)
        plot = plot_frequency
    elif name == "attention":
        from .attention import plot_attention, run_attention

        ps, _ = _world_or_prompts(n, seed, prompts, world)
        res = run_attention(pipe, ps, steps=steps, seed=seed, schedule=schedule, batch=batch)
        plot = plot_attention
    elif name == "eos-swap":
        from ..prompts import world_pairs
        from .eos_swap import plot_eos_swap, run_eos_swap

        if pairs is None:
            if not world:
                raise ShapefirstError("eos-swap on a model other than the shapes world needs prompt pairs",
                                      "pass --pairs FILE (lines 'prompt A || prompt B')")
            pairs = world_pairs(n, seed)
        res = run_eos_swap(pipe, pairs, steps=steps, seed=seed, schedule=schedule, batch=batch, clip=clip)
        plot = plot_eos_swap
    else:
        from .token_ablation import plot_token_ablation, run_token_ablation

        ps, targets = _world_or_prompts(n, seed, prompts, world)
        res = run_token_ablation(pipe, ps, targets, steps=steps, seed=seed, batch=batch, clip=clip, schedule=schedule)
        plot = plot_token_ablation
    res.save(folder)
    plot(res, folder)
    from ..results import atomic_write_text

    atomic_write_text(stamp, json.dumps(settings))
    return res
