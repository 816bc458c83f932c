"""Two shapes-world models on the same prompts and seeds: paired differences of judged accuracy.

Reads the per-image judged correctness that benchmarks/guidance_curve.py saves for one configuration
(<results>/guidance_curve/<sampler>_<scale>.safetensors) for model A and model B (each run with its
own --results folder, the same --n and --seed), and prints per attribute and for all five: A's and
B's accuracy (Wilson 95% CI) and the paired difference B - A in points (normal 95% CI of the
per-image difference). The rule for shipping B instead of A (issue #13): B is "materially better"
when its all-five or shape accuracy is higher with the 95% CI of the paired difference above 0 and
no attribute is lower beyond its CI.

    python benchmarks/model_vs_model.py --a benchmarks/results --b /work/cand/results --config ddim_3
"""
from __future__ import annotations

import argparse
from pathlib import Path

from safetensors.torch import load_file

from shapefirst.metrics import mean_ci, wilson

ATTRS = ("all", "color", "shape", "position", "size", "texture")


def load(results: Path, config: str) -> dict:
    f = results / "guidance_curve" / f"{config}.safetensors"
    if not f.exists():
        raise SystemExit(f"{f} does not exist: run benchmarks/guidance_curve.py --results {results} first")
    return {k: v.numpy().astype(float) for k, v in load_file(str(f)).items()}


def verdict(rows: dict) -> str:
    better = any(rows[a][2][1] > 0 for a in ("all", "shape"))
    worse = [a for a in ATTRS if rows[a][2][2] < 0]
    if better and not worse:
        return "B is materially better (all five or shape higher beyond the CI, no attribute lower beyond it)"
    return "B is not materially better" + (f" (lower beyond the CI: {', '.join(worse)})" if worse else "")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--a", type=Path, required=True, help="results folder of model A (the shipped one)")
    ap.add_argument("--b", type=Path, required=True, help="results folder of model B (the candidate)")
    ap.add_argument("--config", default="ddim_3", help="configuration key, e.g. ddim_3")
    args = ap.parse_args()
    a, b = load(args.a, args.config), load(args.b, args.config)
    if len(a["all"]) != len(b["all"]):
        raise SystemExit(f"A has {len(a['all'])} images and B {len(b['all'])}: run both with the same --n and --seed")
    rows = {}
    print(f"# {args.config}: A = {args.a}, B = {args.b}, n = {len(a['all'])} (same prompts and seeds)\n")
    print("| attribute | A % [95% CI] | B % [95% CI] | B - A, points [95% CI] |\n|---|---|---|---|")
    for k in ATTRS:
        wa, wb = ((x[k].mean(), *wilson(int(x[k].sum()), len(x[k]))) for x in (a, b))
        d = mean_ci(100 * (b[k] - a[k]))
        rows[k] = (wa, wb, d)
        print(f"| {k} | {100 * wa[0]:.1f} [{100 * wa[1]:.1f}, {100 * wa[2]:.1f}] | {100 * wb[0]:.1f} "
              f"[{100 * wb[1]:.1f}, {100 * wb[2]:.1f}] | {d[0]:+.1f} [{d[1]:+.1f}, {d[2]:+.1f}] |")
    print(f"\n{verdict(rows)}")


if __name__ == "__main__":
    main()
