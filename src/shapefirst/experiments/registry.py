"""The analysis registry: what an analysis is, and how the CLI and the report find them.

An analysis is one module of `shapefirst.experiments` that defines `ANALYSIS = Analysis(...)`:
its name, its settings (a dataclass), `run` (pipeline + settings + inputs -> Result), `summary`
(the title, caption, table and finding sentences the report and the CLI print, from the saved
result alone) and `plot` (the figures, from the saved result alone). `analyses()` discovers them,
so adding an analysis is one new module (plus its test); nothing else names its keys.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..errors import ShapefirstError
from ..world.prompts import world_prompts


@dataclass(frozen=True)
class Settings:
    """What every analysis takes: n prompts (or pairs), denoising steps, the first seed (image i
    uses seed + i), the guidance scale and the images per pipeline call."""

    n: int = 8
    steps: int = 50
    seed: int = 0
    guidance: float = 7.5
    batch: int = 8


@dataclass
class Inputs:
    """What the caller brings: a prompt list or pair list (else the shapes world's own, when
    `world`), a CLIP scorer (`shapefirst.metrics.Clip`) for models other than the shapes world."""

    prompts: list[str] | None = None
    pairs: list | None = None
    clip: object = None
    world: bool = True

    def prompts_and_targets(self, n: int, seed: int):
        """(prompts, judge targets or None): the caller's first n prompts, else n held-out world captions."""

        if self.prompts:
            return (self.prompts[:n] if n else self.prompts), None
        if not self.world:
            raise ShapefirstError("this model is not the shapes world, so there are no built-in prompts",
                                  "pass --prompts FILE (one prompt per line)")
        return world_prompts(n, seed)


@dataclass(frozen=True)
class Summary:
    """What the report and the CLI print for one saved result."""

    title: str
    caption: str
    table: list[list] = field(default_factory=list)  # header row first
    findings: list[str] = field(default_factory=list)  # sentences chosen from the numbers
    figures: tuple[str, ...] = ("*.png",)  # glob patterns of the figures the report shows


@dataclass(frozen=True)
class Analysis:
    name: str
    run: Callable  # run(pipe, settings, inputs) -> Result
    summary: Callable  # summary(result) -> Summary
    plot: Callable  # plot(result, folder) -> list[Path]
    settings: type = Settings
    order: int = 100  # position in the report
    needs: tuple[str, ...] = ("prompts",)  # Inputs fields a model other than the shapes world must bring

    def check_inputs(self, inputs: Inputs) -> None:
        """Before any model loads: what this analysis needs on a model other than the shapes world."""
        if inputs.world:
            return
        fixes = {"prompts": "pass --prompts FILE (one prompt per line)",
                 "pairs": "pass --pairs FILE (lines 'prompt A || prompt B')",
                 "clip": "pass --clip PATH (a local CLIP model folder)"}
        for need in self.needs:
            if getattr(inputs, need) is None:
                raise ShapefirstError(f"{self.name} on a model other than the shapes world needs {need}", fixes[need])


def figures_of(summary: Summary, folder: Path) -> list[Path]:
    return sorted({p for pattern in summary.figures for p in Path(folder).glob(pattern)})


def share_text(d: dict) -> str:
    """A share with its interval, for tables: '81% [70%, 89%] (n=40)'."""
    return f"{d['rate']:.0%} [{d['ci'][0]:.0%}, {d['ci'][1]:.0%}] (n={d['n']})"
