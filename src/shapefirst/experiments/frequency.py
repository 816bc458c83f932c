"""Frequency experiment: low frequencies survive the forward process longest, and are decided first.

(a) Forward process on real data with the model's own noise schedule
    (`pipe.scheduler.alphas_cumprod`, t = 0, stride, 2*stride, ... < len): band norms of the signal
    sqrt(ab) x0 and of the noise sqrt(1-ab) eps, per band, in
    - "pixel": shapes-world renders (sample_scenes(n_images, seed, "test")) at the pipeline's image size;
    - "photo": one natural photograph (scikit-image's astronaut) resized to that size (if photo=True);
    - "latent": the renders encoded by the pipeline's VAE (latent_dist.mean * scaling_factor);
    - "latent_photo": the photograph encoded likewise (if photo=True).
    White noise spreads its energy evenly over all frequencies while images concentrate theirs in
    the low band, so the low band's SNR stays above the high band's at every t.
(b) Reverse process: `prompts` (default: the captions of those scenes) generated with trace=True;
    band norms of x_t and x0-hat per denoiser call in latent space and of the decoded x0-hat in
    pixel space ([-1, 1] scale), and the settling call of each band of x0-hat
    (`shapefirst.frequency.settling_call`: first call from which the band stays within `tol`
    relative L2 of its final value).
(c) Radially averaged power spectra of the generated images, the renders and the photo (pixel
    space, [-1, 1] scale) and of the final latents and the renders' latents.
Videos (`run_spacetime`, the report's "spacetime" section): x0-hat of a video trajectory split in space (the disc
of shapefirst.frequency.split_bands, every frame) and in time (shapefirst.frequency.split_temporal along the
frames, every pixel), in the denoiser's latent space: the band norms per call and the call from which each band
keeps its final value. It reads a saved trajectory only (no model run), so any video family's traced generation
serves, flow matching included.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import ShapefirstError
from ..frequency import (DEFAULT_RADIUS, DEFAULT_TEMPORAL_RADIUS, DEFAULT_TOL, band_energy_fraction,
                         forward_process_bands, radial_power_spectrum, settling_call, spacetime_bands, split_bands,
                         split_temporal, trajectory_bands)
from ..generate import check_prompts, generate
from ..guidance import GuidanceSchedule
from ..pipeline import denoiser_of
from ..results import Result, save_figure
from ..settling import settled_from
from ..trace import is_flow_matching
from .registry import Analysis, Inputs, Settings, Summary
from ..world.render import render_batch, sample_captions, sample_scenes
from .stages import decode_chunks, summarize

FORWARD_STRIDE = 10
"""Forward process: every 10th training timestep (0, 10, ..., 990 for 1000)."""

BANDS = ("low", "high")


def image_size(pipe) -> tuple[int, int]:
    """(H, W) of the pipeline's default output: the denoiser's sample_size * VAE scale factor."""
    ss = denoiser_of(pipe).config.sample_size
    h, w = (ss, ss) if isinstance(ss, int) else tuple(ss)
    f = getattr(pipe, "vae_scale_factor", None) or 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    return int(h * f), int(w * f)


def photo_image(size: tuple[int, int]) -> torch.Tensor:
    """scikit-image's astronaut photograph as [1, 3, H, W] float32 in [-1, 1] (antialiased resize)."""
    from skimage import data

    x = torch.from_numpy(np.ascontiguousarray(data.astronaut())).permute(2, 0, 1)[None].float() / 255.0
    x = torch.nn.functional.interpolate(x, size=tuple(size), mode="bilinear", antialias=True, align_corners=False)
    return (x * 2 - 1).clamp(-1, 1)


def world_renders(n: int, seed: int, size: tuple[int, int]) -> torch.Tensor:
    """Renders of sample_scenes(n, seed, "test") at `size`, [n, 3, H, W] float32 in [-1, 1]."""
    h, w = size
    x = torch.from_numpy(render_batch(sample_scenes(n, seed, "test"), res=h))
    if w != h:
        x = torch.nn.functional.interpolate(x, size=(h, w), mode="bilinear", antialias=True, align_corners=False)
    return x


