"""Memory of attention capture: peak RSS and kept bytes for keep = none / mean / per_head, each in a
fresh subprocess (so peak RSS is per setting), on the embedded model; plus the computed size of
full per-head maps for SD 1.5 at 512x512.

    python benchmarks/attention_memory.py [--model embedded] [--steps 50] [--images 8]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CHILD = r"""
import json, resource, sys, torch
from shapefirst.attention import capture_attention
from shapefirst.generate import generate
from shapefirst.models import load_pipeline
model, keep, steps, n = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
pipe = load_pipeline(model)
prompts = ["a large red striped circle on the left"] * n
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
if keep == "off":
    generate(pipe, prompts, steps=steps)
    kept = 0
else:
    with capture_attention(pipe, keep=keep, n_images=n) as cap:
        generate(pipe, prompts, steps=steps)
    kept = sum(t.numel() * t.element_size() for t in cap.maps.values()) + cap.mass.numel() * 4
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"keep": keep, "kept_bytes": kept, "peak_rss_kib": peak, "rss_after_load_kib": base}))
"""


def sd15_full_maps_bytes(calls: int = 50, heads: int = 8, tokens: int = 77, bytes_per: int = 4) -> dict:
    """SD 1.5 at 512x512 (64x64 latents): 16 cross-attention layers: down 2 each at 64, 32, 16 px;
    mid 1 at 8 px; up 3 each at 16, 32, 64 px."""
    pixels = 2 * (64 * 64 + 32 * 32 + 16 * 16) + 8 * 8 + 3 * (16 * 16 + 32 * 32 + 64 * 64)
    per_call = pixels * heads * tokens * bytes_per
    return {"pixel_layer_positions": pixels, "per_image_per_call_bytes": per_call,
            "per_image_50_calls_per_head_bytes": per_call * calls,
            "per_image_50_calls_head_mean_bytes": per_call * calls // heads,
            "per_image_50_calls_mass_only_bytes": calls * tokens * bytes_per}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--images", type=int, default=8)
    args = ap.parse_args()
    rows = []
    for keep in ("off", "none", "mean", "per_head"):
        r = subprocess.run([sys.executable, "-c", CHILD, args.model, keep, str(args.steps), str(args.images)],
                           capture_output=True, text=True, env={**os.environ})
        if r.returncode != 0:
            raise SystemExit(r.stderr[-2000:])
        rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
    print(f"# attention capture memory: model={args.model}, {args.images} images, {args.steps} steps, "
          f"conditional rows kept; load {os.getloadavg()[0]:.2f}")
    print("| keep | kept arrays | peak RSS | RSS after loading |")
    print("|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['keep']} | {r['kept_bytes'] / 2**20:.1f} MiB | {r['peak_rss_kib'] / 2**10:.0f} MiB | "
              f"{r['rss_after_load_kib'] / 2**10:.0f} MiB |")
    s = sd15_full_maps_bytes()
    print(f"\nSD 1.5 at 512x512, one image, 50 calls, 8 heads, 77 tokens, float32: full per-head maps "
          f"{s['per_image_50_calls_per_head_bytes'] / 2**30:.2f} GiB (x2 with the unconditional rows); "
          f"head-mean (keep='mean') {s['per_image_50_calls_head_mean_bytes'] / 2**20:.0f} MiB; "
          f"mass only (keep='none') {s['per_image_50_calls_mass_only_bytes'] / 2**10:.1f} KiB")


if __name__ == "__main__":
    main()
