"""What the late phase recomputes that it could reuse (#33 items 2, 3): per UNet (or transformer) part, its share
of a late call's time and how much its output changes from one late call to the next.

The setting: the shipped UNet world at the solver users pick (DPM-Solver++ 20, w=3), guidance stopped after the
first 40% of the calls, the conditional branch after (one row per image from then on). Plain torch forward hooks
on conv_in, every down block, the mid block, every up block and conv_out record each part's output and its wall
time at every call; the cross-attention modules (attn2) are timed as one group inside the blocks. For the late calls
the table gives each part's median share of the call's time and the median relative change of its output from the
previous call (||y_t - y_{t-1}|| / ||y_t||): a part whose output hardly changes while it costs much is what a late
cache can reuse (DeepCache reuses the deep blocks; T-GATE the cross-attention). The changes do not depend on the
machine; the time shares are timings: the script pins its threads and refuses a busy machine unless --allow-busy,
which flags the shares as void.

    python benchmarks/late_phase_reuse.py --n 16
    python benchmarks/late_phase_reuse.py --n 16 --model embedded-dit --scheduler ddim --steps 50   # the transformer
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

from shapefirst.guidance import GuidanceSchedule, denoiser_of, guidance_schedule
from shapefirst.models import default_guidance, load_pipeline, scheduler_for
from shapefirst.pipeline import call_defaults
from shapefirst.timing import check_alone, load_now, pin_threads
from shapefirst.world.prompts import world_prompts


def parts_of(denoiser) -> dict:
    """The parts timed in order: a UNet's conv_in, down blocks, mid block, up blocks, conv_out; a transformer's
    patch embedding, every block and its output projection."""
    if hasattr(denoiser, "transformer_blocks"):
        return {"pos_embed": denoiser.pos_embed, **{f"block{i}": b for i, b in enumerate(denoiser.transformer_blocks)},
                "proj_out": denoiser.proj_out}
    return {"conv_in": denoiser.conv_in, **{f"down{i}": b for i, b in enumerate(denoiser.down_blocks)},
            "mid": denoiser.mid_block, **{f"up{i}": b for i, b in enumerate(denoiser.up_blocks)},
            "conv_out": denoiser.conv_out}


class PartRecorder:
    """Forward pre/post hooks on named parts: per call, each part's output and elapsed seconds."""

    def __init__(self, denoiser):
        self.parts = parts_of(denoiser)
        self.attn2 = [m for n, m in denoiser.named_modules() if n.endswith("attn2")]
        self.calls: list[dict] = []
        self.handles = [denoiser.register_forward_pre_hook(self.start_call)]
        for name, mod in self.parts.items():
            self.handles += [mod.register_forward_pre_hook(self.tic(name)), mod.register_forward_hook(self.toc(name))]
        for mod in self.attn2:
            self.handles += [mod.register_forward_pre_hook(self.tic("attn2")),
                             mod.register_forward_hook(self.toc("attn2"))]

    def start_call(self, module, args):
        self.calls.append({"out": {}, "time": {}, "t0": {}})

    def tic(self, name):
        def hook(module, args):
            self.calls[-1]["t0"][name] = time.perf_counter()
        return hook

    def toc(self, name):
        def hook(module, args, out):
            call = self.calls[-1]
            call["time"][name] = call["time"].get(name, 0.0) + time.perf_counter() - call["t0"][name]
            y = out[0] if isinstance(out, tuple) else out
            if name != "attn2":
                call["out"][name] = y.detach().float().clone()
        return hook

    def close(self):
        for h in self.handles:
            h.remove()


def late_table(calls: list[dict], first_late: int) -> list[tuple[str, float, float]]:
    """(part, median share of a late call's time, median relative change from the previous call) per part."""
    rows = []
    for name in list(calls[0]["out"]) + ["attn2"]:
        shares, changes = [], []
        for i in range(first_late + 1, len(calls)):
            total = sum(v for k, v in calls[i]["time"].items() if k != "attn2")
            shares.append(calls[i]["time"].get(name, 0.0) / total)
            if name != "attn2":
                y, prev = calls[i]["out"][name], calls[i - 1]["out"][name]
                changes.append(float((y - prev).norm() / y.norm().clamp_min(1e-12)))
        rows.append((name, statistics.median(shares), statistics.median(changes) if changes else float("nan")))
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--scheduler", default="dpm++")
    ap.add_argument("--stop", type=float, default=0.4)
    ap.add_argument("--allow-busy", action="store_true")
    ap.add_argument("--model", default="embedded", help="embedded (UNet world) or embedded-dit (transformer world)")
    args = ap.parse_args()
    threads = pin_threads()
    void = check_alone(args.allow_busy)
    pipe = load_pipeline(args.model)
    w = default_guidance(args.model)
    prompts, _ = world_prompts(args.n, 0)
    rec = PartRecorder(denoiser_of(pipe))
    sched = GuidanceSchedule(w, stop=args.stop, after="cond")
    with scheduler_for(pipe, args.scheduler), guidance_schedule(pipe, sched) as hook:
        pipe(prompts, num_inference_steps=args.steps, guidance_scale=w, output_type="np",
             generator=[torch.Generator().manual_seed(i) for i in range(args.n)], **call_defaults(pipe))
    rec.close()
    first_late = sched.first_unguided_call(len(rec.calls))
    print(f"# late phase of {args.scheduler} {args.steps}, w={w}, stop={args.stop} cond (calls {first_late}.."
          f"{len(rec.calls) - 1} unguided), n={args.n} in one batch; {platform.machine()}, {os.cpu_count()} cores, "
          f"{threads} torch threads, load {load_now():.2f}" + (f"; TIME SHARES VOID: {void}" if void else ""))
    assert hook.evaluations_per_image()[0] == first_late * 2 + len(rec.calls) - first_late
    print(f"| {args.model} part | share of a late call's time | relative change from the previous call (median) |")
    print("|---|---:|---:|")
    for name, share, change in late_table(rec.calls, first_late):
        note = " (inside the blocks)" if name == "attn2" else ""
        print(f"| {name}{note} | {share:.1%} | {change:.3f} |")


if __name__ == "__main__":
    main()
