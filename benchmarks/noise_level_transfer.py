"""Does a guidance stop calibrated at DDIM 50 hold at the solvers users pick, once it is stated in noise level?

The settings: the stop the README recommends at DDIM 50 (the first 40% of the calls guided, the conditional branch
after), alone and with the README's late cache (+kept+deep3: cross-attention kept, deep blocks every third call after
the stop, within tolerance at DDIM 50 in the peers study), stated as the noise level of DDIM 50's first unguided
call (call 20), so that every solver stops guidance at the same sigma (shapefirst.noise_levels). For each solver:
n held-out world prompts, one seed per image, full guidance at the same solver as the reference, the paired
all-five-right difference with its 95% CI (mean of per-image differences, normal interval), and the share of the
calls guided. Resumes per (solver, setting) from OUT.

    python benchmarks/noise_level_transfer.py --n 300 --out /work/bench/transfer
"""
from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

import numpy as np

from shapefirst.cache import LateCache
from shapefirst.generate import generate
from shapefirst.guidance import GuidanceSchedule
from shapefirst.metrics import judged_accuracy, mean_ci
from shapefirst.models import default_guidance, load_pipeline, scheduler_for
from shapefirst.noise_levels import run_noise_levels
from shapefirst.world.prompts import world_prompts

SOLVERS = (("ddim", 50), ("dpm++", 20), ("unipc", 10), ("euler", 30))


def calibrated_sigma(pipe, stop: float = 0.4) -> float:
    """The noise level of DDIM 50's first unguided call under stop=0.4 (call 20), just above the next call's."""
    with scheduler_for(pipe, "ddim") as p:
        p.scheduler.set_timesteps(50)
        sig = run_noise_levels(p.scheduler, 50)
    k = int(np.floor(stop * 50 + 0.5))
    return (sig[k - 1] + sig[k]) / 2  # guided while sigma > this: calls 0..k-1


def run(pipe, prompts, targets, w, schedule, name, steps, out: Path, key: str, chunk: int = 100,
        cache: LateCache | None = None) -> dict:
    """One (solver, setting) over all prompts, checkpointed per chunk of prompts (image i keeps seed i)."""
    path = out / f"{key}_n{len(prompts)}.json"
    if path.exists():
        return json.loads(path.read_text())
    parts = []
    for i in range(0, len(prompts), chunk):
        part = out / f"{key}_n{len(prompts)}_{i}.json"
        if not part.exists():
            res = generate(pipe, prompts[i:i + chunk], schedule, steps=steps, scheduler=name, seed=i, batch=8,
                           cache=cache)
            acc = judged_accuracy(res.images, targets[i:i + chunk])
            part.write_text(json.dumps({"all": acc["all"].tolist(), "evaluations": res.evaluations_per_image}))
        parts.append(json.loads(part.read_text()))
    row = {"key": key, "all": [a for p in parts for a in p["all"]],
           "evaluations": float(np.mean([e for p in parts for e in p["evaluations"]]))}
    path.write_text(json.dumps(row))
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--out", type=Path, default=Path("transfer-out"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    pipe = load_pipeline("embedded")
    w = default_guidance("embedded")
    prompts, targets = world_prompts(args.n, 0)
    sigma = calibrated_sigma(pipe)
    print(f"# n={args.n} held-out prompts, w={w}, stop calibrated at DDIM 50: stop=0.4 = sigma {sigma:.4f}; "
          f"{platform.machine()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}")
    print("| solver | setting | guided calls | all five right | paired delta vs full [95% CI] |")
    print("|---|---|---|---|---|")
    for name, steps in SOLVERS:
        full = run(pipe, prompts, targets, w, GuidanceSchedule(w), name, steps, args.out, f"{name}{steps}_full")
        stop = GuidanceSchedule(w, stop_sigma=sigma, after="cond")
        for label, cache in (("stop_sigma", None), ("stop_sigma +kept+deep3", LateCache.parse("kept+deep3"))):
            key = f"{name}{steps}_{label.replace(' +', '_').replace('+', '_')}"
            row = run(pipe, prompts, targets, w, stop, name, steps, args.out, key, cache=cache)
            d = mean_ci(np.array(row["all"], float) - np.array(full["all"], float))
            guided = (row["evaluations"] - steps) / steps
            acc = f"{np.mean(row['all']):.1%} (full {np.mean(full['all']):.1%})"
            print(f"| {name} {steps} | {label} | {guided:.0%} | {acc} "
                  f"| {100 * d[0]:+.1f} [{100 * d[1]:+.1f}, {100 * d[2]:+.1f}] |", flush=True)


if __name__ == "__main__":
    main()
