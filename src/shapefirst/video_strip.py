"""Trajectories of video and packed-token pipelines drawn: x0-hat latents decoded as the pipeline decodes its own
latents, a strip (rows = denoiser calls, columns = frames) and an animation (one animation frame per video frame,
the calls side by side: watch the video play at every drawn call at once).

Latent layouts a trajectory holds per image (`Trajectory.meta["layout"]`): the family's declaration,
shapefirst.families.Family.latent_layout, recorded with the trajectory:
  "image"         [C, H, W]     SD, SDXL, PixArt, SD3, Sana, HunyuanDiT, Kolors, CogView4, Lumina 2
  "packed"        [tokens, 4C]  Flux, Chroma: 2x2 latent patches as tokens, unpacked with the call's height and width
                                as FluxPipeline unpacks them (latent side 2 * (pixels // (2 * vae scale factor)))
  "packed_frame"  [tokens, 4C]  Qwen-Image: unpacked as "packed" to [C, 1, H, W] for its VAE's frame axis
                                (AutoencoderKLQwenImage), the first decoded frame kept, as QwenImagePipeline does
  "video"         [C, F, H, W]  Wan, HunyuanVideo (their pipelines pass the latents to the transformer as they are)
  "video_frames"  [F, C, H, W]  CogVideoX (its pipeline keeps frames before channels; decode_latents permutes)
  "video_per_frame" [C, F, H, W] Latte, AnimateDiff: decoded frame by frame by an image VAE (AutoencoderKL), as their
                                decode_latents ([N * F, C, H, W] through the VAE, frames back in place)
  "packed_video"  [tokens, C]   LTX-Video: one token per latent voxel (its transformer's patch size 1), unpacked to
                                [C, F, H, W] with H, W the call's height and width over the VAE's
                                spatial_compression_ratio, then denormalised with the VAE's latents_mean/latents_std
                                buffers and scaling_factor and decoded at the pipeline's default decode_timestep 0
                                (LTXPipeline's _unpack_latents, _denormalize_latents and decode)
  "video_frames_out" [C, F, H, W] Allegro: latents as "video", but its VAE (AutoencoderKLAllegro, tiled) returns
                                frames before channels; cropped to the call's height and width as AllegroPipeline
                                crops them (its crop to num_frames is not made: the VAE's frames, 4 per latent frame)
A pipeline of no declared family gets its layout from the latents' dimensions (2: packed, 3: image, 4: video); a
declared family's latents of other dimensions are refused (they are not what its pipeline decodes).
Packed 2x2 tokens are unpacked by their count and the call's aspect ratio (recorded height and width), whatever
the pipeline's own `vae_scale_factor` convention (Bria's is twice its VAE's compression).
Normalisation, from the VAE's config, as the pipelines decode: a VAE with `latents_mean` and `latents_std`
(AutoencoderKLWan, AutoencoderKLQwenImage) gets z = x / (1 / std) + mean per channel (WanPipeline's and
QwenImagePipeline's formula); any other z = x / scaling_factor + shift_factor (shift 0 where the VAE has none: the
pipelines that divide by scaling_factor alone, CogView4, Sana, HunyuanDiT, Kolors, HunyuanVideo, CogVideoX, come
with VAEs that have no shift_factor or 0.0). The VAE's output is mapped to [0, 1] with
(x / 2 + 0.5).clamp(0, 1), as diffusers' image and video processors postprocess it.
Resolution binning: PixArt and Sana generate at a binned size and then resize and crop their output to the size
asked for (resize_and_crop_tensor); a decoded x0-hat is the picture at the generated size, not resized (pass
use_resolution_binning=False for the pipeline's output at that size). HunyuanDiT's binning changes the size it
generates and returns alike.
This module imports no other shapefirst module but errors, families and results (trace.py delegates to it).
"""
from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import torch

from .errors import ShapefirstError
from .families import BY_NAME
from .results import atomic_write_bytes, png_bytes, spaced

LAYOUT_DIMS = {"image": 3, "packed": 2, "packed_frame": 2, "video": 4, "video_frames": 4, "video_per_frame": 4,
               "packed_video": 2, "video_frames_out": 4}
