"""Real-architecture cost of classifier-free guidance: one UNet call at 2*b rows against b rows.

Stopping guidance early saves (t(2b) - t(b)) per unguided step, so the wall-clock saving depends
on t(2b)/t(b), not on the evaluation count alone (batching makes the 2-row pass cheaper than two
1-row passes). This builds diffusers.UNet2DConditionModel with the SD 1.5 and SDXL configs written
out below, random seeded weights (nothing is downloaded), and times ONE denoiser call at rows b and
2b, interleaved (b, 2b, b, 2b, ...) after one warm-up each; it reports medians, the median of the
per-pair ratios t(2b)/t(b), and the projected saving of guidance stops at 50 calls against the
evaluation-count bound. Runs on CPU (float32 by default) and also on CUDA (fp16) when available.
Run it alone (the load average is printed with each table). SDXL fp32 needs about 12 GB of RAM.

    python benchmarks/unet_speed.py [--models sd15,sdxl] [--sizes 64,128] [--repeats 5]
        [--threads N] [--dtype float32|bfloat16] [--batch8] [--model-config unet/config.json]
        [--out benchmarks/results/unet_speed.json]
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import time

import torch

from shapefirst.timing import check_alone
from diffusers import UNet2DConditionModel

COMMON = dict(in_channels=4, out_channels=4, layers_per_block=2, act_fn="silu", norm_num_groups=32,
              norm_eps=1e-5, flip_sin_to_cos=True, freq_shift=0, downsample_padding=1,
              center_input_sample=False, mid_block_scale_factor=1)
CONFIGS = {
    "sd15": dict(COMMON, sample_size=64, block_out_channels=[320, 640, 1280, 1280], cross_attention_dim=768,
                 attention_head_dim=8,
                 down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                 up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3),
    "sdxl": dict(COMMON, sample_size=128, block_out_channels=[320, 640, 1280], cross_attention_dim=2048,
                 attention_head_dim=[5, 10, 20], transformer_layers_per_block=[1, 2, 10],
                 down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                 up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                 addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816, use_linear_projection=True),
}
STEPS = 50
FRACTIONS = (0.3, 0.4, 0.5, 0.7)
DISTILLED = "guidance-distilled: runs no classifier-free guidance, nothing to remove"


def build(cfg, device, dtype, seed):
    """Random-weight UNet built directly in `dtype` on `device` (no fp32 copy of SDXL on the side)."""
    torch.manual_seed(seed)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            unet = UNet2DConditionModel.from_config(cfg)
    finally:
        torch.set_default_dtype(old)
    if any(t.dtype != dtype for t in unet.parameters()):  # built in dtype already: cast only stragglers
        unet.to(dtype=dtype)
    return unet.eval()


def make_inputs(unet, rows, size, device, dtype, seed):
    c = unet.config
    g = torch.Generator().manual_seed(seed)
    ctx = c.encoder_hid_dim or c.cross_attention_dim
    ctx = ctx[0] if isinstance(ctx, (list, tuple)) else ctx
    kw = dict(sample=torch.randn(rows, c.in_channels, size, size, generator=g),
              timestep=torch.full((rows,), 500), encoder_hidden_states=torch.randn(rows, 77, ctx, generator=g))
    if c.addition_embed_type == "text_time":
        text_dim = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
        kw["added_cond_kwargs"] = dict(text_embeds=torch.randn(rows, text_dim, generator=g),
                                       time_ids=torch.tensor([[size * 8, size * 8, 0, 0, size * 8, size * 8]] * rows))
    elif c.addition_embed_type is not None:
        raise SystemExit(f"addition_embed_type={c.addition_embed_type!r} is not supported by this benchmark")
    cast = lambda t: t.to(device, dtype) if t.is_floating_point() else t.to(device)  # noqa: E731
    return {k: ({kk: cast(vv) for kk, vv in v.items()} if isinstance(v, dict) else cast(v)) for k, v in kw.items()}


def call_seconds(unet, inputs, device):
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    unet(**inputs, return_dict=False)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def time_pair(unet, b, size, device, dtype, repeats, seed):
    """Interleaved timings of one call at b rows and at 2b rows, after one warm-up of each."""
    a, g = make_inputs(unet, b, size, device, dtype, seed), make_inputs(unet, 2 * b, size, device, dtype, seed)
    call_seconds(unet, a, device)
    call_seconds(unet, g, device)
    t1, t2 = [], []
    for _ in range(repeats):
        t1.append(call_seconds(unet, a, device))
        t2.append(call_seconds(unet, g, device))
    return t1, t2


def project(t1, t2, f):
    k = round(f * STEPS)
    sched, full = k * t2 + (STEPS - k) * t1, STEPS * t2
    return dict(f=f, k=k, schedule_s=sched, full_s=full, saved_s=full - sched, saved=1 - sched / full,
                bound=1 - (2 * k + (STEPS - k)) / (2 * STEPS))


def bench(name, cfg, device, dtype, args, machine, results):
    unet = build(cfg, device, dtype, args.seed)
    batches = [1, 8] if args.batch8 else [1]
    with torch.no_grad():
        for size in args.sizes:
            load0 = os.getloadavg()
            rows = []
            for b in batches:
                t1, t2 = time_pair(unet, b, size, device, dtype, args.repeats, args.seed)
                base = dict(model=name, size=size, device=device, dtype=str(dtype).replace("torch.", ""),
                            threads=torch.get_num_threads() if device == "cpu" else None, batch=b,
                            t1_s=statistics.median(t1), t2_s=statistics.median(t2),
                            ratio=statistics.median([y / x for x, y in zip(t1, t2)]), t1_all=t1, t2_all=t2)
                rows += [dict(base, **project(base["t1_s"], base["t2_s"], f)) for f in FRACTIONS]
            load1 = os.getloadavg()
            for r in rows:
                r.update(loadavg_before=load0, loadavg_after=load1)
            print_table(name, size, device, rows, machine, load0, load1, args.repeats)
            results.extend(rows)
            write(args.out, machine, results)
    del unet
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def print_table(name, size, device, rows, machine, load0, load1, repeats):
    r0 = rows[0]
    dev = torch.cuda.get_device_name(0) if device == "cuda" else \
        f"CPU {machine['processor']} x{machine['cpu_count']}, threads={r0['threads']}"
    print(f"\n### {name} latent {size}x{size} ({size * 8}px) on {dev}, dtype={r0['dtype']}, "
          f"torch {machine['torch']}, repeats={repeats}, {STEPS} calls")
    print(f"load average before {' '.join(f'{x:.2f}' for x in load0)}, after {' '.join(f'{x:.2f}' for x in load1)}")
    print("| batch b | t(b) s | t(2b) s | t(2b)/t(b) | guided fraction f | k | schedule s | full CFG s "
          "| saved s | saved | eval bound |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['batch']} | {r['t1_s']:.3f} | {r['t2_s']:.3f} | {r['ratio']:.3f} | {r['f']:.1f} | {r['k']} "
              f"| {r['schedule_s']:.1f} | {r['full_s']:.1f} | {r['saved_s']:.1f} | {r['saved']:.1%} "
              f"| {r['bound']:.1%} |", flush=True)


def write(path, machine, results):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as fh:
        json.dump(dict(machine=machine, rows=results), fh, indent=1)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=None, help="comma list of sd15,sdxl (default both, none with --model-config)")
    ap.add_argument("--model-config", default=None, help="a diffusers UNet config.json to time as well")
    ap.add_argument("--sizes", default="64,128", help="latent sizes (pixels / 8)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="CPU dtype (CUDA: fp16)")
    ap.add_argument("--batch8", action="store_true", help="also time rows 8 vs 16 (slow on CPU)")
    ap.add_argument("--no-cuda", action="store_true", help="skip the GPU even if one is available")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results/unet_speed.json")
    ap.add_argument("--allow-busy", action="store_true", help="time even beside other work (the table is flagged)")
    args = ap.parse_args()
    busy = check_alone(args.allow_busy)
    if busy:
        print(f"# FLAGGED, NOT A MEASUREMENT: {busy}")
    args.sizes = [int(s) for s in args.sizes.split(",")]
    torch.set_num_threads(args.threads)
    models = args.models if args.models is not None else ("" if args.model_config else "sd15,sdxl")
    todo = [(m, CONFIGS[m]) for m in models.split(",") if m]
    if args.model_config:
        with open(args.model_config) as fh:
            cfg = json.load(fh)
        if cfg.get("time_cond_proj_dim") is not None:
            print(f"{args.model_config}: {DISTILLED}")
        else:
            todo.append((args.model_config, cfg))
    devices = [("cpu", getattr(torch, args.dtype))]
    if torch.cuda.is_available() and not args.no_cuda:
        devices.append(("cuda", torch.float16))
    machine = dict(processor=platform.processor() or platform.machine(), platform=platform.platform(),
                   cpu_count=os.cpu_count(), torch=torch.__version__, threads=torch.get_num_threads(),
                   cpu_dtype=args.dtype, loadavg_start=os.getloadavg(), busy=busy,
                   cuda=torch.cuda.get_device_name(0) if len(devices) > 1 else None)
    results = []
    for name, cfg in todo:
        for device, dtype in devices:
            bench(name, cfg, device, dtype, args, machine, results)
    if results:
        print(f"\nwrote {len(results)} rows to {args.out}")


if __name__ == "__main__":
    main()