@torch.no_grad()
def encode_latents(vae, x: torch.Tensor, batch: int = 16) -> torch.Tensor:
    """Images [N, 3, H, W] in [-1, 1] -> latents as the denoiser sees them (mean * scaling_factor), float32 CPU."""
    p = next(vae.parameters())
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    outs = []
    for i in range(0, len(x), batch):
        mean = vae.encode(x[i:i + batch].to(p.device, p.dtype)).latent_dist.mean
        outs.append(((mean.float() - shift) * vae.config.scaling_factor).cpu())
    return torch.cat(outs)


def settle_from_distances(rel: torch.Tensor, tol: float = DEFAULT_TOL) -> torch.Tensor:
    """settling_call from precomputed relative distances to the last call, rel [T, N] -> long [N]
    (for trajectories too large to hold at once; same rule as shapefirst.frequency.settling_call)."""
    return settled_from(rel <= tol)


def _first_t_below(ts: torch.Tensor, snr: torch.Tensor, level: float = 1.0):
    below = torch.nonzero(snr < level).flatten()
    return int(ts[below[0]]) if len(below) else None


def _at(ts: torch.Tensor, values: torch.Tensor, t: int) -> float:
    return float(values[int(torch.argmin((ts - t).abs()))])


@torch.no_grad()
def _pixel_bands(traj, vae, radius: float, tol: float):
    """Band norms [T, N] of the decoded x0-hat ([-1, 1]) and the bands' settling calls [N], streamed."""
    last = traj.n_calls - 1
    final = traj.decode(vae, "x0", [last])[0] * 2 - 1
    f_lo, f_hi = split_bands(final, radius)
    f_n = {"low": f_lo.flatten(1).norm(dim=1).double(), "high": f_hi.flatten(1).norm(dim=1).double()}
    norms = {b: torch.zeros(traj.n_calls, final.shape[0], dtype=torch.float64) for b in BANDS}
    rel = {b: torch.zeros_like(norms[b]) for b in BANDS}
    for calls, imgs in decode_chunks(traj, vae):
        lo, hi = split_bands(imgs * 2 - 1, radius)
        for b, band, fin in (("low", lo, f_lo), ("high", hi, f_hi)):
            norms[b][calls] = band.flatten(2).norm(dim=2).double()
            rel[b][calls] = (band - fin[None]).flatten(2).double().norm(dim=2) / (f_n[b] + 1e-12)
    return norms, {b: settle_from_distances(rel[b], tol) for b in BANDS}


def check_pipeline(pipe) -> None:
    """The forward process here is the DDPM one: a flow-matching scheduler gets one line saying so."""
    ac = getattr(pipe.scheduler, "alphas_cumprod", None)
    if ac is None or is_flow_matching(pipe.scheduler):  # Wan's UniPC has an alphas_cumprod, but runs flow sigmas
        raise ShapefirstError(f"{type(pipe.scheduler).__name__} runs flow matching: the frequency analysis's "
                              "forward process is the DDPM one (x_t = sqrt(ab) x0 + sqrt(1-ab) eps), not flow "
                              "matching (SD3, Flux, Wan)",
                              "run it on a DDPM-type model (SD 1.x/2.x, SDXL, PixArt); a video's x0-hat bands in "
                              "space and time come from experiments.frequency.run_spacetime on its trajectory")


