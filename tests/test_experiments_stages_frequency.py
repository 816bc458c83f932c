"""Tests for shapefirst.experiments.stages and .frequency (pure settling rules + tiny-pipeline smoke runs)."""
import math

import numpy as np
import pytest
import torch

from shapefirst.errors import ShapefirstError
from shapefirst.experiments.frequency import plot_frequency, run_frequency, settle_from_distances
from shapefirst.experiments.stages import (
    CLIP_SETTLE, plot_stages, run_stages, settle_call, settle_calls, settle_codes, settle_threshold, world_prompts,
)
from shapefirst.frequency import band_energy_fraction, settling_call
from shapefirst.generate import count_calls
from shapefirst.guidance import GuidanceSchedule
from shapefirst.results import Result
from shapefirst.world.render import ATTRIBUTES

STEPS = 4
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# -- pure settling rules ----------------------------------------------------------------------
def test_settle_call_rules():
    assert settle_call(["red"] * 6) == 0  # constant from the start
    assert settle_call(["a"]) == 0
    assert settle_call(["a", "a", "a", "b", "b", "b", "b"]) == 3  # changes at call 3, then stays
    flips = ["a", "b", "a", "b", "b", "a", "b", "c", "c", "c"]  # last change at call 7
    assert settle_call(flips) == 7
    assert settle_call(["a", "b"]) == 1  # only the last call matches itself
    assert settle_call(["x", "y", "x"]) == 2  # equal to the final value earlier does not count
    with pytest.raises(ValueError):
        settle_call([])


def test_settle_calls_is_per_image_over_calls():
    # labels_per_call[c][i]: image 0 constant, image 1 changes at call 3, image 2 flips until call 7
    seqs = [["red"] * 10,
            ["a", "a", "a", "b", "b", "b", "b", "b", "b", "b"],
            ["a", "b", "a", "b", "b", "a", "b", "c", "c", "c"]]
    per_call = [list(col) for col in zip(*seqs)]
    assert settle_calls(per_call) == [0, 3, 7]
    with pytest.raises(ValueError):
        settle_calls([["a", "b"], ["a"]])


def test_settle_codes_matches_list_version():
    rng = np.random.default_rng(0)
    codes = torch.from_numpy(rng.integers(-1, 3, size=(12, 40))).to(torch.int32)
    codes[6:, :10] = codes[-1, :10]  # some settle mid-way
    codes[:, 10:15] = 2  # some constant
    expected = settle_calls(codes.tolist())
    assert settle_codes(codes).tolist() == expected
    assert settle_codes(codes)[10:15].tolist() == [0] * 5
    assert all(s <= 6 for s in expected[:10])
    # extra trailing dims are kept
    assert settle_codes(codes.view(12, 4, 10)).shape == (4, 10)


def test_settle_threshold():
    sims = torch.tensor([[0.2, 0.95, 0.5],
                         [0.95, 0.97, 0.6],
                         [0.85, 0.99, 0.7],
                         [0.92, 1.0, 0.8]])
    assert settle_threshold(sims, 0.9).tolist() == [3, 0, 4]  # 4 = never (last call below)
    assert CLIP_SETTLE == 0.9


def test_streamed_settling_matches_settling_call():
    g = torch.Generator().manual_seed(1)
    v = torch.randn(9, 5, 3, 4, 4, generator=g, dtype=torch.float64)
    v[4:, :2] = v[-1, :2] + 0.01 * torch.randn(5, 2, 3, 4, 4, generator=g, dtype=torch.float64)
    rel = (v - v[-1]).flatten(2).norm(dim=2) / (v[-1].flatten(1).norm(dim=1) + 1e-12)
    for tol in (0.05, 0.1, 2.0):
        assert torch.equal(settle_from_distances(rel, tol), settling_call(v, tol))


# -- stages on the tiny pipeline --------------------------------------------------------------
def assert_same_result(a: Result, b: Result):
    assert a.kind == b.kind
    assert a.data == b.data
    assert set(a.arrays) == set(b.arrays)
    for k in a.arrays:
        assert a.arrays[k].dtype == b.arrays[k].dtype, k
        assert torch.equal(a.arrays[k], b.arrays[k]), k


@pytest.fixture(scope="module")
def stages_result(tiny_pipe):
    prompts, targets = world_prompts(2, seed=0)
    schedules = {"full": GuidanceSchedule(7.5), "half": GuidanceSchedule(7.5, stop=0.5)}
    seen = []
    res = run_stages(tiny_pipe, prompts, targets, steps=STEPS, seed=0, schedules=schedules, batch=1,
                     progress=lambda done, total: seen.append((done, total)))
    return res, seen


