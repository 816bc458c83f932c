"""Quality bars of the embedded shapes-world model, with 95% confidence intervals.

Held-out prompts (attribute combinations never seen in training), 50 DDIM steps, guidance: the recommended scale (--guidance),
image i seeded with seed + i. Prints judged accuracy per attribute, all-attributes-right, world
CLIPScore of generated images vs real renders of the same captions, the share of unconditional
samples with exactly one object, and the 8-image speed (median of 5 runs, load average).

    python benchmarks/embedded_quality.py [--n 1000] [--uncond 200] [--json out.json]
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

from shapefirst.models import default_guidance
from shapefirst.generate import generate
from shapefirst.guidance import GuidanceSchedule
from shapefirst.metrics import Clip, judged_accuracy, mean_ci, wilson
from shapefirst.models import embedded_model_path, load_pipeline
from shapefirst.world import render
from shapefirst.world.judge import judge


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--uncond", type=int, default=200)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--guidance", type=float, default=default_guidance("embedded"),
                    help="default: the embedded model's recommended scale")
    ap.add_argument("--batch", type=int, default=25)
    ap.add_argument("--seed", type=int, default=1000)
    ap.add_argument("--speed-runs", type=int, default=5)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    pipe = load_pipeline("embedded")
    clip = Clip.load(embedded_model_path() / "clip", embedded_model_path() / "tokenizer")
    scenes = render.sample_scenes(args.n, args.seed, "test")
    captions = render.sample_captions(scenes, args.seed)
    sched = GuidanceSchedule(scale=args.guidance)
    load0 = os.getloadavg()
    t0 = time.time()
    images = []
    for i in range(0, args.n, args.batch):
        res = generate(pipe, captions[i:i + args.batch], sched, steps=args.steps, seed=args.seed + i)
        images.append(res.images)
    images = np.concatenate(images)
    gen_s = time.time() - t0
    acc = judged_accuracy(images, [s.labels() for s in scenes])
    real = np.stack([render.render(s) for s in scenes])
    cs_gen = clip.clip_score(images, captions).numpy()
    cs_real = clip.clip_score(real, captions).numpy()

    unc_imgs = []
    for i in range(0, args.uncond, args.batch):
        unc_imgs.append(generate(pipe, [""] * min(args.batch, args.uncond - i), sched, steps=args.steps,
                                 seed=args.seed + 10**6 + i).images)
    one = [judge(im).count == 1 for im in np.concatenate(unc_imgs)]

    speed = []
    for r in range(args.speed_runs):
        res = generate(pipe, captions[:8], sched, steps=50, seed=r)
        speed.append(res.wall_seconds)
    load1 = os.getloadavg()

    out = {"n": args.n, "steps": args.steps, "guidance": args.guidance, "generation_seconds": gen_s,
           "accuracy": {}, "clip_score": {}, "uncond_one_object": {}, "speed_8_images_s": {},
           "machine": f"{platform.processor() or platform.machine()} x{os.cpu_count()}, torch {torch.__version__}",
           "loadavg_before": load0, "loadavg_after": load1}
    print(f"# embedded model quality: n={args.n} held-out prompts, DDIM {args.steps} steps, guidance {args.guidance}; "
          f"machine {out['machine']}; load {load0[0]:.2f} -> {load1[0]:.2f}")
    print("| measure | value | 95% CI | bar |")
    print("|---|---:|---|---|")
    bars = {"color": 0.95, "shape": 0.90, "position": 0.90, "size": 0.90, "texture": 0.80, "all": None}
    for a, bar in bars.items():
        k, n = int(acc[a].sum()), len(acc[a])
        lo, hi = wilson(k, n)
        out["accuracy"][a] = {"value": k / n, "ci": [lo, hi], "bar": bar}
        print(f"| accuracy {a} | {k / n:.1%} | [{lo:.1%}, {hi:.1%}] | {'>= ' + format(bar, '.0%') if bar else 'report'} |")
    k = int(acc["one_object"].sum())
    lo, hi = wilson(k, args.n)
    print(f"| exactly one object (prompted) | {k / args.n:.1%} | [{lo:.1%}, {hi:.1%}] | report |")
    ratio = cs_gen / np.maximum(cs_real, 1e-6)
    m, lo, hi = mean_ci(ratio)
    out["clip_score"] = {"generated": float(cs_gen.mean()), "real": float(cs_real.mean()), "ratio": [m, lo, hi]}
    print(f"| world CLIPScore generated / real | {cs_gen.mean():.2f} / {cs_real.mean():.2f} = {m:.3f} | [{lo:.3f}, {hi:.3f}] | >= 0.90 |")
    k = sum(one)
    lo, hi = wilson(k, len(one))
    out["uncond_one_object"] = {"value": k / len(one), "ci": [lo, hi], "n": len(one)}
    print(f"| unconditional: exactly one object (n={len(one)}) | {k / len(one):.1%} | [{lo:.1%}, {hi:.1%}] | >= 90% |")
    med = statistics.median(speed)
    out["speed_8_images_s"] = {"median": med, "runs": speed}
    print(f"| 8 images, 50 steps, full guidance (median of {len(speed)}) | {med:.2f} s | runs {', '.join(f'{s:.2f}' for s in speed)} | <= 5 s |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