def run_frequency(pipe, n_images: int = 16, seed: int = 0, radius: float = DEFAULT_RADIUS, steps: int = 50,
                  prompts=None, photo: bool = True, schedule: GuidanceSchedule | None = None, batch: int = 16,
                  tol: float = DEFAULT_TOL, stride: int = FORWARD_STRIDE) -> Result:
    """Forward-process band norms, reverse-process band norms and settling, spectra -> Result(kind="frequency").

    Arrays: `forward/timesteps` long [K], `forward/alphas_cumprod` [K], `forward/<space>/<key>`
    float64 [K] for every key of forward_process_bands (space in pixel, photo, latent,
    latent_photo); `reverse/timesteps` [T], `reverse/latent/x_t/<band>`, `reverse/latent/x0/<band>`,
    `reverse/pixel/x0/<band>` float64 [T, N]; `reverse/settle_low`, `reverse/settle_high` long [N]
    (latent x0-hat), `reverse/pixel/settle_low`, `reverse/pixel/settle_high`; `spectrum/freqs`,
    `spectrum/generated`, `spectrum/renders`, `spectrum/photo`, `spectrum/latent_freqs`,
    `spectrum/latent_generated`, `spectrum/latent_renders`.
    The forward noise of space k is drawn from torch.Generator().manual_seed(seed + k).
    """
    if int(n_images) != n_images or n_images < 1:
        raise ShapefirstError(f"n_images {n_images} is not a positive integer", "pass e.g. 16")
    if int(stride) != stride or stride < 1:
        raise ShapefirstError(f"stride {stride} is not a positive integer", "pass e.g. 10")
    check_pipeline(pipe)
    ac = pipe.scheduler.alphas_cumprod.detach().cpu().double()
    size = image_size(pipe)
    schedule = schedule or GuidanceSchedule(7.5)
    arrays: dict[str, torch.Tensor] = {}
    spaces = _spaces(pipe, n_images, seed, size, photo, batch)
    forward_summary = _forward(spaces, ac, stride, radius, seed, arrays)
    if prompts is None:
        prompts = sample_captions(sample_scenes(n_images, seed, "test"), seed)
    prompts = check_prompts(prompts)
    generated, final_latents = _reverse(pipe, prompts, schedule, steps, seed, batch, radius, tol, arrays)
    reverse_summary = _reverse_summary(arrays, tol)
    _spectra(generated, final_latents, spaces, arrays)
    settings = {"n_images": n_images, "seed": seed, "radius": radius, "steps": steps, "stride": stride, "tol": tol,
                "photo": photo, "batch": batch, "schedule": schedule.to_dict(), "prompts": prompts,
                "image_size": list(size), "spaces": list(spaces), "pipeline": type(pipe).__name__,
                "scheduler": type(pipe.scheduler).__name__, "num_train_timesteps": len(ac)}
    data = {"settings": settings, "forward": forward_summary, "reverse": reverse_summary}
    return Result("frequency", data, arrays)


def _spaces(pipe, n_images, seed, size, photo, batch) -> dict[str, torch.Tensor]:
    """The clean images of the forward process: world renders, the photograph, and their latents."""
    renders = world_renders(n_images, seed, size)
    spaces = {"pixel": renders}
    pic = photo_image(size) if photo else None
    if photo:
        spaces["photo"] = pic
    spaces["latent"] = encode_latents(pipe.vae, renders, batch)
    if photo:
        spaces["latent_photo"] = encode_latents(pipe.vae, pic, batch)
    return spaces


def _forward(spaces, ac, stride, radius, seed, arrays) -> dict:
    """(a) the forward process: band norms of signal and noise at every stride-th timestep, per space."""
    ts = torch.arange(0, len(ac), stride, dtype=torch.long)
    arrays["forward/timesteps"] = ts
    arrays["forward/alphas_cumprod"] = ac[ts].clone()
    summary = {}
    for k, (space, x0) in enumerate(spaces.items()):
        out = forward_process_bands(x0, ac, ts, radius, torch.Generator().manual_seed(seed + k))
        for key, v in out.items():
            arrays[f"forward/{space}/{key}"] = v.double()
        sig2 = out["signal_low"][0] ** 2 + out["signal_high"][0] ** 2
        summary[space] = {
            "shape": list(x0.shape), "low_bin_fraction": band_energy_fraction(x0.shape[-2], x0.shape[-1], radius),
            "signal_low_energy_share": float(out["signal_low"][0] ** 2 / sig2) if float(sig2) > 0 else None,
            "t_snr_below_1": {"low": _first_t_below(ts, out["snr_low"]), "high": _first_t_below(ts, out["snr_high"])},
            "snr_at_500": {"low": _at(ts, out["snr_low"], 500), "high": _at(ts, out["snr_high"], 500)},
            "noise_over_expected": {b: float((out[f"noise_{b}"][1:] / out[f"expected_noise_{b}"][1:]).mean())
                                    if len(ts) > 1 else None for b in BANDS}}
    return summary


