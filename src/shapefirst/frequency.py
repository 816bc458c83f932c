"""Low/high frequency analysis of images, latents and diffusion trajectories.

The paper "Towards Understanding the Working Mechanism of Text-to-Image
Diffusion Model" (NeurIPS 2024) argues that the forward (noising) process
keeps the low-frequency part of an image (overall shape / layout) visible
until the noise is very large, while the high-frequency part (details) is
drowned early.  This module splits a 2-D signal, per channel, into a low and a
high band with an FFT disc mask and measures the bands along the forward
process and along sampling trajectories.

Frequencies are in *normalised* units: ``torch.fft.fftfreq`` (cycles/pixel)
divided by 0.5, so the Nyquist frequency of each axis is 1.  A disc of radius
``r`` therefore means the same thing for square and non-square images.

Videos have a third axis, time: :func:`split_temporal` splits a signal along its
frame axis into temporal frequencies ``|f| <= r`` (slow change across frames,
the DC term being the mean frame) and the rest (fast change, flicker), in the same
normalised units (Nyquist = 1: one full alternation every two frames), and
:func:`spacetime_bands` gives both splits of a video trajectory per call.
Pure torch; no diffusers import.
"""
from __future__ import annotations

import math

import torch

from .settling import settled_from

DEFAULT_RADIUS = 0.25
"""Default low-pass radius as a fraction of the Nyquist radius.  For a 64x64
SD latent it keeps spatial frequencies up to 8 cycles per side (about 5% of the
frequency bins, ``pi * 0.25**2 / 4``): coarse layout and shape, no texture."""

DEFAULT_TEMPORAL_RADIUS = 0.25
"""Default temporal low-pass radius (fraction of the temporal Nyquist frequency). Wan's 81 frames make 21
latent frames: it keeps temporal frequencies up to 2 cycles over the clip (5 of 21 bins); with 2 latent frames
only the mean frame (the DC term) is low."""

DEFAULT_TOL = 0.1
"""Default relative tolerance of :func:`settling_call`: a band counts as
settled once it stays within 10% (relative L2) of its final value."""


def _radius_grid(h: int, w: int, device=None) -> torch.Tensor:
    """Normalised radial frequency (Nyquist = 1 per axis) of each FFT bin, [h, w], float64."""
    fy = torch.fft.fftfreq(h, device=device, dtype=torch.float64) / 0.5
    fx = torch.fft.fftfreq(w, device=device, dtype=torch.float64) / 0.5
    return torch.sqrt(fy[:, None] ** 2 + fx[None, :] ** 2)


def lowpass_mask(h: int, w: int, radius: float = DEFAULT_RADIUS, device=None) -> torch.Tensor:
    """Boolean [h, w] mask, in unshifted ``fft2`` layout, of bins with normalised
    radial frequency ``sqrt(fy**2 + fx**2) <= radius``.  ``radius`` is in (0, 1]
    (fraction of Nyquist).  The mask is symmetric under ``k -> -k``, so filtering a
    real signal with it yields a real signal (it is an orthogonal projection)."""
    if not 0.0 < radius <= 1.0:
        raise ValueError(f"radius must be in (0, 1], got {radius}")
    return _radius_grid(h, w, device) <= radius


def split_bands(x: torch.Tensor, radius: float = DEFAULT_RADIUS):
    """Split ``x`` [..., H, W] into ``(low, high)`` over the last two dims.

    ``low = real(ifft2(fft2(x) * mask))`` and ``high = x - low``.  The FFT runs in
    float64 for float64 input and in float32 otherwise; both outputs have the input
    dtype.  ``low + high`` reproduces ``x`` up to one floating-point rounding per
    element (exactly in almost all elements)."""
    if not x.is_floating_point():
        raise TypeError("split_bands expects a floating-point tensor")
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    mask = lowpass_mask(x.shape[-2], x.shape[-1], radius, device=x.device)
    spec = torch.fft.fft2(x.to(work))
    low = torch.fft.ifft2(spec * mask).real.to(x.dtype)
    return low, x - low


def _norms(x: torch.Tensor) -> torch.Tensor:
    """L2 norm over all dims except dim 0 (a 0-dim norm for 2-D input)."""
    return x.norm() if x.dim() <= 2 else x.flatten(1).norm(dim=1)


def band_norms(x: torch.Tensor, radius: float = DEFAULT_RADIUS) -> dict:
    """``{'low', 'high'}`` L2 norms of the bands of ``x``, one per item of dim 0
    (norm over all other dims).  For a 2-D [H, W] input the norms are scalars."""
    low, high = split_bands(x, radius)
    return {"low": _norms(low), "high": _norms(high)}


