"""Trajectory recording: every denoiser call's timestep, x_t, noise predictions and x0-hat.

The recorder is fed by the guidance hook (shapefirst.guidance), which sees each call's inputs and
outputs. x_t is the denoiser's input in variance-preserving form: for DDPM-type schedulers it is
the latent itself; for Euler-type (sigma) schedulers the pipeline feeds x / sqrt(sigma^2 + 1),
which is exactly sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) eps, so one formula serves both:
    epsilon:       x0 = (x_t - sqrt(1 - ab) eps) / sqrt(ab)
    v_prediction:  x0 = sqrt(ab) x_t - sqrt(1 - ab) v
    sample:        x0 = prediction
    flow matching: x0 = x_t - sigma v   (SD3: FlowMatchEulerDiscreteScheduler)
alpha_bar at a (possibly fractional) timestep is interpolated in sigma space, as Euler does.
The same functions take the timestep as a tensor on the denoiser's device and then compute there, with
no host read (the guidance hook's shape-settled adaptive stop derives x0-hat this way at every call).
Flow matching: the denoiser gets the latent itself, x_t = (1 - sigma) x0 + sigma noise, with
timestep t = sigma * num_train_timesteps, and predicts v = noise - x0; the Euler step is
x_next = x_t + (sigma_next - sigma) v, so sigma_next = 0 lands exactly on x_t - sigma v. sigma is
the scheduler's own `sigmas[i]` at the index i of t in its `timesteps` (shift, dynamic shift and
Karras-type sigmas included; equal to t / num_train_timesteps whenever the pipeline did not pass
timesteps of its own), t / num_train_timesteps if t is not found.
Learned variance (PixArt: the transformer outputs 2C channels, noise then variance, for C latent
channels; the pipeline guides all 2C and gives the scheduler the first C): the recorder keeps the
first C channels of uncond/cond/combined, and x0 uses them.
Inpainting UNets (SD inpaint: 9 input channels = 4 latent + 1 mask + 4 masked-image latent, 4 output
channels): x_t is the input's first C channels, C the prediction's (the latents themselves).
x0 is the model's prediction as the formulas above give it: a scheduler that clips it before stepping
(clip_sample, DDPMScheduler's default; or thresholding) steps with the clipped one, so its last step lands on
x0.clamp(-clip_sample_range, clip_sample_range) (tests/test_family_trajectories.py, on HunyuanDiT).
Saved as safetensors (stacked arrays [calls, images, ...]) + JSON metadata.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from .errors import ShapefirstError
from .families import family
from .pipeline_call import running_call
from .results import atomic_write_bytes, atomic_write_text, png_bytes, spaced, strict_dumps
from .video_strip import (MAX_CALLS, MAX_FRAMES, MAX_SIDE, VIDEO_LAYOUTS, decode_latents, layout_for, write_animation,
                          write_strip)

FIELDS = ("x_t", "uncond", "cond", "combined", "x0")


_TABLES: dict = {}  # (id(alphas_cumprod), device, dtype) -> (alphas_cumprod, its sigma table there); a few kept


def _work_dtype(device) -> torch.dtype:
    """float64 where the device has it (MPS has not: float32 there)."""
    return torch.float32 if torch.device(device).type == "mps" else torch.float64


def _sigma_table(ac: torch.Tensor, device, dtype) -> torch.Tensor:
    """sqrt((1 - ab) / ab) per training timestep, on `device`; made once per scheduler and device (no host read:
    computed where alphas_cumprod lives, then moved)."""
    key = (id(ac), str(device), dtype)
    hit = _TABLES.get(key)
    if hit is None or hit[0] is not ac:
        while len(_TABLES) >= 16:
            _TABLES.pop(next(iter(_TABLES)))
        a = ac.detach().to(torch.float64 if ac.device.type != "mps" else torch.float32)
        hit = (ac, torch.sqrt((1 - a) / a).to(device, dtype))
        _TABLES[key] = hit
    return hit[1]


def _interp(table: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """np.interp(x, arange(len(table)), table) in torch, elementwise, on x's device (the same formula:
    (f[j+1] - f[j]) * (x - j) + f[j], clamped at both ends)."""
    n = table.shape[0]
    if n < 2:
        return table.reshape(()).expand_as(x).clone()
    xc = x.clamp(0, n - 1)
    j = xc.floor().long().clamp(max=n - 2)
    lo, hi = table.take(j), table.take(j + 1)
    return torch.where(xc >= n - 1, table[-1], (hi - lo) * (xc - j.to(x.dtype)) + lo)


def alpha_bar_at(scheduler, t):
    """alpha_bar (VP) at timestep t for the scheduler, interpolating sigma like Euler does.
    t a float: a float (host). t a tensor: a tensor of its shape on its device, computed there (no host read)."""
    ac = getattr(scheduler, "alphas_cumprod", None)
    if ac is None:
        raise ValueError(f"{type(scheduler).__name__} has no alphas_cumprod")
    if isinstance(t, torch.Tensor):
        dtype = _work_dtype(t.device)
        s = _interp(_sigma_table(ac, t.device, dtype), t.detach().to(dtype))
        return 1.0 / (1.0 + s * s)
    return float(alpha_bar_at(scheduler, torch.tensor(float(t), dtype=torch.float64)))


def is_flow_matching(scheduler) -> bool:
    """A flow-matching scheduler (x_t = (1 - s) x0 + s eps, the model predicts eps - x0): FlowMatch* schedulers, and
    DPM/UniPC solvers run on flow sigmas (Wan's UniPCMultistepScheduler with prediction_type "flow_prediction")."""
    cfg = getattr(scheduler, "config", {})
    if cfg.get("prediction_type") == "flow_prediction" or cfg.get("use_flow_sigmas"):
        return True
    return getattr(scheduler, "alphas_cumprod", None) is None and "shift" in cfg


def flow_sigma(scheduler, t):
    """sigma of a flow-matching scheduler at timestep t: sigmas[i] where timesteps[i] == t (within 0.5% relative:
    bfloat16 rounds a timestep by up to 0.2%), else sigmas[i] where timesteps[i] / num_train_timesteps == t (a
    pipeline that gives its transformer the timestep divided by 1000: Flux), else t / num_train_timesteps.
    t a float: a float; a tensor: a tensor on its device (no host read)."""
    if not isinstance(t, torch.Tensor):
        return float(flow_sigma(scheduler, torch.tensor(float(t), dtype=torch.float64)))
    dtype = _work_dtype(t.device)
    tt = t.detach().to(dtype)
    n_train = scheduler.config.num_train_timesteps
    plain = tt / n_train
    ts, sig = getattr(scheduler, "timesteps", None), getattr(scheduler, "sigmas", None)
    if not (isinstance(ts, torch.Tensor) and isinstance(sig, torch.Tensor) and len(ts) and len(sig)):
        return plain
    ts = ts.detach().to(t.device, dtype)
    sig = sig.detach().to(t.device, dtype)
    raw_i, raw_found = _nearest(ts, tt, tt.abs().clamp(min=1.0))
    scaled_i, scaled_found = _nearest(ts / n_train, tt, tt.abs().clamp(min=1.0 / n_train))
    last = len(sig) - 1
    out = torch.where(raw_found, sig.take(raw_i.clamp(max=last)),
                      torch.where(scaled_found, sig.take(scaled_i.clamp(max=last)), plain))
    return 1 - out if _inverted(scheduler) else out


def _inverted(scheduler) -> bool:
    """A flow scheduler whose sigmas run the other way (Mochi's `invert_sigmas`): its sigma s is the signal's share,
    the noise level is 1 - s, and the model predicts the negated velocity."""
    return bool(scheduler.config.get("invert_sigmas", False))


def _nearest(ts: torch.Tensor, t: torch.Tensor, scale: torch.Tensor):
    """(index of the entry of ts nearest to t, whether it is within 5e-3 * scale), elementwise over t."""
    d = (ts - t.unsqueeze(-1)).abs()
    i = d.argmin(-1, keepdim=True)
    return i.squeeze(-1), d.gather(-1, i).squeeze(-1) <= 5e-3 * scale


def predicted_x0(scheduler, t, x_t: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
    """x0-hat from the denoiser's input and (combined) output, for the scheduler's prediction type.
    A prediction with twice the channels of x_t (learned variance) uses its first half; an x_t with more
    channels than the prediction (an inpainting UNet's input) its first ones.
    t: a float (the recorder), or a tensor on x_t's device, 0-dim or one per row: then nothing is read back
    to the host (the guidance hook's shape-settled adaptive stop; the coefficients take x_t's dtype)."""
    if pred.dim() > 1 and x_t.dim() > 1 and pred.shape[1] == 2 * x_t.shape[1]:
        pred = pred[:, :x_t.shape[1]]
    if pred.dim() > 1 and x_t.dim() > 1 and x_t.shape[1] > pred.shape[1]:
        x_t = x_t[:, :pred.shape[1]]

    def coef(c):  # a tensor coefficient broadcasts over the rows of x_t
        if not isinstance(c, torch.Tensor):
            return c
        c = c.to(x_t.dtype)
        return c.view(-1, *[1] * (x_t.dim() - 1)) if c.dim() else c

    if is_flow_matching(scheduler):
        return x_t - coef(flow_sigma(scheduler, t)) * (-pred if _inverted(scheduler) else pred)
    kind = scheduler.config.prediction_type
    if kind == "sample":
        return pred
    if kind not in ("epsilon", "v_prediction"):
        raise ValueError(f"unknown prediction_type {kind!r}")
    ab = alpha_bar_at(scheduler, t)
    a, b = coef(ab ** 0.5), coef((1 - ab) ** 0.5)
    if kind == "epsilon":
        return (x_t - b * pred) / a
    return a * x_t - b * pred


@dataclass
class Trajectory:
    """Per-call arrays, each [calls, images, *latent] (latent: C, H, W for images; C, F, H, W for Wan and
    HunyuanVideo videos; F, C, H, W for CogVideoX; tokens, 4C for Flux's, Chroma's and Qwen-Image's packed latents:
    `layout`, the family's declared Family.latent_layout); `guided` is [calls, images] bool.
    `meta` holds the family, the layout, the pipeline's vae_scale_factor and the call's pixel height, width and
    frames where known.

    uncond/cond rows that were not computed at a call (unguided, or no CFG) are NaN."""

    timesteps: list[float] = field(default_factory=list)
    arrays: dict[str, torch.Tensor] = field(default_factory=dict)
    guided: torch.Tensor | None = None
    meta: dict = field(default_factory=dict)

    @property
    def n_calls(self) -> int:
        return len(self.timesteps)

    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.contiguous() for k, v in self.arrays.items()}
        tensors["guided"] = self.guided.to(torch.uint8).contiguous()
        tensors["timesteps"] = torch.tensor(self.timesteps, dtype=torch.float64)
        from safetensors.torch import save as save_bytes

        atomic_write_bytes(folder / "trajectory.safetensors", save_bytes(tensors))
        atomic_write_text(folder / "trajectory.json",
                          strict_dumps({"meta": self.meta, "timesteps": self.timesteps}, indent=2))
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> "Trajectory":
        folder = Path(folder)
        tensors = load_file(str(folder / "trajectory.safetensors"))
        info = json.loads((folder / "trajectory.json").read_text())
        guided = tensors.pop("guided").bool()
        tensors.pop("timesteps")
        return cls(timesteps=info["timesteps"], arrays=tensors, guided=guided, meta=info["meta"])

    @property
    def layout(self) -> str:
        """How each image's latents are laid out (shapefirst.video_strip: "image", "packed", "packed_frame", "video",
        "video_frames"): recorded with the trajectory, else the family's declaration or the arrays' dimensions."""
        if self.meta.get("layout"):
            return self.meta["layout"]
        x = self.arrays.get("x0", next(iter(self.arrays.values()), None))
        return layout_for(self.meta.get("family"), x.dim() - 2 if x is not None else 3)

    @property
    def is_video(self) -> bool:
        return self.layout in VIDEO_LAYOUTS

    # -- decoding and pictures -----------------------------------------------------------
    @torch.no_grad()
    def decode(self, vae, which: str = "x0", calls: list[int] | None = None, batch: int = 64) -> torch.Tensor:
        """Decode latents as the pipeline decodes them (shapefirst.video_strip.decode_latents: latents /
        scaling_factor + shift_factor, SD3's, Flux's, Chroma's and Lumina 2's shift; Wan's and Qwen-Image's
        latents_mean/latents_std; packed tokens unpacked, Qwen-Image's through its VAE's frame axis).
        Images: [len(calls), images, 3, H, W]; videos: [len(calls), videos, frames, 3, H, W]; in [0, 1]."""
        calls = list(range(self.n_calls)) if calls is None else list(calls)
        lat = self.arrays[which][calls]
        flat = lat.flatten(0, 1)
        layout = self.layout
        step = max(1, min(batch, 4)) if layout in VIDEO_LAYOUTS else batch  # a video decodes all its frames
        h, w, scale = self.meta.get("height"), self.meta.get("width"), self.meta.get("vae_scale_factor")
        outs = [decode_latents(vae, flat[i:i + step], layout, h, w, scale) for i in range(0, flat.shape[0], step)]
        img = torch.cat(outs)
        return img.view(len(calls), lat.shape[1], *img.shape[1:])

    def contact_sheet(self, vae, path: str | Path, max_columns: int = 25) -> Path:
        """PNG grid: one row per image, columns = decoded x0-hat at evenly spaced calls (last included).
        A video trajectory draws its strip instead (rows = calls, columns = frames; see `strip`)."""
        from PIL import Image

        if self.is_video:
            return self.strip(vae, path)
        calls = spaced(self.n_calls, max_columns)
        imgs = self.decode(vae, "x0", calls)  # [C, B, 3, H, W]
        grid = imgs.permute(1, 3, 0, 4, 2)  # B, H, C, W, 3
        b, h, c, w, _ = grid.shape
        arr = (grid.reshape(b * h, c * w, 3).numpy() * 255).round().astype(np.uint8)
        buf = png_bytes(Image.fromarray(arr))
        return atomic_write_bytes(Path(path), buf)

    def gif(self, vae, path: str | Path, duration_ms: int = 80) -> Path:
        """Animated GIF: one frame per call, images side by side. A video trajectory writes its animation instead
        (one animation frame per video frame, the calls side by side; see `animation`)."""
        from PIL import Image

        if self.is_video:
            return self.animation(vae, path, fps=max(1, 1000 // duration_ms))
        imgs = self.decode(vae, "x0")  # [T, B, 3, H, W]
        frames = []
        for t in range(imgs.shape[0]):
            row = imgs[t].permute(2, 0, 3, 1).reshape(imgs.shape[3], -1, 3)
            frames.append(Image.fromarray((row.numpy() * 255).round().astype(np.uint8)))
        import io

        bio = io.BytesIO()
        frames[0].save(bio, format="GIF", save_all=True, append_images=frames[1:], duration=duration_ms, loop=0)
        return atomic_write_bytes(Path(path), bio.getvalue())

    def strip(self, vae, path: str | Path, calls: list[int] | None = None, max_calls: int = MAX_CALLS,
              max_frames: int = MAX_FRAMES, max_side: int = MAX_SIDE) -> Path:
        """A video trajectory's PNG strip: per video, rows = calls (evenly spaced, last included), columns = its
        decoded frames (evenly spaced); the videos top to bottom (shapefirst.video_strip.write_strip)."""
        self._need_video("strip")
        return write_strip(self, vae, path, calls, max_calls, max_frames, max_side)

    def animation(self, vae, path: str | Path, calls: list[int] | None = None, max_calls: int = MAX_CALLS,
                  max_side: int = MAX_SIDE, fps: int = 8) -> Path:
        """A video trajectory's animation, GIF or lossless WebP by the file's suffix: one animation frame per video
        frame, showing that frame at each drawn call side by side (first call left); videos top to bottom."""
        self._need_video("animation")
        return write_animation(self, vae, path, calls, max_calls, max_side, fps)

    def _need_video(self, what: str) -> None:
        if not self.is_video:
            raise ShapefirstError(f"a {what} draws a video's frames, and this trajectory holds images "
                                  f"(layout {self.layout!r})", "use contact_sheet or gif for an image trajectory")


class TrajectoryRecorder:
    """Collects per-call tensors from the guidance hook; `.trajectory` assembles the last run."""

    def __init__(self, keep: tuple[str, ...] = FIELDS):
        self.keep = keep
        self._calls: list[dict] = []
        self.scheduler = None
        self.call_meta: dict = {}

    def start_run(self, pipe, batch: int):
        self._calls = []
        self.scheduler = pipe.scheduler
        self.call_meta = _call_meta(pipe)

    def record(self, call: int, t: float, x_t, uncond, cond, combined, guided, after: str = "uncond"):
        """One denoiser call. uncond is None when the call ran no CFG; for unguided images
        (guided False) only the `after` branch was computed, the other is stored as NaN."""
        x_t = x_t.detach().float().cpu()
        if x_t.dim() > 1 and combined.dim() > 1 and x_t.shape[1] > combined.shape[1]:
            x_t = x_t[:, :combined.shape[1]]  # inpainting UNets: input [latents, mask, masked image]
        c_lat = x_t.shape[1] if x_t.dim() > 1 else None

        def noise_part(p):  # learned variance: keep the first C channels (see the module docstring)
            return p[:, :c_lat] if c_lat is not None and p.dim() > 1 and p.shape[1] == 2 * c_lat else p

        combined, cond = noise_part(combined), noise_part(cond)
        uncond = None if uncond is None else noise_part(uncond)
        comb = combined.detach().float().cpu()
        nan = torch.full_like(comb, float("nan"))
        g = guided.cpu().view(-1, *[1] * (comb.dim() - 1))
        if uncond is None:
            u, c = nan, cond.detach().float().cpu()
        else:
            u, c = uncond.detach().float().cpu(), cond.detach().float().cpu()
            u = torch.where(g | (after == "uncond"), u, nan)
            c = torch.where(g | (after == "cond"), c, nan)
        vals = {"x_t": x_t, "uncond": u, "cond": c, "combined": comb,
                "x0": predicted_x0(self.scheduler, t, x_t, comb)}
        rec = {"t": float(t), "guided": guided.clone().cpu()}
        rec.update({k: v for k, v in vals.items() if k in self.keep})
        self._calls.append(rec)

    @property
    def trajectory(self) -> Trajectory:
        if not self._calls:
            raise ValueError("nothing was recorded: run the pipeline inside the recorder's schedule first")
        arrays = {k: torch.stack([c[k] for c in self._calls]) for k in self.keep}
        guided = torch.stack([c["guided"] for c in self._calls])
        sch = self.scheduler
        meta = {"scheduler": type(sch).__name__, "prediction_type": sch.config.get("prediction_type", "flow"),
                "n_calls": len(self._calls), **self.call_meta}
        meta["layout"] = _recorded_layout(meta.get("family"), arrays)
        return Trajectory([c["t"] for c in self._calls], arrays, guided, meta)


def _recorded_layout(family_name: str | None, arrays: dict) -> str | None:
    """The layout of the recorded latents (video_strip.layout_for); None when the family's declaration does not fit
    them (decoding the trajectory then refuses in one line, saying why; recording and saving still work)."""
    x = arrays.get("x0", arrays.get("x_t"))
    if x is None:
        return None
    try:
        return layout_for(family_name, x.dim() - 2)
    except ShapefirstError:
        return None


def _call_meta(pipe) -> dict:
    """The family, the pipeline's vae_scale_factor and the pixel height, width and frames of the pipeline call in
    progress (its `__call__`'s locals, after the pipeline filled in its defaults), for decoding: packed latents need
    the height, width and scale factor."""
    try:
        name = family(pipe).name
    except ShapefirstError:
        name = None
    call = running_call()
    sizes = {}
    for key in ("height", "width", "num_frames"):
        v = call.local(key) if call is not None and call.pipe is pipe else None
        sizes[key] = int(v) if isinstance(v, (int, np.integer)) and not isinstance(v, bool) else None
    scale = getattr(pipe, "vae_scale_factor", None)
    scale = int(scale) if isinstance(scale, (int, np.integer)) and not isinstance(scale, bool) and scale > 0 else None
    return {"family": name, "vae_scale_factor": scale, **sizes}