def test_run_stages_constant_judge_settles_at_zero(tiny_pipe):
    const = {"shape": "circle", "color": "red", "position": "left", "size": "small", "texture": "plain"}
    targets = [const, dict(const, color="blue")]
    res = run_stages(tiny_pipe, ["a red circle", "a blue circle"], targets, steps=STEPS,
                     judge_fn=lambda image: dict(const))
    n_calls = count_calls(tiny_pipe, STEPS)
    for a in ATTRIBUTES:
        assert res.arrays[f"settle/full/{a}"].tolist() == [0, 0]
        lab = res.arrays[f"labels/full/{a}"]
        assert lab.shape == (n_calls, 2) and bool((lab == lab[0, 0]).all()) and int(lab[0, 0]) >= 0
        assert res.data["schedules"]["full"]["settle"][a] == {"median": 0.0, "p10": 0.0, "p90": 0.0, "mean": 0.0}
    assert res.arrays["match/full/color"].tolist() == [1, 0]
    assert res.arrays["match/full/shape"].tolist() == [1, 1]
    assert res.data["schedules"]["full"]["final_match"]["color"] == 0.5
    assert res.data["schedules"]["full"]["final_match"]["all"] == 0.5
    assert res.arrays["count/full"].eq(-1).all()  # a dict judge gives no count


def test_run_stages_shapes_and_consistency(stages_result, tiny_pipe):
    res, seen = stages_result
    assert res.kind == "stages"
    n_calls = count_calls(tiny_pipe, STEPS)
    assert seen == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert res.data["settings"]["n"] == 2 and res.data["settings"]["steps"] == STEPS
    assert set(res.data["settings"]["schedules"]) == {"full", "half"}
    assert res.data["settings"]["schedules"]["half"]["stop"] == 0.5
    for name in ("full", "half"):
        assert res.arrays[f"timesteps/{name}"].shape == (n_calls,)
        assert res.arrays[f"count/{name}"].shape == (n_calls, 2)
        for a in ATTRIBUTES:
            lab = res.arrays[f"labels/{name}/{a}"]
            settle = res.arrays[f"settle/{name}/{a}"]
            assert lab.shape == (n_calls, 2) and lab.dtype == torch.int32
            assert settle.shape == (2,) and not settle.is_floating_point()
            assert torch.equal(settle, settle_codes(lab))
            assert bool(((settle >= 0) & (settle < n_calls)).all())
            vocab = res.data["vocab"][a]
            assert bool(((lab >= -1) & (lab < len(vocab))).all())
            assert res.arrays[f"match/{name}/{a}"].shape == (2,)
            assert res.arrays[f"output/{name}/{a}"].shape == (2,)
            summ = res.data["schedules"][name]["settle"][a]
            assert summ["p10"] <= summ["median"] <= summ["p90"]
        assert set(res.data["schedules"][name]["final_match"]) == set(ATTRIBUTES) | {"all"}


def test_run_stages_save_load_and_plot(stages_result, tmp_path):
    res, _ = stages_result
    res.save(tmp_path / "stages")
    assert_same_result(res, Result.load(tmp_path / "stages"))
    paths = plot_stages(Result.load(tmp_path / "stages"), tmp_path / "plots")
    assert sorted(p.name for p in paths) == ["stages_full.png", "stages_half.png"]
    for p in paths:
        assert p.read_bytes()[:8] == PNG_MAGIC and p.stat().st_size > 2000


class FakeClip:
    """Stands in for shapefirst.metrics.Clip: features = normalised mean colour + a constant."""

    def image_features(self, images):
        x = torch.as_tensor(np.asarray(images), dtype=torch.float32)
        f = torch.cat([x.mean(dim=(1, 2)), torch.ones(len(x), 1)], dim=1)
        return torch.nn.functional.normalize(f, dim=-1)


def test_run_stages_clip_mode(tiny_pipe, tmp_path):
    with pytest.raises(ShapefirstError):
        run_stages(tiny_pipe, ["a red circle"], steps=STEPS, mode="clip")
    res = run_stages(tiny_pipe, ["a red circle", "a blue square"], steps=STEPS, clip=FakeClip())
    n_calls = count_calls(tiny_pipe, STEPS)
    assert res.data["settings"]["mode"] == "clip"
    sim = res.arrays["clip_sim/full"]
    assert sim.shape == (n_calls, 2) and bool((sim <= 1 + 1e-5).all())
    assert torch.equal(res.arrays["settle/full/clip"], settle_threshold(sim, CLIP_SETTLE))
    assert not any(k.startswith("labels/") for k in res.arrays)
    assert plot_stages(res, tmp_path)[0].exists()


# -- frequency on the tiny pipeline -----------------------------------------------------------
@pytest.fixture(scope="module")
def freq_result(tiny_pipe):
    return run_frequency(tiny_pipe, n_images=2, seed=0, steps=STEPS)


