"""Quality bars of the embedded shapes-world model, with 95% confidence intervals.

Held-out prompts (attribute combinations never seen in training), 50 DDIM steps, guidance: the
recommended scale (--guidance),
image i seeded with seed + i. Prints judged accuracy per attribute, all-attributes-right, world
CLIPScore of generated images vs real renders of the same captions, the share of unconditional
samples with exactly one object, and the 8-image speed (median of 5 runs, load average).
--stops 0.5,0.3 adds guidance stops (unconditional branch after, the paper's w = 0) on the same prompts
and seeds: their accuracy and the paired difference to full guidance per attribute (normal 95% CI).

    python benchmarks/embedded_quality.py [--n 1000] [--uncond 200] [--stops 0.5]
        [--model embedded|FOLDER] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import numpy as np
import torch

from shapefirst.generate import generate
from shapefirst.guidance import GuidanceSchedule
from shapefirst.metrics import Clip, judged_accuracy, mean_ci, wilson
from shapefirst.models import default_guidance, load_pipeline, world_clip
from shapefirst.world import render
from shapefirst.world.judge import judge

# v0.1's bars (per attribute), and issue #13's bars for full guidance at the recommended scale
BARS = {"color": 0.95, "shape": 0.90, "position": 0.90, "size": 0.90, "texture": 0.80, "all": None}
TUNED_BARS = {"shape": 0.93, "all": 0.90}
ATTRS = tuple(BARS)  # the five attributes, then "all"


def run(pipe, captions, sched, args) -> tuple[np.ndarray, float, float]:
    """Images, generation seconds, and denoiser evaluations per image relative to full guidance (2 per call)."""
    t0 = time.time()
    res = [generate(pipe, captions[i:i + args.batch], sched, steps=args.steps, seed=args.seed + i)
           for i in range(0, len(captions), args.batch)]
    evals = np.concatenate([r.evaluations_per_image for r in res])
    return np.concatenate([r.images for r in res]), time.time() - t0, float(evals.mean()) / (2 * args.steps)


def bar_text(a: str) -> str:
    bars = [f">= {b:.0%}" for b in (BARS[a], TUNED_BARS.get(a)) if b]
    return " / ".join(bars) or "report"


def accuracy_rows(acc: dict, out: dict) -> None:
    for a in ATTRS:
        k, n = int(acc[a].sum()), len(acc[a])
        lo, hi = wilson(k, n)
        out["accuracy"][a] = {"value": k / n, "ci": [lo, hi], "bar": BARS[a], "tuned_bar": TUNED_BARS.get(a)}
        print(f"| accuracy {a} | {k / n:.1%} | [{lo:.1%}, {hi:.1%}] | {bar_text(a)} |")
    k = int(acc["one_object"].sum())
    lo, hi = wilson(k, len(acc["one_object"]))
    print(f"| exactly one object (prompted) | {k / len(acc['one_object']):.1%} | [{lo:.1%}, {hi:.1%}] | report |")


def stop_rows(pipe, captions, targets, full_acc: dict, args) -> dict:
    """Each stop's accuracy and its paired difference to full guidance (same prompts, same seeds)."""
    out = {}
    print("\n| schedule | evaluations | " + " | ".join(f"{a}: % (Δ vs full, points [95% CI])" for a in ATTRS) + " |")
    print("|---|---:|" + "---|" * len(ATTRS))
    for f in args.stops:
        sched = GuidanceSchedule(scale=args.guidance, stop=f)
        images, secs, evals = run(pipe, captions, sched, args)
        acc = judged_accuracy(images, targets)
        row = {"seconds": secs, "evaluation_ratio": evals}
        cells = []
        for a in ATTRS:
            d = mean_ci(100.0 * (acc[a].astype(float) - full_acc[a]))
            row[a] = {"value": float(acc[a].mean()), "delta_points": list(d)}
            cells.append(f"{acc[a].mean():.1%} ({d[0]:+.1f} [{d[1]:+.1f}, {d[2]:+.1f}])")
        out[f"stop={f} uncond"] = row
        print(f"| stop={f} uncond | x{row['evaluation_ratio']:.3f} | " + " | ".join(cells) + " |", flush=True)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="embedded",
                    help="embedded, or a shapes-world model folder (`shapefirst train`)")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--uncond", type=int, default=200)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--guidance", type=float, default=default_guidance("embedded"),
                    help="default: the embedded model's recommended scale")
    ap.add_argument("--stops", type=lambda s: [float(x) for x in s.split(",") if x], default=[],
                    help="guidance stops to judge on the same prompts and seeds, e.g. 0.5,0.3")
    ap.add_argument("--batch", type=int, default=25)
    ap.add_argument("--seed", type=int, default=1000)
    ap.add_argument("--speed-runs", type=int, default=5)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    pipe = load_pipeline(args.model)
    clip = Clip.load(world_clip(args.model))
    scenes = render.sample_scenes(args.n, args.seed, "test")
    captions = render.sample_captions(scenes, args.seed)
    targets = [s.labels() for s in scenes]
    sched = GuidanceSchedule(scale=args.guidance)
    load0 = os.getloadavg()
    images, gen_s, _ = run(pipe, captions, sched, args)
    acc = judged_accuracy(images, targets)
    real = np.stack([render.render(s) for s in scenes])
    cs_gen = clip.clip_score(images, captions).numpy()
    cs_real = clip.clip_score(real, captions).numpy()

    unc_imgs = []
    for i in range(0, args.uncond, args.batch):
        # guidance 1: both CFG branches would see the same empty text, so one branch gives the same image
        unc_imgs.append(generate(pipe, [""] * min(args.batch, args.uncond - i), GuidanceSchedule(1.0),
                                 steps=args.steps, seed=args.seed + 10**6 + i).images)
    one = [judge(im).count == 1 for im in np.concatenate(unc_imgs)]

    speed = []
    for r in range(args.speed_runs):
        res = generate(pipe, captions[:8], sched, steps=50, seed=r)
        speed.append(res.wall_seconds)
    load1 = os.getloadavg()

    out = {"model": args.model, "n": args.n, "steps": args.steps, "guidance": args.guidance,
           "generation_seconds": gen_s,
           "accuracy": {}, "clip_score": {}, "uncond_one_object": {}, "speed_8_images_s": {},
           "machine": f"{platform.processor() or platform.machine()} x{os.cpu_count()}, torch {torch.__version__}",
           "loadavg_before": load0, "loadavg_after": load1}
    print(f"# embedded model quality ({args.model}): n={args.n} held-out prompts, DDIM {args.steps} steps, guidance "
          f"{args.guidance}; machine {out['machine']}; load {load0[0]:.2f} -> {load1[0]:.2f}")
    print("| measure | value | 95% CI | bar (v0.1 / issue #13 at the recommended scale) |")
    print("|---|---:|---|---|")
    accuracy_rows(acc, out)
    ratio = cs_gen / np.maximum(cs_real, 1e-6)
    m, lo, hi = mean_ci(ratio)
    out["clip_score"] = {"generated": float(cs_gen.mean()), "real": float(cs_real.mean()), "ratio": [m, lo, hi]}
    print(f"| world CLIPScore generated / real | {cs_gen.mean():.2f} / {cs_real.mean():.2f} = {m:.3f} | "
          f"[{lo:.3f}, {hi:.3f}] | >= 0.90 |")
    k = sum(one)
    lo, hi = wilson(k, len(one))
    out["uncond_one_object"] = {"value": k / len(one), "ci": [lo, hi], "n": len(one)}
    print(f"| unconditional: exactly one object (n={len(one)}) | {k / len(one):.1%} | [{lo:.1%}, {hi:.1%}] | >= 90% |")
    med = statistics.median(speed)
    out["speed_8_images_s"] = {"median": med, "runs": speed}
    print(f"| 8 images, 50 steps, full guidance (median of {len(speed)}) | {med:.2f} s | "
          f"runs {', '.join(f'{s:.2f}' for s in speed)} | <= 5 s |",
          flush=True)
    full = {a: acc[a].astype(float) for a in ATTRS}
    out["stops"] = stop_rows(pipe, captions, targets, full, args) if args.stops else {}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