def _reverse(pipe, prompts, schedule, steps, seed, batch, radius, tol, arrays):
    """(b) the reverse process: band norms of x_t and x0-hat per call and the settling call of each band."""
    rev = {f"{where}/{b}": [] for where in ("latent/x_t", "latent/x0", "pixel/x0") for b in BANDS}
    settle = {k: [] for k in ("latent_low", "latent_high", "pixel_low", "pixel_high")}
    generated, final_latents, timesteps = [], [], None
    for b0 in range(0, len(prompts), batch):
        res = generate(pipe, prompts[b0:b0 + batch], schedule=schedule, steps=steps, seed=seed + b0, trace=True)
        traj = res.trajectory
        timesteps = timesteps if timesteps is not None else list(traj.timesteps)
        x_t, x0 = traj.arrays["x_t"], traj.arrays["x0"]
        for where, states in (("latent/x_t", x_t), ("latent/x0", x0)):
            tb = trajectory_bands(states, radius)
            for b in BANDS:
                rev[f"{where}/{b}"].append(tb[b].double())
        lo, hi = split_bands(x0, radius)
        settle["latent_low"].append(settling_call(lo, tol))
        settle["latent_high"].append(settling_call(hi, tol))
        pn, ps = _pixel_bands(traj, pipe.vae, radius, tol)
        for b in BANDS:
            rev[f"pixel/x0/{b}"].append(pn[b])
            settle[f"pixel_{b}"].append(ps[b])
        generated.append(torch.from_numpy(np.asarray(res.images, dtype=np.float32)).permute(0, 3, 1, 2) * 2 - 1)
        final_latents.append(x0[-1])
    arrays["reverse/timesteps"] = torch.tensor(timesteps, dtype=torch.float64)
    for k, v in rev.items():
        arrays[f"reverse/{k}"] = torch.cat(v, 1)
    for space, prefix in (("latent", "reverse"), ("pixel", "reverse/pixel")):
        for b in BANDS:
            arrays[f"{prefix}/settle_{b}"] = torch.cat(settle[f"{space}_{b}"])
    return generated, final_latents


def _reverse_summary(arrays, tol) -> dict:
    def both(prefix):
        lo, hi = arrays[f"{prefix}/settle_low"], arrays[f"{prefix}/settle_high"]
        return {"low": summarize(lo), "high": summarize(hi),
                "share_low_before_high": float((lo < hi).double().mean()),
                "share_low_not_after_high": float((lo <= hi).double().mean())}

    return {"n_calls": len(arrays["reverse/timesteps"]), "tol": tol,
            "settle": {"latent": both("reverse"), "pixel": both("reverse/pixel")},
            "settle_median": {"latent": {b: summarize(arrays[f"reverse/settle_{b}"])["median"] for b in BANDS},
                              "pixel": {b: summarize(arrays[f"reverse/pixel/settle_{b}"])["median"] for b in BANDS}}}


def _spectra(generated, final_latents, spaces, arrays) -> None:
    """(c) radially averaged power spectra of generated images and latents against the renders (and photo)."""
    freqs, p_gen = radial_power_spectrum(torch.cat(generated))
    arrays["spectrum/freqs"] = freqs
    arrays["spectrum/generated"] = p_gen
    arrays["spectrum/renders"] = radial_power_spectrum(spaces["pixel"])[1]
    if "photo" in spaces:
        arrays["spectrum/photo"] = radial_power_spectrum(spaces["photo"])[1]
    lf, lp = radial_power_spectrum(torch.cat(final_latents))
    arrays["spectrum/latent_freqs"] = lf
    arrays["spectrum/latent_generated"] = lp
    arrays["spectrum/latent_renders"] = radial_power_spectrum(spaces["latent"])[1]


# -- plots ------------------------------------------------------------------------------------
def _positive(v: torch.Tensor) -> np.ndarray:
    a = v.double().numpy().copy()
    a[~np.isfinite(a) | (a <= 0)] = np.nan
    return a