"""Each layout's dimensions per image (see the module docstring)."""
LAYOUTS = tuple(LAYOUT_DIMS)
VIDEO_LAYOUTS = ("video", "video_frames", "video_per_frame", "packed_video", "video_frames_out")
BY_DIMS = {2: "packed", 3: "image", 4: "video"}
"""The layout of a pipeline of no declared family, from its latents' dimensions per image."""

MAX_CALLS = 10
"""Calls drawn by default (evenly spaced, first and last included)."""
MAX_FRAMES = 16
"""Frames drawn by default in a strip (evenly spaced, first and last included)."""
MAX_SIDE = 256
"""A tile's longer side in pixels: larger frames are scaled down (antialiased) so a real-size strip stays a
picture, not a 10-gigapixel file. Tiny test videos are drawn at their own size."""


def layout_for(family_name: str | None, dims: int) -> str:
    """The layout of latents with `dims` dimensions per image: the family's declared latent_layout
    (shapefirst.families), or for a pipeline of no declared family the one its dimensions tell (BY_DIMS)."""
    fam = BY_NAME.get(family_name) if family_name else None
    if fam is not None:
        if LAYOUT_DIMS[fam.latent_layout] != dims:
            raise ShapefirstError(f"{fam.name}'s latents are laid out {fam.latent_layout!r} "
                                  f"({LAYOUT_DIMS[fam.latent_layout]} dimensions per image), these have {dims}",
                                  "record the trajectory through the pipeline's own call (generate(trace=True) or "
                                  "TrajectoryRecorder)")
        return fam.latent_layout
    if dims in BY_DIMS:
        return BY_DIMS[dims]
    raise ShapefirstError(f"latents with {dims} dimensions per image have no known layout",
                          "record a trajectory of an image (C, H, W) or video (C, F, H, W) pipeline")


def vae_scale(vae) -> int:
    """The VAE's spatial compression, as the pipelines compute their vae_scale_factor: 2 ** (len(block_out_channels)
    - 1) (Flux, Chroma), or 2 ** len(temperal_downsample) (Qwen-Image's AutoencoderKLQwenImage)."""
    cfg = vae.config
    if getattr(cfg, "block_out_channels", None):
        return 2 ** (len(cfg.block_out_channels) - 1)
    if getattr(cfg, "temperal_downsample", None) is not None:
        return 2 ** len(cfg.temperal_downsample)
    raise ShapefirstError(f"{type(vae).__name__} states no spatial compression (block_out_channels or "
                          "temperal_downsample)", "record the trajectory with shapefirst's TrajectoryRecorder (it "
                          "keeps the pipeline's vae_scale_factor)")


