"""One prepared command for a GPU machine (#33 item 4): nothing downloaded, random weights at real sizes built from
the published configs, fp16 (bf16 for the transformers).

    python benchmarks/gpu.py --out gpu.json            # real sizes, on a GPU: about 10 minutes on one H100
    python benchmarks/gpu.py --size tiny --device cpu  # the same measurements on tiny in-code models (the tests)

Per model (SD 1.5 UNet, SDXL UNet, a Wan-2.1-1.3B-sized transformer, a Flux.1-sized transformer with true CFG;
the denoiser at its real size on the latents of its usual resolution (512 px, 1024 px, 480x832x33 frames,
1024 px), the text encoders and VAE tiny: `output_type="latent"`, so the denoiser's calls are what is timed), at
batch 1 and 4 (the cross-attention widths follow the tiny text encoders: 0.84B parameters for SD 1.5's UNet,
2.24B for SDXL's, 1.41B for Wan's, 11.9B for Flux's, counted on the meta device here):
- plain (no hook), the hook without a stop (its own overhead), the stop at 0.5 (conditional branch after), and
  the best composed setting (UNets: stop 0.4 cond + kept cross-attention + DeepCache-style interval 3);
- A/B interleaved repeats, medians of per-repeat ratios to plain, the load average recorded;
- on CUDA: one stopped run under torch.cuda.set_sync_debug_mode("error") (a host sync in the per-call path
  raises), and the UNet under torch.compile (compile time, then the ratio with the stop).
Prints a markdown table and writes the rows as JSON (`--out`)."""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from contextlib import nullcontext

import torch

from shapefirst.timing import check_alone, pin_threads

from shapefirst.cache import LateCache, late_cache
from shapefirst.guidance import GuidanceSchedule, guidance_schedule

W = 5.0


def real_sd15():
    from diffusers import UNet2DConditionModel

    from shapefirst.tiny import tiny_sd_pipeline

    pipe = tiny_sd_pipeline()
    pipe.unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=pipe.text_encoder.config.hidden_size,
                                     block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                                     attention_head_dim=8)
    return pipe, {"height": 64 * pipe.vae_scale_factor, "width": 64 * pipe.vae_scale_factor}  # SD 1.5's 64x64 latents


def real_sdxl():
    from diffusers import UNet2DConditionModel

    from shapefirst.tiny import tiny_sdxl_pipeline

    pipe = tiny_sdxl_pipeline()
    dims = pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
    pipe.unet = UNet2DConditionModel(
        sample_size=128, cross_attention_dim=dims, block_out_channels=(320, 640, 1280), layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(5, 10, 20),
        transformer_layers_per_block=(1, 2, 10), addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=6 * 256 + pipe.text_encoder_2.config.projection_dim,
        use_linear_projection=True)
    return pipe, {"height": 128 * pipe.vae_scale_factor, "width": 128 * pipe.vae_scale_factor}  # 1024 px latents


def real_wan():
    from diffusers import WanTransformer3DModel

    from shapefirst.tiny import tiny_wan_pipeline

    pipe = tiny_wan_pipeline()
    text_dim = pipe.text_encoder.config.d_model
    pipe.transformer = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128,
                                             in_channels=16, out_channels=16, text_dim=text_dim, freq_dim=256,
                                             ffn_dim=8960, num_layers=30, cross_attn_norm=True,
                                             qk_norm="rms_norm_across_heads")
    return pipe, {"height": 480, "width": 832, "num_frames": 33, "negative_prompt": ""}


def real_flux():
    from diffusers import FluxTransformer2DModel

    from shapefirst.tiny import tiny_flux_pipeline

    pipe = tiny_flux_pipeline()
    pipe.transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, out_channels=16, num_layers=19,
                                              num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
                                              joint_attention_dim=pipe.text_encoder_2.config.d_model,
                                              pooled_projection_dim=pipe.text_encoder.config.projection_dim,
                                              axes_dims_rope=[16, 56, 56])
    side = 128 * pipe.vae_scale_factor  # Flux's 1024 px: 128x128 latents, 64x64 tokens after packing
    return pipe, {"height": side, "width": side, "negative_prompt": "", "true_cfg_scale": W}


def tiny_models():
    from shapefirst.tiny import tiny_flux_pipeline, tiny_sd_pipeline, tiny_sdxl_pipeline, tiny_wan_pipeline

    return {"sd15": lambda: (tiny_sd_pipeline(), {}),
            "sdxl": lambda: (tiny_sdxl_pipeline(), {}),
            "wan": lambda: (tiny_wan_pipeline(), {"height": 16, "width": 16, "num_frames": 5, "negative_prompt": "",
                                                  "max_sequence_length": 16}),
            "flux": lambda: (tiny_flux_pipeline(), {"height": 16, "width": 16, "negative_prompt": "",
                                                    "true_cfg_scale": W, "max_sequence_length": 16})}


REAL = {"sd15": real_sd15, "sdxl": real_sdxl, "wan": real_wan, "flux": real_flux}


def settings(name: str) -> dict:
    """name -> (schedule or None for no hook, late cache or None)."""
    out = {"plain": (None, None), "hook, no stop": (GuidanceSchedule(W), None),
           "stop 0.5 cond": (GuidanceSchedule(W, stop=0.5, after="cond"), None)}
    if name in ("sd15", "sdxl"):
        out["stop 0.4 cond +kept+deep3"] = (GuidanceSchedule(W, stop=0.4, after="cond"), LateCache("kept", 3))
    return out


