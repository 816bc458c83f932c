"""The paper's analyses: each one module declaring an `Analysis` (see registry.py).

`run_analysis(name, pipe, out, ...)` runs one by name, saves the Result into `out/<name>/`
(results.json + arrays.safetensors + figure PNGs) and returns it; a folder that already holds a
result with the same key (model weights, prompts, seeds, guidance, steps, batch, version) is
reused (nothing is recomputed, the figures are redrawn); another key is refused unless overwrite.
"""
from __future__ import annotations

from pathlib import Path

from ..results import Result

from ..errors import ShapefirstError
from . import attention, eos_swap, frequency, stages, token_ablation
from .registry import Analysis, Inputs, Settings
from ..models import default_guidance
from ..outputs import OutputFolder
from ..outputs import model_fingerprint, module_fingerprint, text_digest, version

__all__ = ["ANALYSES", "Analysis", "Inputs", "Settings", "analyses", "check_inputs", "get", "run_analysis"]
_MODULES = (stages, frequency, attention, eos_swap, token_ablation)


def analyses() -> dict[str, Analysis]:
    """Every analysis of this package (each module's ANALYSIS), in report order."""
    found = sorted((m.ANALYSIS for m in _MODULES), key=lambda a: (a.order, a.name))
    return {a.name: a for a in found}


ANALYSES = tuple(analyses())  # the analysis names, in report order


def get(name: str) -> Analysis:
    table = analyses()
    if name not in table:
        raise ShapefirstError(f"unknown analysis {name!r}", f"use one of: {', '.join(table)}")
    return table[name]


def check_inputs(inputs: Inputs) -> None:
    """Before any model loads: what every analysis (the report runs them all) needs from the caller."""
    for a in analyses().values():
        a.check_inputs(inputs)


def analysis_key(name: str, pipe, n, steps, seed, guidance, prompts, pairs, clip, world, batch) -> dict:
    """Everything that changes an analysis's result: a saved result is reused only when all match."""

    return {"analysis": name, "model": model_fingerprint(pipe), "n": n, "steps": steps, "seed": seed,
            "guidance": guidance, "batch": batch, "world": world, "prompts": text_digest(prompts),
            "pairs": text_digest(pairs), "clip": None if clip is None else module_fingerprint(clip.model),
            "version": version()}


def draw(plot, res: Result, folder: Path) -> tuple[str | None, list[str]]:
    """Draw an analysis's figures -> (problem, figure file names). A failure never costs the computed
    result: it returns the one-line reason (the caller warns), and rerunning the same command redraws
    from the saved result."""
    try:
        paths = plot(res, folder)
    except Exception as e:  # matplotlib raises many types; the result is already saved
        first = (str(e).splitlines() or [""])[0][:200]
        return (f"the figures of {folder.name} could not be drawn ({type(e).__name__}: {first}); "
                "results.json is saved"), []
    return None, [Path(p).name for p in paths or []]


def run_analysis(name: str, pipe, out: str | Path, n: int = 8, steps: int = 50, seed: int = 0,
                 guidance: float | None = None, prompts: list[str] | None = None, pairs: list | None = None,
                 clip=None, world: bool = True, batch: int = 8, reuse: bool = True, overwrite: bool = False) -> Result:
    """Run analysis `name` on `pipe` and save it under out/name. world: the pipe is the shapes world
    (its judge scores images and built-in prompts/pairs are available). guidance None: the embedded
    model's recommended scale for the shapes world, else diffusers' 7.5 (shapefirst.models.default_guidance).

    out/name is keyed (analysis_key): the same key reuses the saved result (figures redrawn); another
    key is refused unless overwrite=True, which replaces only this analysis's own files.
    A figure that cannot be drawn gives a warning, never a lost result."""
    import warnings


    analysis = get(name)
    analysis.check_inputs(Inputs(prompts=prompts, pairs=pairs, clip=clip, world=world))
    guidance = default_guidance("embedded" if world else "") if guidance is None else guidance
    folder = Path(out) / name
    key = analysis_key(name, pipe, n, steps, seed, guidance, prompts, pairs, clip, world, batch)
    owner = OutputFolder(folder, "analyze", key, overwrite=overwrite or not reuse).check()
    if owner.reused and (folder / "results.json").exists():
        res = Result.load(folder)
    else:
        settings = analysis.settings(n=n, steps=steps, seed=seed, guidance=guidance, batch=batch)
        res = analysis.run(pipe, settings, Inputs(prompts=prompts, pairs=pairs, clip=clip, world=world))
        owner.claim()
        res.save(folder)
    problem, figures = draw(analysis.plot, res, folder)
    owner.claim(["results.json", "arrays.safetensors", *figures])
    if problem:
        warnings.warn(problem, stacklevel=2)
    return res