def unpack(latents: torch.Tensor, height: int | None, width: int | None, scale: int | None = None) -> torch.Tensor:
    """Packed tokens [N, tokens, 4C] (Flux, Chroma, Bria, Qwen-Image) -> latents [N, C, h, w] (the 2x2 patches put
    back in place, as their pipelines' _unpack_latents). The latent's sides follow from the token count and the call's
    aspect ratio (height / width; square without them), so no pipeline's own vae_scale_factor convention is needed
    (Bria's is twice its VAE's compression, Flux's equal to it); `scale` is accepted and not needed."""
    n, tokens, d = latents.shape
    ratio = (int(height) / int(width)) if height and width else 1.0
    rows = max(1, round(math.sqrt(tokens * ratio)))
    cols = tokens // rows
    h, w = 2 * rows, 2 * cols
    if d % 4 or rows * cols != tokens:
        raise ShapefirstError(f"{tokens} packed tokens of width {d} do not make a latent of aspect {ratio:g}",
                              "record it with shapefirst's TrajectoryRecorder (it keeps the call's height and width)")
    x = latents.reshape(n, rows, cols, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(n, d // 4, h, w)


def unpack_video(vae, latents: torch.Tensor, height: int | None, width: int | None) -> torch.Tensor:
    """LTX-Video's packed tokens [N, tokens, C] -> latents [N, C, frames, h, w], as LTXPipeline._unpack_latents
    (patch size 1): h, w the call's height and width over the VAE's spatial_compression_ratio, frames the rest."""
    n, tokens, c = latents.shape
    scale = getattr(vae, "spatial_compression_ratio", None)
    h, w = (int(height) // scale, int(width) // scale) if height and width and scale else (0, 0)
    if c != vae.config.latent_channels or not h * w or tokens % (h * w):
        raise ShapefirstError(f"{tokens} packed video tokens of width {c} do not make "
                              f"{vae.config.latent_channels}-channel latent frames of {h}x{w}",
                              "record it with shapefirst's TrajectoryRecorder (it keeps the call's height and width); "
                              "transformers with a patch size above 1 are not read")
    return latents.reshape(n, tokens // (h * w), h, w, c).permute(0, 4, 1, 2, 3)


def decode_packed_video(vae, latents: torch.Tensor, height: int | None, width: int | None) -> torch.Tensor:
    """LTX-Video's packed tokens [N, tokens, C] -> the VAE's output [N, 3, frames, H, W], as LTXPipeline decodes them
    (see "packed_video" in the module docstring)."""
    z = unpack_video(vae, latents, height, width)
    shape = (1, z.shape[1], 1, 1, 1)
    z = z * vae.latents_std.view(shape).to(z) / vae.config.scaling_factor + vae.latents_mean.view(shape).to(z)
    temb = torch.zeros(z.shape[0], device=z.device, dtype=z.dtype) if vae.config.timestep_conditioning else None
    return vae.decode(z, temb).sample


def normalise_for_vae(vae, z: torch.Tensor) -> torch.Tensor:
    """Latents as the denoiser sees them -> the VAE's input (see the module docstring); channels are dim 1."""
    cfg = vae.config
    mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
    if mean is not None and std is not None:
        shape = (1, len(mean)) + (1,) * (z.dim() - 2)
        m = torch.tensor(mean, dtype=z.dtype, device=z.device).view(shape)
        inv = 1.0 / torch.tensor(std, dtype=z.dtype, device=z.device).view(shape)
        return z / inv + m
    shift = getattr(cfg, "shift_factor", None) or 0.0
    return z / cfg.scaling_factor + shift


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor, layout: str, height: int | None = None,
                   width: int | None = None, scale: int | None = None) -> torch.Tensor:
    """Latents [N, ...] in `layout` -> images [N, 3, H, W] or videos [N, frames, 3, H, W], float32 in [0, 1] on the
    CPU. height/width: the call's pixel size and scale: the pipeline's vae_scale_factor (packed layouts only; scale
    None: the VAE's, vae_scale)."""
    if layout not in LAYOUTS:
        raise ShapefirstError(f"unknown latent layout {layout!r}", f"use one of {LAYOUTS}")
    p = next(vae.parameters())
    z = latents.to(p.device, p.dtype)
    if layout in ("packed", "packed_frame"):
        z = unpack(z, height, width)
    if layout == "packed_frame":
        z = z.unsqueeze(2)  # [N, C, 1, H, W], as QwenImagePipeline._unpack_latents
    elif layout == "video_frames":
        z = z.permute(0, 2, 1, 3, 4)  # [N, C, F, H, W], as CogVideoXPipeline.decode_latents
    elif layout == "video_per_frame":
        n, frames = z.shape[0], z.shape[2]
        z = z.permute(0, 2, 1, 3, 4).flatten(0, 1)  # [N * F, C, H, W], as LattePipeline.decode_latents
    if layout == "packed_video":
        out = decode_packed_video(vae, z, height, width).float().cpu()
    else:
        out = vae.decode(normalise_for_vae(vae, z)).sample.float().cpu()
    if layout == "packed_frame":
        out = out[:, :, 0]  # the one frame, as QwenImagePipeline
    elif layout == "video_frames_out":
        out = out.permute(0, 2, 1, 3, 4)[..., :height, :width]  # [N, 3, F, H, W] cropped, as AllegroPipeline
    out = (out / 2 + 0.5).clamp(0, 1)
    if layout == "video_per_frame":
        return out.unflatten(0, (n, frames))  # [N, F, 3, H, W]
    return out.permute(0, 2, 1, 3, 4).contiguous() if out.dim() == 5 else out


def shrink(frames: torch.Tensor, max_side: int = MAX_SIDE) -> torch.Tensor:
    """Frames [..., 3, H, W] scaled down (antialiased bilinear) so the longer side is at most max_side."""
    h, w = frames.shape[-2:]
    if max(h, w) <= max_side:
        return frames
    f = max_side / max(h, w)
    size = (max(1, round(h * f)), max(1, round(w * f)))
    flat = frames.reshape(-1, *frames.shape[-3:])
    out = torch.nn.functional.interpolate(flat, size=size, mode="bilinear", antialias=True, align_corners=False)
    return out.reshape(*frames.shape[:-2], *size).clamp(0, 1)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    return (x.clamp(0, 1).numpy() * 255).round().astype(np.uint8)


def strip_array(videos: torch.Tensor) -> np.ndarray:
    """Decoded videos [calls, N, frames, 3, H, W] -> uint8 [N * calls * H, frames * W, 3]: per video a block
    whose row r is call r and column c frame c; the videos' blocks stacked top to bottom."""
    calls, n, frames, _, h, w = videos.shape
    grid = videos.permute(1, 0, 4, 2, 5, 3)  # N, calls, H, frames, W, 3
    return to_uint8(grid.reshape(n * calls * h, frames * w, 3))


def animation_frames(videos: torch.Tensor) -> list[np.ndarray]:
    """Decoded videos [calls, N, frames, 3, H, W] -> one uint8 picture [N * H, calls * W, 3] per video frame:
    the calls side by side (first call left), the videos top to bottom."""
    calls, n, frames, _, h, w = videos.shape
    grid = videos.permute(2, 1, 4, 0, 5, 3)  # frames, N, H, calls, W, 3
    return [to_uint8(g.reshape(n * h, calls * w, 3)) for g in grid]


def animation_bytes(pictures: list[np.ndarray], fmt: str, fps: int = 8) -> bytes:
    """An animated GIF or lossless WebP of the pictures (Pillow), looping."""
    from PIL import Image

    if fmt not in ("gif", "webp"):
        raise ShapefirstError(f"animation format {fmt!r} is not gif or webp", "name the file .gif or .webp")
    ims = [Image.fromarray(p) for p in pictures]
    bio = io.BytesIO()
    extra = {"lossless": True} if fmt == "webp" else {}
    ims[0].save(bio, format=fmt.upper(), save_all=True, append_images=ims[1:], duration=max(1, 1000 // fps), loop=0,
                **extra)
    return bio.getvalue()


def decode_calls(traj, vae, calls: list[int], which: str = "x0", max_side: int = MAX_SIDE,
                 max_frames: int | None = None) -> torch.Tensor:
    """The trajectory's decoded videos at `calls`, [len(calls), N, frames, 3, H', W'], decoding one call at a time
    and keeping only max_frames evenly spaced frames (None: all), scaled to max_side (bounded memory)."""
    out, keep = [], None
    for c in calls:
        v = traj.decode(vae, which, [c])[0]  # [N, F, 3, H, W]
        if keep is None:
            keep = list(range(v.shape[1])) if max_frames is None else spaced(v.shape[1], max_frames)
        out.append(shrink(v[:, keep], max_side))
    return torch.stack(out)


def write_strip(traj, vae, path: str | Path, calls: list[int] | None = None, max_calls: int = MAX_CALLS,
                max_frames: int = MAX_FRAMES, max_side: int = MAX_SIDE, which: str = "x0") -> Path:
    """PNG: per video, rows = calls (evenly spaced, last included; or `calls`), columns = frames (evenly spaced)."""
    from PIL import Image

    calls = spaced(traj.n_calls, max_calls) if calls is None else list(calls)
    videos = decode_calls(traj, vae, calls, which, max_side, max_frames)
    return atomic_write_bytes(Path(path), png_bytes(Image.fromarray(strip_array(videos))))


def write_animation(traj, vae, path: str | Path, calls: list[int] | None = None, max_calls: int = MAX_CALLS,
                    max_side: int = MAX_SIDE, fps: int = 8, which: str = "x0") -> Path:
    """Animated GIF or lossless WebP (by the file's suffix): one animation frame per video frame, the drawn calls
    side by side (first call left, last call right), the videos top to bottom."""
    path = Path(path)
    fmt = path.suffix.lower().lstrip(".")
    calls = spaced(traj.n_calls, max_calls) if calls is None else list(calls)
    videos = decode_calls(traj, vae, calls, which, max_side)
    return atomic_write_bytes(path, animation_bytes(animation_frames(videos), fmt, fps))