def one_run(pipe, kw: dict, batch: int, steps: int, schedule, cache, device) -> tuple[float, list[int]]:
    ctx = guidance_schedule(pipe, schedule) if schedule is not None else nullcontext()
    with ctx as hook, (late_cache(pipe, cache) if cache is not None else nullcontext()):
        sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
        sync()
        t0 = time.perf_counter()
        pipe(["a red circle"] * batch, num_inference_steps=steps, guidance_scale=W, output_type="latent", **kw)
        sync()
        return time.perf_counter() - t0, hook.evaluations_per_image() if hook is not None else [2 * steps] * batch


def measure(name: str, pipe, kw: dict, batch: int, steps: int, repeats: int, device: str) -> list[dict]:
    cfgs = settings(name)
    one_run(pipe, kw, batch, 2, None, None, device)  # warm-up
    times = {k: [] for k in cfgs}
    evals = {}
    for rep in range(repeats):
        keys = list(cfgs)
        for k in keys[rep % len(keys):] + keys[:rep % len(keys)]:
            t, e = one_run(pipe, kw, batch, steps, *cfgs[k], device)
            times[k].append(t)
            evals[k] = sum(e) / len(e)
    rows = []
    for k in cfgs:
        ratio = statistics.median(t / p for t, p in zip(times[k], times["plain"]))
        rows.append({"model": name, "batch": batch, "setting": k, "median_s": statistics.median(times[k]),
                     "time_ratio": ratio, "evaluations_per_image": evals[k]})
    return rows


def sync_check(pipe, kw: dict, device: str) -> str:
    """A stopped run under torch.cuda.set_sync_debug_mode('error'): any host sync in a hook raises."""
    if not device.startswith("cuda"):
        return "not run (no CUDA)"
    torch.cuda.set_sync_debug_mode("error")
    try:
        one_run(pipe, kw, 1, 4, GuidanceSchedule(W, stop=0.5, after="cond"), None, device)
        return "no host sync"
    except RuntimeError as e:
        return f"sync: {str(e).splitlines()[0][:120]}"
    finally:
        torch.cuda.set_sync_debug_mode("default")


def compiled(pipe, kw: dict, steps: int, device: str) -> dict:
    """The denoiser under torch.compile (the hook outside it): compile time, then stop 0.5 against plain."""
    den = "unet" if hasattr(pipe, "unet") else "transformer"
    setattr(pipe, den, torch.compile(getattr(pipe, den)))
    t0 = time.perf_counter()
    one_run(pipe, kw, 1, steps, GuidanceSchedule(W, stop=0.5, after="cond"), None, device)
    first = time.perf_counter() - t0
    plain, _ = one_run(pipe, kw, 1, steps, None, None, device)
    stop, _ = one_run(pipe, kw, 1, steps, GuidanceSchedule(W, stop=0.5, after="cond"), None, device)
    return {"first_run_s (compiles)": first, "stop_over_plain": stop / plain}


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", choices=["real", "tiny"], default="real")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--models", default="sd15,sdxl,wan,flux")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--compile", action="store_true", help="also time the denoiser under torch.compile")
    ap.add_argument("--out", default=None)
    ap.add_argument("--allow-busy", action="store_true", help="time even beside other work (the table is flagged)")
    args = ap.parse_args(argv)
    busy = check_alone(args.allow_busy) if args.device == "cpu" else None
    threads = torch.get_num_threads()
    if args.device == "cpu":
        pin_threads()
    try:
        return _run(args, busy)
    finally:
        torch.set_num_threads(threads)  # a caller (the tests) gets its own thread count back


def _run(args, busy) -> list[dict]:
    build = REAL if args.size == "real" else tiny_models()
    dtype = torch.float16 if args.device.startswith("cuda") else torch.float32
    load0 = os.getloadavg()
    rows, notes = [], {}
    for name in args.models.split(","):
        pipe, kw = build[name]()
        pipe.to(args.device, dtype=torch.bfloat16 if name in ("wan", "flux") and dtype == torch.float16 else dtype)
        pipe.set_progress_bar_config(disable=True)
        for batch in [int(b) for b in args.batches.split(",")]:
            rows += measure(name, pipe, kw, batch, args.steps, args.repeats, args.device)
        notes[name] = {"sync": sync_check(pipe, kw, args.device)}
        if args.compile:
            notes[name]["compile"] = compiled(pipe, kw, args.steps, args.device)
        del pipe
    device = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else \
        f"CPU {platform.machine()} x{os.cpu_count()}"
    print(f"# {args.size} sizes on {device}, torch {torch.__version__}, {args.steps} steps, {args.repeats} repeats; "
          f"load {load0[0]:.2f} before, {os.getloadavg()[0]:.2f} after")
    if busy:
        print(f"# FLAGGED, NOT A MEASUREMENT: {busy}")
    print("| model | batch | setting | median s | time / plain | saved | evaluations per image |")
    print("|---|---:|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['batch']} | {r['setting']} | {r['median_s']:.3f} | {r['time_ratio']:.3f} | "
              f"{1 - r['time_ratio']:+.1%} | {r['evaluations_per_image']:.1f} |")
    for name, n in notes.items():
        print(f"# {name}: {n}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": device, "size": args.size, "rows": rows, "notes": notes, "busy": busy}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