def test_frequency_forward(freq_result, tiny_pipe):
    res = freq_result
    assert res.kind == "frequency"
    ts = res.arrays["forward/timesteps"]
    assert torch.equal(ts, torch.arange(0, 1000, 10))
    assert set(res.data["settings"]["spaces"]) == {"pixel", "photo", "latent", "latent_photo"}
    ac = tiny_pipe.scheduler.alphas_cumprod.double()
    keys = ("signal_low", "signal_high", "noise_low", "noise_high", "xt_low", "xt_high", "ratio", "snr_low",
            "snr_high", "expected_noise_low", "expected_noise_high")
    for space in res.data["settings"]["spaces"]:
        for k in keys:
            assert res.arrays[f"forward/{space}/{k}"].shape == (len(ts),), (space, k)
        shape = res.data["forward"][space]["shape"]
        numel, frac = math.prod(shape), band_energy_fraction(shape[-2], shape[-1], 0.25)
        for band, share in (("low", frac), ("high", 1 - frac)):
            noise = res.arrays[f"forward/{space}/noise_{band}"]
            expected = res.arrays[f"forward/{space}/expected_noise_{band}"]
            # the closed form itself, from the model's own schedule (alpha_bar_0 < 1: noise at t = 0 too)
            assert torch.allclose(expected, ((1 - ac[ts]) * numel * share).sqrt(), rtol=1e-9)
            ratio = noise / expected
            # one noise draw shared by all t: the ratio is the same at every t
            assert torch.allclose(ratio, ratio[0].expand_as(ratio), rtol=1e-5)
            # ...and close to 1: 10%, widened to 3 standard deviations of a chi with few
            # degrees of freedom (the low band of a 16x16 image has only 13 bins per channel)
            dof = numel * share
            assert abs(float(ratio[0]) - 1) < max(0.10, 3 / math.sqrt(2 * dof)), (space, band, float(ratio[0]))
        # the noise grows with t, the signal shrinks
        assert bool((res.arrays[f"forward/{space}/noise_high"].diff() > 0).all())
        assert bool((res.arrays[f"forward/{space}/signal_low"].diff() < 0).all())
    # the photo: low frequencies survive the noise longer
    i500 = int((ts == 500).nonzero())
    snr_low = res.arrays["forward/photo/snr_low"][i500]
    snr_high = res.arrays["forward/photo/snr_high"][i500]
    assert snr_low > snr_high
    assert bool((res.arrays["forward/photo/snr_low"][1:] > res.arrays["forward/photo/snr_high"][1:]).all())
    assert res.data["forward"]["photo"]["snr_at_500"]["low"] == pytest.approx(float(snr_low))


def test_frequency_forward_closed_form_with_many_bins(freq_result):
    # the high band has ~95% of the bins: 10% holds for every space without widening
    for space in freq_result.data["settings"]["spaces"]:
        noise = freq_result.arrays[f"forward/{space}/noise_high"][1:]
        expected = freq_result.arrays[f"forward/{space}/expected_noise_high"][1:]
        assert torch.allclose(noise, expected, rtol=0.10), space


def test_frequency_reverse_and_spectra(freq_result, tiny_pipe):
    res = freq_result
    n_calls = count_calls(tiny_pipe, STEPS)
    assert res.arrays["reverse/timesteps"].shape == (n_calls,)
    for key in ("latent/x_t", "latent/x0", "pixel/x0"):
        for band in ("low", "high"):
            v = res.arrays[f"reverse/{key}/{band}"]
            assert v.shape == (n_calls, 2) and bool((v > 0).all()), key
    for key in ("reverse/settle_low", "reverse/settle_high", "reverse/pixel/settle_low", "reverse/pixel/settle_high"):
        s = res.arrays[key]
        assert s.shape == (2,) and bool(((s >= 0) & (s < n_calls)).all()), key
    med = res.data["reverse"]["settle_median"]["latent"]
    assert med["low"] == float(np.median(res.arrays["reverse/settle_low"].numpy()))
    assert med["high"] == float(np.median(res.arrays["reverse/settle_high"].numpy()))
    nb = res.arrays["spectrum/freqs"].shape[0]
    h, w = res.data["settings"]["image_size"]
    assert nb == min(h, w) // 2 + 1
    for k in ("generated", "renders", "photo"):
        assert res.arrays[f"spectrum/{k}"].shape == (nb,)
    assert res.arrays["spectrum/latent_generated"].shape == res.arrays["spectrum/latent_freqs"].shape
    # natural images concentrate power at low frequencies
    photo = res.arrays["spectrum/photo"]
    assert photo[1] > photo[-1]


def test_frequency_save_load_and_plot(freq_result, tmp_path):
    freq_result.save(tmp_path / "freq")
    loaded = Result.load(tmp_path / "freq")
    assert_same_result(freq_result, loaded)
    paths = plot_frequency(loaded, tmp_path / "plots")
    names = sorted(p.name for p in paths)
    assert names == sorted(["forward_pixel.png", "forward_photo.png", "forward_latent.png",
                            "forward_latent_photo.png", "reverse.png", "spectrum.png"])
    for p in paths:
        assert p.read_bytes()[:8] == PNG_MAGIC and p.stat().st_size > 2000


def test_frequency_without_photo_and_custom_prompts(tiny_pipe):
    res = run_frequency(tiny_pipe, n_images=1, steps=2, prompts=["a red circle", "a blue square"], photo=False,
                        stride=100)
    assert res.data["settings"]["spaces"] == ["pixel", "latent"]
    assert res.arrays["forward/timesteps"].tolist() == list(range(0, 1000, 100))
    assert res.arrays["reverse/settle_low"].shape == (2,)  # one per prompt
    assert "spectrum/photo" not in res.arrays
