"""Timings that know when they are void (#33 item 5).

A tiny model on a small CPU slows down many times over when another job runs beside it (spinning OpenMP threads):
a saved latency measured then means nothing. Every timed sweep row records the load average when it was timed,
and the sweep times full guidance against itself on the same batches: that ratio's distance from 1 is the
timing's own noise (unknown, and said so in the table, when full guidance was not timed). A row's timing is void
when that noise exceeds VOID_NOISE, or when the row claims to be slower
than full guidance by more than the noise allows (a guidance stop cannot cost more than full guidance). A void
timing is said so in the sweep's table, its figure and the report, and calibrate then ranks by saved evaluations
instead of a void saved latency."""
from __future__ import annotations

import os

import torch

from .errors import ShapefirstError

VOID_NOISE = 0.05
"""The largest |1 - t_full / t_full| (full guidance timed against itself) a timing may carry and still count."""


def load_now() -> float | None:
    """The 1-minute load average (None where the platform has none)."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def timing_noise(rows: list[dict]) -> float | None:
    """The sweep's own timing noise: max |1 - ratio| of full guidance timed against itself (None: untimed)."""
    full = next((r for r in rows if r.get("name") == "full" and r.get("time_ratios")), None)
    return None if full is None else max(abs(1.0 - x) for x in full["time_ratios"])


def mark_void(rows: list[dict]) -> list[str]:
    """Set `timing_noise` and `timing_void` on every timed row; return one warning line per void row."""
    noise = timing_noise(rows)
    lines = []
    for r in rows:
        if r.get("saved_latency") is None:
            continue
        r["timing_noise"] = noise
        if noise is None:  # full guidance not timed against itself: the noise is unknown (said in the table)
            r["timing_void"] = False
            continue
        slower = r["saved_latency"] < -(noise + VOID_NOISE)
        r["timing_void"] = noise > VOID_NOISE or slower
        if r["timing_void"] and r.get("name") != "full":
            load = r.get("load")
            load_txt = f"load {load:.2f}" if load is not None else "load unknown"
            why = (f"full guidance timed against itself differs by {noise:.0%} ({load_txt})"
                   if noise > VOID_NOISE else f"it claims {-r['saved_latency']:.0%} slower than full guidance")
            lines.append(f"the timing of {r['name']} is void: {why}; its saved latency "
                         f"{r['saved_latency']:+.0%} is not a measurement (rerun with nothing else on the machine)")
    return lines


def any_void(rows: list[dict]) -> bool:
    mark_void(rows)
    return any(r.get("timing_void") for r in rows)


BUSY_LOAD = 0.5
"""A timing benchmark refuses to start when the 1-minute load average per core is above this (other work runs)."""


def pin_threads(threads: int | None = None) -> int:
    """Pin torch's intra-op threads (default: every core) so a timing does not depend on what torch guesses."""
    n = threads or os.cpu_count() or 1
    torch.set_num_threads(n)
    return n


def check_alone(allow_busy: bool = False, load: float | None = None, cores: int | None = None) -> str | None:
    """Before a timing: None when the machine is quiet; else a one-line reason. Raises unless `allow_busy` (then the
    caller prints the reason beside its table, flagging every figure)."""
    load = load_now() if load is None else load
    cores = cores or os.cpu_count() or 1
    if load is None or load / cores <= BUSY_LOAD:
        return None
    why = (f"the machine is busy (load average {load:.2f} on {cores} cores): timings beside other work are void "
           "(spinning threads can slow a small model many times over)")
    if not allow_busy:
        raise ShapefirstError(why, "stop the other work and rerun, or pass --allow-busy to time anyway (flagged)")
    return why