BAND_COLORS = {"low": "tab:blue", "high": "tab:red"}


def plot_frequency(result: Result, folder: str | Path) -> list[Path]:
    """PNGs: forward_<space>.png (band norms of signal and noise vs t, SNR per band and the x_t
    low/high ratio), reverse.png (band norms per call, median and 10-90% band), spectrum.png."""
    folder = Path(folder)
    paths = [_plot_forward(result.arrays, space, folder) for space in result.data["settings"]["spaces"]]
    return paths + [_plot_reverse(result.arrays, folder), _plot_spectrum(result, folder)]


def _plot_forward(A, space: str, folder: Path) -> Path:
    from matplotlib.figure import Figure

    ts = A["forward/timesteps"].numpy()
    fig = Figure(figsize=(11, 4), layout="constrained")
    ax1, ax2 = fig.add_subplot(121), fig.add_subplot(122)
    for b in BANDS:
        ax1.plot(ts, _positive(A[f"forward/{space}/signal_{b}"]), color=BAND_COLORS[b], label=f"signal {b}")
        ax1.plot(ts, _positive(A[f"forward/{space}/noise_{b}"]), color=BAND_COLORS[b], ls="--", label=f"noise {b}")
        ax2.plot(ts, _positive(A[f"forward/{space}/snr_{b}"]), color=BAND_COLORS[b], label=f"SNR {b}")
    ax2.plot(ts, _positive(A[f"forward/{space}/ratio"]), color="k", ls=":", label="x_t low / high")
    ax2.axhline(1.0, color="gray", lw=0.8)
    ax1.set_yscale("log")
    ax2.set_yscale("log")
    for ax in (ax1, ax2):
        ax.set_xlabel("timestep t")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    ax1.set_ylabel("L2 norm")
    ax1.set_title(f"forward process, {space}: band norms")
    ax2.set_ylabel("ratio")
    ax2.set_title(f"{space}: SNR per band, x_t low/high")
    return save_figure(fig, folder / f"forward_{space}.png")


def _plot_reverse(A, folder: Path) -> Path:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(15, 4), layout="constrained")
    panels = [("latent/x_t", "latent x_t"), ("latent/x0", "latent x0-hat"), ("pixel/x0", "pixel x0-hat")]
    for k, (key, title) in enumerate(panels):
        ax = fig.add_subplot(1, 3, k + 1)
        for b in BANDS:
            v = A[f"reverse/{key}/{b}"].double().numpy()
            calls = np.arange(v.shape[0])
            lo, med, hi = np.percentile(v, [10, 50, 90], axis=1)
            ax.plot(calls, med, color=BAND_COLORS[b], label=f"{b} (median)")
            ax.fill_between(calls, lo, hi, color=BAND_COLORS[b], alpha=0.2)
            skey = {"latent/x0": f"reverse/settle_{b}", "pixel/x0": f"reverse/pixel/settle_{b}"}.get(key)
            if skey:
                ax.axvline(float(A[skey].double().median()), color=BAND_COLORS[b], ls=":", lw=1,
                           label=f"{b} settles (median)")
        ax.set_yscale("log")
        ax.set_xlabel("denoiser call")
        ax.set_ylabel("L2 norm of band")
        ax.set_title(f"reverse process: {title}")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    return save_figure(fig, folder / "reverse.png")


def _plot_spectrum(result: Result, folder: Path) -> Path:
    from matplotlib.figure import Figure

    A = result.arrays
    fig = Figure(figsize=(11, 4), layout="constrained")
    ax1, ax2 = fig.add_subplot(121), fig.add_subplot(122)
    f = A["spectrum/freqs"].numpy()
    for key, label in (("generated", "generated"), ("renders", "world renders"), ("photo", "photo")):
        if f"spectrum/{key}" in A:
            ax1.plot(f[1:], _positive(A[f"spectrum/{key}"])[1:], label=label)
    lf = A["spectrum/latent_freqs"].numpy()
    for key, label in (("latent_generated", "generated latents"), ("latent_renders", "renders' latents")):
        ax2.plot(lf[1:], _positive(A[f"spectrum/{key}"])[1:], label=label)
    radius = result.data["settings"]["radius"]
    for ax, title in ((ax1, "pixel space"), (ax2, "latent space")):
        ax.axvline(radius, color="gray", ls="--", lw=0.8, label=f"low/high split ({radius})")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("normalised frequency (Nyquist = 1)")
        ax.set_ylabel("power")
        ax.set_title(f"radially averaged power spectrum, {title}")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    return save_figure(fig, folder / "spectrum.png")