def band_energy_fraction(h: int, w: int, radius: float = DEFAULT_RADIUS) -> float:
    """Fraction of the h*w FFT bins inside the low-pass mask.  By Parseval, white
    noise of unit variance puts exactly this fraction of its expected energy in the
    low band (each bin carries expected power h*w)."""
    return lowpass_mask(h, w, radius).sum().item() / (h * w)


def forward_process_bands(x0: torch.Tensor, alphas_cumprod: torch.Tensor, timesteps,
                          radius: float = DEFAULT_RADIUS, generator=None) -> dict:
    """Band norms along the forward process ``x_t = sqrt(ab_t) x0 + sqrt(1-ab_t) eps``.

    ``x0`` is [C, H, W] or [N, C, H, W]; ``alphas_cumprod`` is the 1-D tensor a
    diffusers scheduler exposes as ``scheduler.alphas_cumprod``; ``timesteps`` are
    integer indices into it.  ``eps ~ N(0, I)`` is drawn once (with ``generator``)
    and shared by all t.  Norms are over the whole of ``x0``.  Returns float64
    tensors [len(timesteps)]: ``signal_low/high`` (bands of sqrt(ab) x0),
    ``noise_low/high`` (bands of sqrt(1-ab) eps), ``xt_low/high``, ``ratio`` =
    xt_low/xt_high, ``snr_low`` = signal_low/noise_low, ``snr_high``, and the closed
    forms ``expected_noise_low/high`` = sqrt((1-ab) * numel * frac) and
    sqrt((1-ab) * numel * (1-frac)), frac = :func:`band_energy_fraction`."""
    t = torch.as_tensor(timesteps, dtype=torch.long).reshape(-1)
    ab = alphas_cumprod.detach().to("cpu", torch.float64)[t]
    eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=x0.device)
    x0_low, x0_high = split_bands(x0, radius)
    eps_low, eps_high = split_bands(eps, radius)
    n = lambda v: v.double().norm().cpu()  # noqa: E731
    sa, sn = ab.sqrt(), (1 - ab).sqrt()
    out = {"signal_low": sa * n(x0_low), "signal_high": sa * n(x0_high),
           "noise_low": sn * n(eps_low), "noise_high": sn * n(eps_high)}
    xt_low, xt_high = [], []
    for a in ab.tolist():
        lo, hi = split_bands(math.sqrt(a) * x0 + math.sqrt(1 - a) * eps, radius)
        xt_low.append(n(lo))
        xt_high.append(n(hi))
    out["xt_low"], out["xt_high"] = torch.stack(xt_low), torch.stack(xt_high)
    out["ratio"] = out["xt_low"] / out["xt_high"]
    out["snr_low"] = out["signal_low"] / out["noise_low"]
    out["snr_high"] = out["signal_high"] / out["noise_high"]
    frac = band_energy_fraction(x0.shape[-2], x0.shape[-1], radius)
    out["expected_noise_low"] = ((1 - ab) * x0.numel() * frac).sqrt()
    out["expected_noise_high"] = ((1 - ab) * x0.numel() * (1 - frac)).sqrt()
    return out


def trajectory_bands(states: torch.Tensor, radius: float = DEFAULT_RADIUS) -> dict:
    """Band norms of a trajectory ``states`` [T, N, C, H, W] (e.g. x_t or the x0
    prediction at each denoiser call): ``{'low', 'high'}`` tensors [T, N], the
    norm taken over (C, H, W)."""
    if states.dim() != 5:
        raise ValueError(f"expected [T, N, C, H, W], got shape {tuple(states.shape)}")
    low, high = split_bands(states, radius)
    return {"low": low.flatten(2).norm(dim=2), "high": high.flatten(2).norm(dim=2)}


def settling_call(values: torch.Tensor, tol: float = DEFAULT_TOL) -> torch.Tensor:
    """First call index at which each trajectory has settled, long tensor [N].

    ``values`` is [T, N, ...] (e.g. one band of x0-hat per denoiser call).  Returns,
    per n, the smallest c with ``||values[c'] - values[-1]|| / (||values[-1]|| +
    1e-12) <= tol`` for every c' >= c.  A constant sequence gives 0; the answer is
    at most T-1 (the last call trivially matches itself)."""
    if values.dim() < 2:
        raise ValueError("values must be [T, N, ...]")
    v = values.detach().double().reshape(values.shape[0], values.shape[1], -1)
    rel = (v - v[-1]).norm(dim=2) / (v[-1].norm(dim=1) + 1e-12)  # [T, N]
    return settled_from(rel <= tol)


