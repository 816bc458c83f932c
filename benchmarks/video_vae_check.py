"""How well the moving world's VAE reconstructs held-out frames and clips (#34), from a `shapefirst train --arch video`
work folder: the phase-1 checkpoint (work/vae_frames.safetensors: single frames, judged by the image world's judge
against the judge's reading of the render) or the clip checkpoint / finished VAE (work/vae.safetensors or vae/: whole
clips, judged by judge_clip against the clip's labels). Prints the judged-right counts per attribute and the MSE.

    python benchmarks/video_vae_check.py /work/bench/video-train2 [--n 32] [--what frames|clips]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from safetensors.torch import load_file

from shapefirst.world import motion
from shapefirst.world.judge import judge
from shapefirst.world.train_video import VideoRecipe, clip_batch, frame_batch, make_vae


def recipe_of(out: Path) -> VideoRecipe:
    """The recipe a work folder was trained with (its marker's key, written by `shapefirst train`)."""
    import json

    key = json.loads((out / ".shapefirst.json").read_text())["key"]
    return VideoRecipe(**{k: tuple(v) if isinstance(v, list) else v for k, v in key.items()})


def load_vae(out: Path, what: str):
    """The VAE of a work folder: its finished vae/ for clips when there, else the phase's checkpoint (module 'm')."""
    from diffusers import AutoencoderKLWan

    if what == "clips" and (out / "vae" / "config.json").exists():
        return AutoencoderKLWan.from_pretrained(out / "vae").eval()
    ckpt = out / "work" / ("vae_frames.safetensors" if what == "frames" else "vae.safetensors")
    if not ckpt.exists():
        raise SystemExit(f"{ckpt} does not exist: pass the --out folder of `shapefirst train --arch video`")
    vae = make_vae(recipe_of(out))
    vae.load_state_dict({k[2:]: v for k, v in load_file(str(ckpt)).items() if k.startswith("m.")})
    return vae.eval()


def counts(pairs) -> dict[str, int]:
    got: dict[str, int] = {}
    for seen, want in pairs:
        for k, v in want.items():
            got[k] = got.get(k, 0) + (seen.get(k) == v)
    return got


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--what", choices=["frames", "clips"], default="frames")
    args = ap.parse_args()
    vae = load_vae(args.out, args.what)
    if args.what == "frames":
        x = frame_batch(12345, 0, args.n)  # another seed than training's (0)
    else:
        clips = motion.sample_clips(args.n, 99, "test")
        x = clip_batch(clips, motion.FRAMES)
    with torch.no_grad():
        rec = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
    to01 = lambda t: ((t + 1) / 2).permute(0, 2, 3, 4, 1).numpy()  # noqa: E731  [N, F, H, W, 3]
    if args.what == "frames":
        pairs = [(judge(a[0]).labels, judge(b[0]).labels) for a, b in zip(to01(rec), to01(x))]
    else:
        pairs = [(motion.judge_clip(a).labels, c.labels()) for a, c in zip(to01(rec), clips)]
    got = counts(pairs)
    print(f"{args.what}, n={args.n}: " + ", ".join(f"{k} {v}/{args.n}" for k, v in got.items())
          + f"; mse {float((rec - x).pow(2).mean()):.5f}")


if __name__ == "__main__":
    main()
