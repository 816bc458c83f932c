"""Tests for shapefirst.frequency (closed forms, not recorded outputs; < 5 s)."""
import math

import pytest
import torch

from shapefirst.frequency import (
    DEFAULT_RADIUS, DEFAULT_TOL, band_energy_fraction, band_norms, forward_process_bands,
    lowpass_mask, radial_power_spectrum, settling_call, split_bands, trajectory_bands,
)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def blob(c=4, h=64, w=64, sigma=6.0):
    """Smooth image: a centred Gaussian blob, with a different amplitude per channel."""
    y = torch.arange(h, dtype=torch.float32)[:, None] - (h - 1) / 2
    x = torch.arange(w, dtype=torch.float32)[None, :] - (w - 1) / 2
    g = torch.exp(-(x ** 2 + y ** 2) / (2 * sigma ** 2))
    return torch.stack([(1.0 + k) * g for k in range(c)])


def scaled_linear_alphas_cumprod(n=1000):
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, n, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0)


def test_defaults():
    assert DEFAULT_RADIUS == 0.25 and DEFAULT_TOL == 0.1


def test_mask_geometry_and_fraction():
    m = lowpass_mask(17, 40, 0.5)
    assert m.shape == (17, 40) and m.dtype == torch.bool
    # symmetric under k -> -k (needed for a real low band)
    assert torch.equal(m, torch.roll(m.flip(0, 1), (1, 1), (0, 1)))
    assert m[0, 0]  # DC is always inside
    # normalised units: along each axis the cut is at half the axis' Nyquist index
    assert m[0, 10] and not m[0, 11] and m[4, 0] and not m[5, 0]
    # disc area: fraction -> pi r^2 / 4 on a fine grid
    for r in (0.1, 0.25, 0.5):
        assert band_energy_fraction(256, 256, r) == pytest.approx(math.pi * r * r / 4, rel=0.02)
    assert band_energy_fraction(8, 8, 1.0) < 1.0  # corners beyond the Nyquist circle
    with pytest.raises(ValueError):
        lowpass_mask(8, 8, 0.0)


