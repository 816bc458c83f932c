"""The paper's analyses, each a function pipeline + settings -> Result (+ plots).

`run_analysis(name, pipe, out, ...)` runs one by name, saves the Result into `out/<name>/`
(results.json + arrays.safetensors + figure PNGs) and returns it; a folder that already holds a
result with the same key (model weights, prompts, seeds, guidance, steps, batch, version) is
reused (nothing is recomputed, the figures are redrawn); another key is refused unless overwrite.
"""
from __future__ import annotations

from pathlib import Path

from ..errors import ShapefirstError
from ..results import Result

ANALYSES = ("stages", "frequency", "attention", "eos-swap", "token-ablation")


def _world_or_prompts(n: int, seed: int, prompts: list[str] | None, world: bool):
    from ..world.prompts import world_prompts

    if prompts:
        return prompts[:n] if n else prompts, None
    if not world:
        raise ShapefirstError("this model is not the shapes world, so there are no built-in prompts",
                              "pass --prompts FILE (one prompt per line)")
    return world_prompts(n, seed)


def analysis_key(name: str, pipe, n, steps, seed, guidance, prompts, pairs, clip, world, batch) -> dict:
    """Everything that changes an analysis's result: a saved result is reused only when all match."""
    from ..outputs import model_fingerprint, module_fingerprint, text_digest, version

    return {"analysis": name, "model": model_fingerprint(pipe), "n": n, "steps": steps, "seed": seed,
            "guidance": guidance, "batch": batch, "world": world, "prompts": text_digest(prompts),
            "pairs": text_digest(pairs), "clip": None if clip is None else module_fingerprint(clip.model),
            "version": version()}


def draw(plot, res: Result, folder: Path) -> str | None:
    """Draw an analysis's figures; a failure never costs the computed result: it returns the
    one-line reason (the caller warns), and rerunning the same command redraws from the saved result."""
    try:
        plot(res, folder)
    except Exception as e:  # matplotlib raises many types; the result is already saved
        first = (str(e).splitlines() or [""])[0][:200]
        return f"the figures of {folder.name} could not be drawn ({type(e).__name__}: {first}); results.json is saved"
    return None


def run_analysis(name: str, pipe, out: str | Path, n: int = 16, steps: int = 50, seed: int = 0,
                 guidance: float = 7.5, prompts: list[str] | None = None, pairs: list | None = None,
                 clip=None, world: bool = True, batch: int = 8, reuse: bool = True, overwrite: bool = False) -> Result:
    """Run analysis `name` on `pipe` and save it under out/name. world: the pipe is the shapes world
    (its judge scores images and built-in prompts/pairs are available).

    out/name is keyed (analysis_key): the same key reuses the saved result (figures redrawn); another
    key is refused unless overwrite=True, which replaces only this analysis's own files.
    A figure that cannot be drawn gives a warning, never a lost result."""
    import warnings

    from ..outputs import OutputFolder

    if name not in ANALYSES:
        raise ShapefirstError(f"unknown analysis {name!r}", f"use one of: {', '.join(ANALYSES)}")
    folder = Path(out) / name
    key = analysis_key(name, pipe, n, steps, seed, guidance, prompts, pairs, clip, world, batch)
    owner = OutputFolder(folder, "analyze", key, overwrite=overwrite or not reuse).check()
    run, plot = _runner(name)
    if owner.reused and (folder / "results.json").exists():
        res = Result.load(folder)
    else:
        res = run(pipe, n=n, steps=steps, seed=seed, guidance=guidance, prompts=prompts, pairs=pairs, clip=clip,
                  world=world, batch=batch)
        owner.claim()
        res.save(folder)
    problem = draw(plot, res, folder)
    owner.claim(p.name for p in folder.iterdir() if not p.name.startswith(".shapefirst"))
    if problem:
        warnings.warn(problem, stacklevel=2)
    return res


def _runner(name: str):
    """(run, plot) of an analysis: run(pipe, **settings) -> Result, plot(result, folder)."""
    return {"stages": (_stages, _plot("stages", "plot_stages")),
            "frequency": (_frequency, _plot("frequency", "plot_frequency")),
            "attention": (_attention, _plot("attention", "plot_attention")),
            "eos-swap": (_eos_swap, _plot("eos_swap", "plot_eos_swap")),
            "token-ablation": (_token_ablation, _plot("token_ablation", "plot_token_ablation"))}[name]


def _plot(module: str, fn: str):
    def plot(res, folder):
        import importlib

        return getattr(importlib.import_module(f".{module}", __name__), fn)(res, folder)

    return plot


def _stages(pipe, n, steps, seed, guidance, prompts, pairs, clip, world, batch):
    from ..guidance import GuidanceSchedule
    from .stages import run_stages

    ps, targets = _world_or_prompts(n, seed, prompts, world)
    if not world and clip is None:
        raise ShapefirstError("stages on a model other than the shapes world needs a CLIP scorer",
                              "pass --clip PATH (a local CLIP model folder)")
    schedules = {"full": GuidanceSchedule(guidance), "stop 0.5 uncond": GuidanceSchedule(guidance, stop=0.5)}
    return run_stages(pipe, ps, targets, steps=steps, seed=seed, schedules=schedules, batch=batch,
                      clip=clip, mode="judge" if world else "clip")


def _frequency(pipe, n, steps, seed, guidance, prompts, pairs, clip, world, batch):
    from ..guidance import GuidanceSchedule
    from .frequency import run_frequency

    ps, _ = _world_or_prompts(n, seed, prompts, world)
    return run_frequency(pipe, n_images=len(ps), seed=seed, steps=steps, prompts=ps,
                         schedule=GuidanceSchedule(guidance), batch=batch)


def _attention(pipe, n, steps, seed, guidance, prompts, pairs, clip, world, batch):
    from ..guidance import GuidanceSchedule
    from .attention import run_attention

    ps, _ = _world_or_prompts(n, seed, prompts, world)
    return run_attention(pipe, ps, steps=steps, seed=seed, schedule=GuidanceSchedule(guidance), batch=batch)


def _eos_swap(pipe, n, steps, seed, guidance, prompts, pairs, clip, world, batch):
    from ..guidance import GuidanceSchedule
    from ..prompts import world_pairs
    from .eos_swap import run_eos_swap

    if pairs is None:
        if not world:
            raise ShapefirstError("eos-swap on a model other than the shapes world needs prompt pairs",
                                  "pass --pairs FILE (lines 'prompt A || prompt B')")
        pairs = world_pairs(n, seed)
    return run_eos_swap(pipe, pairs, steps=steps, seed=seed, schedule=GuidanceSchedule(guidance), batch=batch,
                        clip=clip)


def _token_ablation(pipe, n, steps, seed, guidance, prompts, pairs, clip, world, batch):
    from ..guidance import GuidanceSchedule
    from .token_ablation import run_token_ablation

    ps, targets = _world_or_prompts(n, seed, prompts, world)
    return run_token_ablation(pipe, ps, targets, steps=steps, seed=seed, batch=batch, clip=clip,
                              schedule=GuidanceSchedule(guidance))
