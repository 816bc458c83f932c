"""Wall-clock saving of a guidance stop against full guidance, beside the evaluation-count bound.

Interleaved A/B: every repeat runs each configuration once, in a rotated order, so slow drifts of
the machine hit all configurations alike; the table shows medians of per-repeat ratios.
Run it alone (no training in the background): the load average is printed with the table.

    python benchmarks/guidance_stop.py [--model embedded] [--steps 50] [--repeats 5]
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics

import torch

from shapefirst.timing import check_alone, pin_threads

from shapefirst.generate import generate
from shapefirst.guidance import GuidanceSchedule


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="embedded", help="embedded, a diffusers folder, or 'tiny' (in-code random)")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--stops", default="0.25,0.5,0.75")
    ap.add_argument("--scheduler", default="ddim")
    ap.add_argument("--device", default=None)
    ap.add_argument("--guidance", type=float, default=None, help="default: the model's recommended scale")
    ap.add_argument("--allow-busy", action="store_true", help="time even beside other work (the table is flagged)")
    args = ap.parse_args()
    busy = check_alone(args.allow_busy)
    pin_threads()
    from shapefirst.models import default_guidance

    w = default_guidance(args.model) if args.guidance is None else args.guidance
    if args.model == "tiny":
        from shapefirst.tiny import tiny_sd_pipeline

        pipe = tiny_sd_pipeline()
    else:
        from shapefirst.models import load_pipeline

        pipe = load_pipeline(args.model, device=args.device)
    stops = [float(s) for s in args.stops.split(",")]
    configs = [("full", GuidanceSchedule(w))] + [
        (f"stop={s} {after}", GuidanceSchedule(w, stop=s, after=after)) for s in stops for after in ("uncond", "cond")]
    prompt = "a large red striped circle on the left"
    load0 = os.getloadavg()
    rows = []
    for batch in [int(b) for b in args.batches.split(",")]:
        prompts = [prompt] * batch
        generate(pipe, prompts, configs[0][1], steps=3, scheduler=args.scheduler)  # warm-up
        times = {name: [] for name, _ in configs}
        evals = {}
        for rep in range(args.repeats):
            order = configs[rep % len(configs):] + configs[:rep % len(configs)]
            for name, sched in order:
                res = generate(pipe, prompts, sched, steps=args.steps, seed=rep, scheduler=args.scheduler)
                times[name].append(res.wall_seconds)
                evals[name] = res.evaluations_per_image[0]
        for name, _ in configs:
            ratios = [t / f for t, f in zip(times[name], times["full"])]
            rows.append((batch, name, statistics.median(times[name]), statistics.median(ratios),
                         evals[name] / evals["full"]))
    load1 = os.getloadavg()
    dev = "cuda " + torch.cuda.get_device_name(0) if torch.cuda.is_available() and args.device != "cpu" else \
        f"CPU {platform.processor() or platform.machine()} x{os.cpu_count()}"
    print(f"# guidance stop benchmark: model={args.model} scheduler={args.scheduler} steps={args.steps} "
          f"guidance={w:g} "
          f"repeats={args.repeats} device={dev} torch={torch.__version__} threads={torch.get_num_threads()}")
    if busy:
        print(f"# FLAGGED, NOT A MEASUREMENT: {busy}")
    print(f"# load average before {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}, "
          f"after {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f}")
    print("| batch | schedule | median s | time / full (median of ratios) | saved | evaluations / full | "
          "saved bound |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for batch, name, med, ratio, ev in rows:
        print(f"| {batch} | {name} | {med:.3f} | {ratio:.3f} | {1 - ratio:.1%} | {ev:.3f} | {1 - ev:.1%} |")


if __name__ == "__main__":
    main()