@pytest.mark.parametrize("shape", [(3, 16, 16), (2, 4, 17, 23)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_split_reconstructs(shape, dtype):
    x = torch.randn(shape, generator=gen(), dtype=dtype)
    low, high = split_bands(x)
    assert low.dtype == high.dtype == dtype and low.shape == high.shape == x.shape
    assert torch.equal(high, x - low)  # high is defined as the difference
    # low + high == x up to one rounding per element (bit-exactness is not possible in
    # general: l + fl(x - l) can differ from x by an ulp when |l| > |x|)
    assert torch.allclose(low + high, x, rtol=0, atol=2 * torch.finfo(dtype).eps * x.abs().max())


def test_pure_cosine_is_low_and_checkerboard_is_high():
    j = torch.arange(32, dtype=torch.float32)
    cos = torch.cos(2 * math.pi * 1 * j / 32)[None, :].expand(32, 32)
    low, high = split_bands(cos)
    assert high.norm() < 1e-5 * cos.norm()
    assert torch.allclose(low, cos, atol=1e-5)
    checker = (-1.0) ** (j[:, None] + j[None, :])
    low, high = split_bands(checker)
    assert low.norm() < 1e-5 * checker.norm()
    assert torch.allclose(high, checker, atol=1e-5)
    # a cosine just above the cut-off (radius 0.25 of Nyquist = 4 cycles / 32 px)
    hi_cos = torch.cos(2 * math.pi * 5 * j / 32)[None, :].expand(32, 32)
    assert split_bands(hi_cos)[0].norm() < 1e-5 * hi_cos.norm()
    assert split_bands(torch.cos(2 * math.pi * 4 * j / 32)[None, :].expand(32, 32))[1].norm() < 1e-4


def test_split_is_idempotent_projection():
    x = torch.randn(2, 3, 20, 24, generator=gen(1), dtype=torch.float64)
    low, high = split_bands(x, 0.3)
    low2, high2 = split_bands(low, 0.3)
    assert torch.allclose(low2, low, atol=1e-12) and high2.abs().max() < 1e-12
    assert split_bands(high, 0.3)[0].abs().max() < 1e-12
    assert (low * high).sum().abs() < 1e-9 * x.norm() ** 2  # orthogonal bands


def test_band_norms_shapes():
    x = torch.randn(5, 3, 16, 16, generator=gen(2))
    n = band_norms(x)
    assert n["low"].shape == n["high"].shape == (5,)
    low, high = split_bands(x)
    assert torch.allclose(n["low"], low.flatten(1).norm(dim=1))
    assert band_norms(x[0, 0])["high"].dim() == 0


def test_parseval_white_noise_fraction():
    h, w, r = 32, 48, 0.3
    x = torch.randn(512, h, w, generator=gen(3), dtype=torch.float64)
    n = band_norms(x, r)
    frac = (n["low"] ** 2).mean() / (x.flatten(1).norm(dim=1) ** 2).mean()
    assert frac.item() == pytest.approx(band_energy_fraction(h, w, r), rel=0.02)


def test_forward_process_closed_forms():
    ac = scaled_linear_alphas_cumprod()
    x0 = blob()
    ts = [0, 100, 300, 500, 700, 999]
    out = forward_process_bands(x0, ac, ts, generator=gen(4))
    assert all(v.shape == (len(ts),) for v in out.values())
    ab = ac[ts]
    for band in ("low", "high"):
        assert torch.allclose(out[f"noise_{band}"], out[f"expected_noise_{band}"], rtol=0.05)
    frac = band_energy_fraction(64, 64, DEFAULT_RADIUS)
    assert torch.allclose(out["expected_noise_low"] ** 2, (1 - ab) * x0.numel() * frac)
    # bands are orthogonal: energies add up to the whole signal's energy
    sig2 = out["signal_low"] ** 2 + out["signal_high"] ** 2
    assert torch.allclose(sig2, ab * x0.double().norm() ** 2, rtol=1e-5)
    # x_t bands agree with the parts: |x_t_low|^2 lies between (s - n)^2 and (s + n)^2
    for band in ("low", "high"):
        s, nz, xt = out[f"signal_{band}"], out[f"noise_{band}"], out[f"xt_{band}"]
        assert torch.all(xt <= s + nz + 1e-3) and torch.all(xt >= (s - nz).abs() - 1e-3)
    assert torch.all(torch.isfinite(out["ratio"]))
    mid = ts.index(500)
    assert out["snr_low"][mid] > 10 * out["snr_high"][mid]
    assert torch.all(out["snr_low"][1:] > out["snr_high"][1:])
    assert torch.all(out["snr_low"][1:].diff() < 0)  # SNR falls as noise grows


def test_forward_process_batched_and_reproducible():
    ac = scaled_linear_alphas_cumprod()
    x0 = blob(c=2, h=16, w=24)[None].repeat(3, 1, 1, 1)
    a = forward_process_bands(x0, ac, torch.tensor([10, 900]), 0.4, generator=gen(5))
    b = forward_process_bands(x0, ac, [10, 900], 0.4, generator=gen(5))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert a["expected_noise_high"][1] ** 2 == pytest.approx(
        (1 - ac[900].item()) * x0.numel() * (1 - band_energy_fraction(16, 24, 0.4)))


def test_trajectory_bands():
    states = torch.randn(6, 2, 3, 16, 16, generator=gen(6))
    tb = trajectory_bands(states)
    assert tb["low"].shape == tb["high"].shape == (6, 2)
    assert torch.allclose(tb["low"][4, 1], band_norms(states[4, 1:2])["low"][0])
    with pytest.raises(ValueError):
        trajectory_bands(states[0])


def test_settling_call():
    const = torch.ones(8, 3, 4, 4)
    assert torch.equal(settling_call(const), torch.zeros(3, dtype=torch.long))
    seq = torch.ones(10, 2, 5)
    seq[5:] = 2.0  # jumps at call 5 and stays: relative distance before = 0.5
    seq[:, 1] = 7.0  # second trajectory constant
    assert settling_call(seq).tolist() == [5, 0]
    assert settling_call(seq, tol=0.6).tolist() == [0, 0]
    assert settling_call(seq, tol=0.49).tolist() == [5, 0]
    # a transient excursion after settling pushes the answer past it
    seq2 = seq.clone()
    seq2[7, 0] = 3.0
    assert settling_call(seq2).tolist() == [8, 0]
    # always at most T - 1 (last call equals itself)
    assert settling_call(torch.randn(4, 3, generator=gen(7)), tol=0.0).tolist() == [3, 3, 3]


def test_radial_power_spectrum():
    x = torch.randn(16, 64, 64, generator=gen(8))
    freqs, power = radial_power_spectrum(x)
    assert freqs.shape == power.shape == (33,)
    assert freqs[0] == 0 and freqs[-1] == pytest.approx(1.0)
    # white noise: expected power 1 in every bin.  Bin 0 is the DC term alone (a single
    # chi^2_1 coefficient per sample), so it is excluded from the flatness check.
    assert power[1:].max() / power[1:].min() < 2
    assert power[1:].mean() == pytest.approx(1.0, rel=0.05)
    f2, p2 = radial_power_spectrum(blob(c=1)[0])
    assert torch.all(p2[:12].diff() < 0)  # Gaussian spectrum decreases with frequency
    assert p2[0] > 1e6 * p2[20]
    fr, pr = radial_power_spectrum(torch.randn(2, 20, 36, generator=gen(9)), n_bins=6)
    assert fr.shape == (6,) and torch.isfinite(pr).all()