# -- the analysis: settings, run, summary (report + CLI) --------------------------------------
def findings(data: dict) -> list[str]:
    """Which band of x0-hat settles first, per space (the paper: the low band)."""
    out = []
    for space, bands in (data.get("reverse", {}).get("settle_median") or {}).items():
        lo, hi = bands.get("low"), bands.get("high")
        if lo is None or hi is None:
            continue
        if lo < hi:
            verdict = "low frequencies first, as the paper reports"
        elif lo > hi:
            verdict = "the high band first, against the paper's low-first order"
        else:
            verdict = "both bands at the same call, so no order is seen here"
        out.append(f"In {space} space x0-hat's low band settles at call {lo:.0f} (median) and its high band at "
                   f"call {hi:.0f}: {verdict}.")
    return out


def title(data: dict) -> str:
    med = (data.get("reverse", {}).get("settle_median") or {}).get("latent") or {}
    if med.get("low") is not None and med.get("high") is not None and med["low"] < med["high"]:
        return "Low frequencies survive the noise; they are generated first"
    return "Low and high frequencies: which is generated first"


def _run(pipe, settings: Settings, inputs: Inputs) -> Result:
    ps, _ = inputs.prompts_and_targets(settings.n, settings.seed)
    return run_frequency(pipe, n_images=len(ps), seed=settings.seed, steps=settings.steps, prompts=ps,
                         schedule=GuidanceSchedule(settings.guidance), batch=settings.batch)


def summary(result: Result) -> Summary:
    rows = [["space", "band", "median settling call of x0-hat"]]
    for space, d in result.data["reverse"]["settle_median"].items():
        for band, v in d.items():
            rows.append([space, band, f"{v:.0f}"])
    found = findings(result.data)
    return Summary(title(result.data),
                   "Forward process: norms of the low- and high-frequency parts of signal and noise at each timestep. "
                   "Reverse process: the call from which each band of x0-hat keeps its final value. "
                   + " ".join(found),
                   rows, found)


ANALYSIS = Analysis("frequency", _run, summary, plot_frequency, order=20)


# -- videos: x0-hat's bands in space and time (from a saved trajectory) -------------------------------------------
SPACETIME_BANDS = ("low", "high", "temporal_low", "temporal_high")
SPACETIME_LABELS = {"low": "spatial low", "high": "spatial high", "temporal_low": "temporal low",
                    "temporal_high": "temporal high"}


def frame_dim(traj) -> int:
    """The frame axis of a video trajectory's arrays [T, N, ...]: Wan's [T, N, C, F, H, W] 3, CogVideoX's
    [T, N, F, C, H, W] 2."""
    if not traj.is_video:
        raise ShapefirstError(f"the trajectory holds images (layout {traj.layout!r}), not videos",
                              "run_spacetime reads the trajectory of a video pipeline (Wan, CogVideoX)")
    return 3 if traj.layout == "video" else 2