def radial_power_spectrum(x: torch.Tensor, n_bins: int | None = None):
    """Radially averaged power spectrum of ``x`` [..., H, W], averaged over leading dims.

    Power is ``|fft2(x)|**2 / (H*W)`` (so unit white noise has power 1 in every
    bin).  Bin k is centred at normalised frequency ``k / (n_bins - 1)`` (Nyquist =
    1) and collects the FFT bins whose radius rounds to it; bins beyond radius 1
    (the corners) are dropped.  Default ``n_bins = min(H, W) // 2 + 1``, i.e. bin
    width 2 / min(H, W), one FFT step along the shorter axis.  Bin 0 is the DC term
    alone.  Empty bins (possible with a large ``n_bins``) are NaN.
    Returns ``(freqs, power)``, float64 tensors [n_bins]."""
    h, w = x.shape[-2], x.shape[-1]
    n_bins = n_bins or min(h, w) // 2 + 1
    if n_bins < 2:
        raise ValueError("n_bins must be >= 2")
    power = torch.fft.fft2(x.detach().double()).abs().square() / (h * w)
    power = power.reshape(-1, h, w).mean(0).flatten()
    r = _radius_grid(h, w, device=power.device).flatten()
    step = 1.0 / (n_bins - 1)
    keep = r <= 1.0 + 1e-9
    idx = torch.round(r[keep] / step).long().clamp(max=n_bins - 1)
    total = torch.zeros(n_bins, dtype=torch.float64, device=power.device)
    count = torch.zeros_like(total)
    total.index_add_(0, idx, power[keep])
    count.index_add_(0, idx, torch.ones_like(power[keep]))
    freqs = torch.arange(n_bins, dtype=torch.float64, device=power.device) * step
    return freqs, total / count


def temporal_lowpass_mask(frames: int, radius: float = DEFAULT_TEMPORAL_RADIUS, device=None) -> torch.Tensor:
    """Boolean [frames] mask, in unshifted ``fft`` layout, of the temporal bins with normalised frequency
    ``|f| <= radius`` (Nyquist = 1). Symmetric under ``k -> -k``: filtering a real signal keeps it real."""
    if not 0.0 < radius <= 1.0:
        raise ValueError(f"radius must be in (0, 1], got {radius}")
    if frames < 1:
        raise ValueError(f"frames must be >= 1, got {frames}")
    f = torch.fft.fftfreq(frames, device=device, dtype=torch.float64) / 0.5
    return f.abs() <= radius


def split_temporal(x: torch.Tensor, dim: int, radius: float = DEFAULT_TEMPORAL_RADIUS):
    """Split ``x`` into ``(low, high)`` along its frame axis ``dim``: ``low = real(ifft(fft(x) * mask))`` over that
    axis (:func:`temporal_lowpass_mask`), ``high = x - low``. An orthogonal projection, like :func:`split_bands`;
    the same dtypes (float64 FFT for float64 input, else float32)."""
    if not x.is_floating_point():
        raise TypeError("split_temporal expects a floating-point tensor")
    dim = dim % x.dim()
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    mask = temporal_lowpass_mask(x.shape[dim], radius, device=x.device)
    shape = [1] * x.dim()
    shape[dim] = x.shape[dim]
    spec = torch.fft.fft(x.to(work), dim=dim)
    low = torch.fft.ifft(spec * mask.view(shape), dim=dim).real.to(x.dtype)
    return low, x - low


def temporal_energy_fraction(frames: int, radius: float = DEFAULT_TEMPORAL_RADIUS) -> float:
    """Fraction of the temporal bins inside the low-pass mask: by Parseval, the share of white noise's expected
    energy in the temporal low band."""
    return temporal_lowpass_mask(frames, radius).sum().item() / frames


def spacetime_bands(states: torch.Tensor, frame_dim: int, radius: float = DEFAULT_RADIUS,
                    temporal_radius: float = DEFAULT_TEMPORAL_RADIUS) -> dict:
    """Band norms of a video trajectory ``states`` [T, N, ...] whose frames lie along ``frame_dim`` and whose last
    two dims are H, W (Wan's x0-hat [T, N, C, F, H, W]: frame_dim 3; CogVideoX's [T, N, F, C, H, W]: 2), per call
    and video, the norm taken over everything else: ``low``/``high`` the spatial bands (the disc of
    :func:`split_bands`, every frame), ``temporal_low``/``temporal_high`` the temporal bands
    (:func:`split_temporal`, every pixel). Tensors [T, N]."""
    if states.dim() < 5:
        raise ValueError(f"expected [T, N, ..., F, ..., H, W] with a frame axis, got shape {tuple(states.shape)}")
    frame_dim = frame_dim % states.dim()
    if frame_dim < 2 or frame_dim >= states.dim() - 2:
        raise ValueError(f"frame_dim {frame_dim} is not between the video axis (1) and H, W")
    low, high = split_bands(states, radius)
    t_low, t_high = split_temporal(states, frame_dim, temporal_radius)
    norm = lambda v: v.flatten(2).norm(dim=2)  # noqa: E731
    return {"low": norm(low), "high": norm(high), "temporal_low": norm(t_low), "temporal_high": norm(t_high)}