def run_spacetime(traj, radius: float = DEFAULT_RADIUS, temporal_radius: float = DEFAULT_TEMPORAL_RADIUS,
                  tol: float = DEFAULT_TOL) -> Result:
    """x0-hat of a video trajectory in space and time -> Result(kind="spacetime").

    Arrays: `timesteps` [T]; `norm/<band>` float64 [T, N] for band in low, high (spatial), temporal_low,
    temporal_high (shapefirst.frequency.spacetime_bands); `settle/<band>` long [N] (settling_call of that band of
    x0-hat, `tol` relative L2 to its final value)."""
    fd = frame_dim(traj)
    x0 = traj.arrays["x0"].double()
    norms = spacetime_bands(x0, fd, radius, temporal_radius)
    parts = dict(zip(("low", "high"), split_bands(x0, radius)))
    parts.update(zip(("temporal_low", "temporal_high"), split_temporal(x0, fd, temporal_radius)))
    arrays = {"timesteps": torch.tensor(traj.timesteps, dtype=torch.float64)}
    for b in SPACETIME_BANDS:
        arrays[f"norm/{b}"] = norms[b].double()
        arrays[f"settle/{b}"] = settling_call(parts[b], tol)
    frames = x0.shape[fd]
    data = {"settings": {"radius": radius, "temporal_radius": temporal_radius, "tol": tol,
                         "layout": traj.layout, "latent_frames": int(frames), "videos": int(x0.shape[1]),
                         "family": traj.meta.get("family"), "prompts": traj.meta.get("prompts")},
            "n_calls": traj.n_calls,
            "settle": {b: summarize(arrays[f"settle/{b}"]) for b in SPACETIME_BANDS}}
    return Result("spacetime", data, arrays)


def spacetime_findings(data: dict) -> list[str]:
    """Which band settles first in space and in time (the paper's claim, carried to time: low before high)."""
    out = []
    med = {b: v["median"] for b, v in (data.get("settle") or {}).items()}
    for lo, hi, axis in (("low", "high", "space"), ("temporal_low", "temporal_high", "time")):
        if lo not in med or hi not in med:
            continue
        order = ("the low band first" if med[lo] < med[hi] else "the high band first" if med[lo] > med[hi]
                 else "both at the same call")
        out.append(f"In {axis}, x0-hat's low band settles at call {med[lo]:.0f} (median) and its high band at call "
                   f"{med[hi]:.0f}: {order}.")
    return out


def spacetime_summary(result: Result) -> Summary:
    d = result.data
    rows = [["band", "median settling call", "10th-90th percentile", "calls"]]
    for b in SPACETIME_BANDS:
        v = d["settle"][b]
        rows.append([SPACETIME_LABELS[b], f"{v['median']:.0f}", f"{v['p10']:.0f}-{v['p90']:.0f}", d["n_calls"]])
    st = d["settings"]
    found = spacetime_findings(d)
    caption = (f"x0-hat of the traced videos in the denoiser's latent space ({st['latent_frames']} latent frames), "
               f"split in space (spatial frequencies up to {st['radius']:g} x Nyquist, every frame) and in time "
               f"(temporal frequencies up to {st['temporal_radius']:g} x Nyquist across the frames, every pixel); "
               f"a band has settled once it stays within {st['tol']:.0%} of its final value. " + " ".join(found))
    return Summary("Space and time: which frequencies of the video are decided first", caption, rows, found,
                   ("spacetime.png",))


def plot_spacetime(result: Result, folder: str | Path) -> list[Path]:
    """spacetime.png: the band norms per call (median over the videos) in space and in time, with each band's
    median settling call."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    A = result.arrays
    fig = Figure(figsize=(11, 4), layout="constrained")
    colors = {"low": "tab:blue", "high": "tab:red", "temporal_low": "tab:blue", "temporal_high": "tab:red"}
    for k, (pair, title) in enumerate(((("low", "high"), "space"), (("temporal_low", "temporal_high"), "time"))):
        ax = fig.add_subplot(1, 2, k + 1)
        for b in pair:
            v = A[f"norm/{b}"].double().numpy()
            ax.plot(np.arange(v.shape[0]), np.median(v, axis=1), color=colors[b], label=SPACETIME_LABELS[b])
            ax.axvline(float(A[f"settle/{b}"].double().median()), color=colors[b], ls=":", lw=1,
                       label=f"{SPACETIME_LABELS[b]} settles (median)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("denoiser call")
        ax.set_ylabel("L2 norm of band (median over videos)")
        ax.set_title(f"x0-hat of the video, {title}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return [save_figure(fig, Path(folder) / "spacetime.png")]
