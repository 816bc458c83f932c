"""Trajectories of video and packed-latent pipelines drawn, frequency bands in space and time, and the report end to
end on a tiny Wan folder and a tiny Flux (issue #32 item 4). References: the pipelines' own output frames
(output_type="np"), closed-form spectra, and an independent probe of the attention capture."""
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from shapefirst.errors import ShapefirstError
from shapefirst.frequency import (spacetime_bands, split_bands, split_temporal, temporal_energy_fraction,
                                  temporal_lowpass_mask)
from shapefirst.guidance import GuidanceSchedule, guidance_schedule
from shapefirst.trace import Trajectory, TrajectoryRecorder

PROMPTS = ["a red circle moving left", "a blue square"]
STEPS, W = 4, 5.0
WAN_CALL = {"height": 16, "width": 16, "num_frames": 5, "max_sequence_length": 16}
FLUX_CALL = {"height": 16, "width": 16, "max_sequence_length": 16}
TINY = dict(n=2, pairs=2, steps=3, film=2, sweep_n=2, batch=2, stops=(0.5,))


def gens(n):
    return [torch.Generator().manual_seed(i) for i in range(n)]


def traced(pipe, **kw):
    """(trajectory, the pipeline's own output) of one call under full guidance with shapefirst's recorder."""
    rec = TrajectoryRecorder()
    with guidance_schedule(pipe, GuidanceSchedule(W), rec):
        out = pipe(PROMPTS, num_inference_steps=STEPS, output_type="np", generator=gens(len(PROMPTS)), **kw)
    return rec.trajectory, out


def hwc(x: torch.Tensor) -> np.ndarray:
    """[..., 3, H, W] -> [..., H, W, 3] numpy."""
    return x.movedim(-3, -1).numpy()


def q(x: np.ndarray) -> np.ndarray:
    return (np.clip(x, 0, 1) * 255).round().astype(np.uint8)


@pytest.fixture(scope="module")
def wan():
    from shapefirst.tiny import tiny_wan_pipeline

    return tiny_wan_pipeline(seed=0)


@pytest.fixture(scope="module")
def wan_run(wan):
    return traced(wan, negative_prompt="", guidance_scale=W, **WAN_CALL)


# -- 1. video trajectories drawn ----------------------------------------------------------------------------------
def test_wan_decoded_last_call_equals_the_pipelines_frames(wan, wan_run):
    """Wan's own UniPC on flow sigmas ends on the last call's x0-hat; decoded with AutoencoderKLWan's
    latents_mean/latents_std as WanPipeline decodes, it equals the frames the pipeline returns."""
    traj, out = wan_run
    frames = out.frames  # [videos, frames, H, W, 3]
    assert traj.layout == "video" and traj.meta["num_frames"] == 5 and traj.arrays["x0"].shape[3] == 2
    dec = traj.decode(wan.vae, "x0", [traj.n_calls - 1])[0]  # [videos, frames, 3, H, W]
    assert dec.shape == (2, 5, 3, 16, 16)
    assert np.abs(hwc(dec) - frames).max() < 1e-4
    first = traj.decode(wan.vae, "x0", [0])[0]
    assert np.abs(hwc(first) - frames).max() > 0.01  # the first call's guess is another video


def test_the_strip_is_calls_by_frames_tiles_and_its_last_row_is_the_output(wan, wan_run, tmp_path):
    traj, out = wan_run
    path = traj.strip(wan.vae, tmp_path / "strip.png")
    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGB"))
    calls, frames, videos, side = traj.n_calls, 5, 2, 16
    assert arr.shape == (videos * calls * side, frames * side, 3)
    for v in range(videos):
        last = arr[(v * calls + calls - 1) * side:(v * calls + calls) * side]  # video v's last call, all frames
        want = np.concatenate(list(q(out.frames[v])), axis=1)  # its frames side by side
        assert np.abs(last.astype(int) - want.astype(int)).max() <= 1


@pytest.mark.parametrize("suffix", ["webp", "gif"])
def test_the_animation_has_one_frame_per_video_frame(wan, wan_run, tmp_path, suffix):
    """Per video frame, the calls side by side: as many animation frames as the video has, the last call's column
    showing the pipeline's frame (exact in the lossless WebP)."""
    traj, out = wan_run
    path = traj.animation(wan.vae, tmp_path / f"x0.{suffix}")
    with Image.open(path) as im:
        assert im.n_frames == 5 and im.size == (traj.n_calls * 16, 2 * 16)
        if suffix == "webp":
            for f in range(5):
                im.seek(f)
                arr = np.asarray(im.convert("RGB"))
                got = arr[:16, (traj.n_calls - 1) * 16:]  # video 0, last call
                assert np.abs(got.astype(int) - q(out.frames[0, f]).astype(int)).max() <= 1


def test_a_generate_trace_of_a_video_saves_its_strip_and_animation(wan, tmp_path):
    """generate(trace=True).save on a video pipeline writes the strip as the contact sheet and the animation as the
    GIF (Trajectory.contact_sheet / gif draw videos); the trajectory reloads with its layout."""
    from shapefirst.generate import generate

    res = generate(wan, PROMPTS[:1], GuidanceSchedule(W), steps=3, trace=True, **WAN_CALL)
    res.save(tmp_path / "out", vae=wan.vae)
    tdir = tmp_path / "out" / "trajectory"
    with Image.open(tdir / "contact_sheet.png") as im:
        assert im.size == (5 * 16, 3 * 16)
    with Image.open(tdir / "x0.gif") as im:
        assert im.n_frames == 5
    assert Trajectory.load(tdir).layout == "video"


def test_cogvideox_frames_first_latents_decode_to_the_pipelines_frames():
    """CogVideoX keeps frames before channels ([F, C, H, W] per video) and decodes with its VAE's scaling factor;
    DDIM's last step lands on x0-hat."""
    from shapefirst.tiny import tiny_cogvideox_pipeline

    pipe = tiny_cogvideox_pipeline()
    traj, out = traced(pipe, height=16, width=16, num_frames=9, guidance_scale=W, max_sequence_length=16)
    assert traj.layout == "video_frames" and traj.arrays["x0"].shape[2] == 3  # 3 latent frames at dim 2
    dec = traj.decode(pipe.vae, "x0", [traj.n_calls - 1])[0]
    assert dec.shape == (2, 9, 3, 16, 16)
    assert np.abs(hwc(dec) - out.frames).max() < 1e-4


def test_flux_packed_latents_decode_to_the_pipelines_images():
    """Flux gives its transformer t / 1000 and packs 2x2 latent patches as tokens: x0-hat uses the scheduler's
    sigma of that step, and the recorder's height and width unpack a non-square latent; the last call decodes to
    the images the pipeline returns."""
    from shapefirst.tiny import tiny_flux_pipeline

    pipe = tiny_flux_pipeline()
    traj, out = traced(pipe, negative_prompt="", true_cfg_scale=W, height=16, width=32, max_sequence_length=16)
    assert traj.layout == "packed" and (traj.meta["height"], traj.meta["width"]) == (16, 32)
    sig = pipe.scheduler.sigmas[:STEPS].double()
    assert np.allclose(traj.timesteps, sig.numpy(), rtol=1e-3)  # what Flux's transformer is given
    dec = traj.decode(pipe.vae, "x0", [traj.n_calls - 1])[0]
    assert dec.shape == (2, 3, 16, 32)
    assert np.abs(hwc(dec) - out.images).max() < 1e-4


def test_an_image_trajectory_has_no_strip(tmp_path):
    traj = Trajectory([1.0], {"x0": torch.zeros(1, 1, 4, 2, 2)}, torch.zeros(1, 1, dtype=torch.bool), {})
    with pytest.raises(ShapefirstError, match="holds images"):
        traj.strip(None, tmp_path / "s.png")


# -- 2. frequency in space and time --------------------------------------------------------------------------------
def test_spacetime_bands_of_a_known_spectrum():
    """a cos(2 pi 3 f / 8) (flat in space, temporal frequency 0.75 of Nyquist) + b cos(2 pi 12 y / 32) (still in
    time, spatial frequency 0.75): each term lies wholly in one band of each split, so the band norms are the
    terms' closed-form norms a sqrt(F H W / 2) and b sqrt(F H W / 2)."""
    frames, h, w, a, b = 8, 32, 16, 2.0, 0.5
    f = torch.arange(frames, dtype=torch.float64).view(frames, 1, 1)
    y = torch.arange(h, dtype=torch.float64).view(1, h, 1)
    flicker = a * torch.cos(2 * torch.pi * 3 * f / frames).expand(frames, h, w)
    stripes = b * torch.cos(2 * torch.pi * 12 * y / h).expand(frames, h, w)
    video = (flicker + stripes).reshape(1, 1, 1, frames, h, w)  # [T, N, C, F, H, W]
    got = spacetime_bands(video, frame_dim=3)
    na, nb = a * (frames * h * w / 2) ** 0.5, b * (frames * h * w / 2) ** 0.5
    for band, want in (("low", na), ("high", nb), ("temporal_low", nb), ("temporal_high", na)):
        assert torch.allclose(got[band], torch.tensor([[want]], dtype=torch.float64), rtol=1e-12), band
    frames_first = video.permute(0, 1, 3, 2, 4, 5)  # CogVideoX's [T, N, F, C, H, W]
    again = spacetime_bands(frames_first, frame_dim=2)
    assert all(torch.allclose(again[k], got[k], rtol=1e-12) for k in got)


def test_the_temporal_split_is_an_orthogonal_projection():
    x = torch.randn(3, 2, 4, 7, 5, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    low, high = split_temporal(x, dim=3)
    assert torch.allclose(low + high, x, atol=1e-12)
    assert abs(float((low * high).sum())) < 1e-9 * float((x * x).sum())
    low2, high2 = split_temporal(low, dim=3)
    assert torch.allclose(low2, low, atol=1e-12) and float(high2.abs().max()) < 1e-12
    mean_frame = x.mean(dim=3, keepdim=True).expand_as(x)  # radius tiny: only the DC term, the mean frame
    assert torch.allclose(split_temporal(x, dim=3, radius=1e-6)[0], mean_frame, atol=1e-12)


def test_temporal_mask_counts():
    """Normalised temporal frequency k / (F / 2): Wan's 21 latent frames keep |k| <= 2 at radius 0.25 (5 bins);
    2 latent frames keep the mean frame only."""
    assert temporal_lowpass_mask(21).sum() == 5 and temporal_energy_fraction(21) == 5 / 21
    assert temporal_lowpass_mask(2).tolist() == [True, False]
    assert temporal_lowpass_mask(8, 1.0).all()


def test_run_spacetime_finds_the_calls_a_band_settles_at():
    """A synthetic video trajectory whose spatial-low / temporal-low part is fixed from call 0 and whose high parts
    keep changing until calls 3 and 4: the settling calls are 0, 3, 0, 4."""
    from shapefirst.experiments.frequency import run_spacetime, spacetime_summary

    g = torch.Generator().manual_seed(1)
    calls, frames, h, w = 6, 4, 8, 8
    base = torch.randn(1, 1, 1, h, w, generator=g, dtype=torch.float64)
    smooth, _ = split_bands(base.expand(1, 1, frames, h, w).clone())  # spatially low, still in time
    x0 = torch.zeros(calls, 1, 1, frames, h, w, dtype=torch.float64)
    for c in range(calls):
        x0[c] = smooth
        if c < 3:  # spatial high noise, still in time (temporal low), settles at call 3
            x0[c] += split_bands(torch.randn(1, 1, 1, h, w, generator=g, dtype=torch.float64))[1].expand(
                1, 1, frames, h, w)
        if c < 4:  # a spatially flat flicker (temporal high, spatial low), settles at call 4
            x0[c] += torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=torch.float64).view(1, 1, frames, 1, 1) * (c + 1)
    traj = Trajectory([float(c) for c in range(calls)], {"x0": x0}, torch.ones(calls, 1, dtype=torch.bool),
                      {"layout": "video"})
    res = run_spacetime(traj)
    got = {b: int(res.arrays[f"settle/{b}"][0]) for b in ("low", "high", "temporal_low", "temporal_high")}
    assert got == {"low": 4, "high": 3, "temporal_low": 3, "temporal_high": 4}
    sm = spacetime_summary(res)
    assert "In time, x0-hat's low band settles at call 3" in sm.caption


# -- 3. the report end to end --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def budget():
    from shapefirst.report import BUDGETS

    mp = pytest.MonkeyPatch()
    mp.setitem(BUDGETS, "quick", {**BUDGETS["quick"], **TINY})
    yield
    mp.undo()


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    from shapefirst.metrics import Clip
    from shapefirst.tiny import tiny_clip_folder

    return Clip.load(tiny_clip_folder(tmp_path_factory.mktemp("clip")))


def report(pipe, out, clip, call):
    from shapefirst.report import run_report

    return run_report(pipe, out, "quick", world=False, clip=clip, prompts=PROMPTS, pairs=[tuple(PROMPTS)] * 2,
                      model_name="tiny", guidance=W, call=call)


@pytest.fixture(scope="module")
def wan_report(wan, budget, clip, tmp_path_factory):
    """The report on a saved tiny Wan folder, loaded as the command line loads a --model folder."""
    from shapefirst.models import load_pipeline

    folder = tmp_path_factory.mktemp("wan") / "wan"
    wan.save_pretrained(folder, safe_serialization=True)
    pipe = load_pipeline(str(folder))
    out = tmp_path_factory.mktemp("wanrep") / "rep"
    return pipe, out, report(pipe, out, clip, WAN_CALL)


def sections(text: str) -> dict[str, str]:
    """section id -> its HTML."""
    return dict(re.findall(r'<section id="([^"]+)">(.*?)</section>', text, re.S))


def attention_refusal(pipe) -> str | None:
    """The attention capture's own answer for this denoiser (an independent probe of attention.py's public API)."""
    from shapefirst.attention import capture_attention

    try:
        with capture_attention(pipe):
            return None
    except ShapefirstError as e:
        return str(e)


def test_the_wan_report_names_every_section_and_says_why_one_does_not_apply(wan_report):
    pipe, out, index = wan_report
    text = index.read_text()
    secs = sections(text)
    for sec in ("generate", "spacetime", "stages", "frequency", "attention", "eos-swap", "token-ablation", "sweep"):
        assert sec in secs, sec
    assert "Not run on this model: stages judges each call" in secs["stages"]
    assert "Not run on this model: UniPCMultistepScheduler runs flow matching" in secs["frequency"]
    for sec in ("eos-swap", "token-ablation"):  # Wan's embeddings come from shapefirst.pipeline: both sections run
        assert "<img" in secs[sec] and "Not run" not in secs[sec], sec
    assert "its &lt;/s&gt; alone" in secs["eos-swap"]  # what the swap moves on Wan (pipeline.EOS_BLOCK_NOTES)
    refusal = attention_refusal(pipe)
    if refusal is not None:
        from html import escape

        assert f"Not run on this model: {escape(refusal)}" in secs["attention"]
    else:
        assert "<img" in secs["attention"] or "Not run on this model:" in secs["attention"]
    assert "<img" in secs["spacetime"] and "temporal low" in secs["spacetime"]
    assert "Image-CLIP is not measured" in secs["sweep"]
    info = json.loads((out / "results" / "report.json").read_text())
    assert info["family"] == "wan" and info["video"] and info["call"] == WAN_CALL


def test_the_wan_report_shows_the_video_strip_and_animation(wan_report):
    pipe, out, index = wan_report
    gen = sections(index.read_text())["generate"]
    srcs = re.findall(r'src="([^"]+)"', gen)
    strip = [s for s in srcs if s.endswith("contact_sheet.png")]
    anim = [s for s in srcs if s.endswith("x0.gif")]
    assert len(strip) == 1 and len(anim) == 1
    run = json.loads((out / "results" / "generate" / "run.json").read_text())
    calls, videos = run["denoiser_calls"], len(run["prompts"])
    with Image.open(out / strip[0]) as im:
        assert im.size == (5 * 16, videos * calls * 16)  # calls x frames tiles per video
    assert (out / strip[0]).read_bytes() == (out / "results" / "generate" / "trajectory" / "contact_sheet.png"
                                             ).read_bytes()
    with Image.open(out / anim[0]) as im:
        assert im.n_frames == 5
    frames = []
    with Image.open(out / "results" / "generate" / "video_000.webp") as v:  # the run's own video: the strip's last row
        for f in range(v.n_frames):
            v.seek(f)
            frames.append(np.asarray(v.convert("RGB")))
    with Image.open(out / strip[0]) as im:
        arr = np.asarray(im.convert("RGB"))
    assert np.abs(arr[(calls - 1) * 16:calls * 16].astype(int) - np.concatenate(frames, 1).astype(int)).max() <= 1


def test_the_cli_rebuilds_the_video_page_from_saved_results(wan_report, tmp_path):
    import shutil

    from shapefirst.cli import main

    _, out, _ = wan_report
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    assert main(["report", "--out", str(copy), "--page-only"]) == 0
    text = (copy / "index.html").read_text()
    assert set(sections(text)) >= {"generate", "spacetime", "stages", "sweep"}
    assert "(wan family; every" in text and "num_frames=5" in text


def test_a_rerun_at_another_size_is_refused(wan_report, clip):
    """The call's sizes are part of the runner's fingerprint: a saved section made at another size is refused."""
    pipe, out, _ = wan_report
    with pytest.raises(ShapefirstError, match="other settings"):
        report(pipe, out, clip, {**WAN_CALL, "height": 32})


def test_a_report_that_fails_leaves_nothing_half_written(wan, budget, clip, tmp_path, monkeypatch):
    """A crash in the sweep: no index.html, no page folder; every result folder written is complete."""
    from shapefirst.report import page as rep

    def boom(*a, **k):
        raise RuntimeError("crash in the sweep")

    monkeypatch.setattr(rep, "run_sweep", boom)
    out = tmp_path / "rep"
    with pytest.raises(RuntimeError, match="crash in the sweep"):
        report(wan, out, clip, WAN_CALL)
    assert not (out / "index.html").exists() and not list(out.glob("page-*"))
    assert (out / "results" / "generate" / "run.json").exists()
    assert (out / "results" / "spacetime" / "results.json").exists()


def test_a_page_build_that_fails_leaves_the_old_page(wan_report, tmp_path, monkeypatch):
    import shutil

    from shapefirst.report import build_page
    from shapefirst.report import page as rep

    _, out, _ = wan_report
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    before, pages = (copy / "index.html").read_text(), sorted(p.name for p in copy.glob("page-*"))

    def boom(*a, **k):
        raise RuntimeError("crash while drawing")

    monkeypatch.setattr(rep, "spacetime_summary", boom)
    with pytest.raises(RuntimeError):
        build_page(copy)
    assert (copy / "index.html").read_text() == before
    assert sorted(p.name for p in copy.glob("page-*")) == pages


def test_with_call_defaults_is_the_plain_call_with_those_arguments(wan):
    from shapefirst.outputs import model_fingerprint
    from shapefirst.report.page import check_call, with_call_defaults

    runner = with_call_defaults(wan, WAN_CALL)
    assert type(runner).__name__ == "WanPipeline" and runner.transformer is wan.transformer
    kw = dict(negative_prompt="", num_inference_steps=2, output_type="np")
    got = runner(PROMPTS[0], generator=gens(1), **kw).frames
    want = wan(PROMPTS[0], generator=gens(1), **WAN_CALL, **kw).frames
    assert np.array_equal(got, want)
    assert runner(PROMPTS[0], generator=gens(1), **{**kw, "num_frames": 1}).frames.shape[1] == 1  # caller wins
    assert model_fingerprint(runner) != model_fingerprint(wan)
    assert model_fingerprint(runner) == model_fingerprint(with_call_defaults(wan, dict(WAN_CALL)))
    with pytest.raises(ShapefirstError, match="guidance_scale"):
        check_call({"guidance_scale": 3})


def test_the_flux_report_runs_true_cfg_and_says_why_sections_do_not_apply(budget, clip, tmp_path):
    """Flux with true CFG (true_cfg_scale and an empty negative prompt, from its family declaration): the traced
    generation's contact sheet unpacks its latents (last column = the saved image), stages runs with CLIP, and the
    sections that do not apply say why."""
    from shapefirst.tiny import tiny_flux_pipeline

    pipe = tiny_flux_pipeline()
    out = tmp_path / "rep"
    index = report(pipe, out, clip, FLUX_CALL)
    secs = sections(index.read_text())
    for sec in ("generate", "stages", "frequency", "attention", "eos-swap", "token-ablation", "sweep"):
        assert sec in secs, sec
    assert "spacetime" not in secs  # images: no time axis
    assert "<img" in secs["stages"] and "Not run" not in secs["stages"]
    assert "Not run on this model: FlowMatchEulerDiscreteScheduler runs flow matching" in secs["frequency"]
    assert "<img" in secs["attention"] or "Not run on this model:" in secs["attention"]
    for sec in ("eos-swap", "token-ablation"):  # Flux's T5 and pooled CLIP embeddings from shapefirst.pipeline
        assert "<img" in secs[sec] and "Not run" not in secs[sec], sec
    run = json.loads((out / "results" / "generate" / "run.json").read_text())
    assert run["denoiser_evaluations_per_image"] == [2 * TINY["steps"]] * 2  # both branches: true CFG ran
    with Image.open(out / "results" / "generate" / "trajectory" / "contact_sheet.png") as im:
        sheet = np.asarray(im.convert("RGB"))
    assert sheet.shape == (2 * 16, TINY["steps"] * 16, 3)
    with Image.open(out / "results" / "generate" / "image_000.png") as im:
        first = np.asarray(im.convert("RGB"))
    assert np.abs(sheet[:16, -16:].astype(int) - first.astype(int)).max() <= 1


def test_the_cli_reports_on_a_wan_folder_at_the_size_it_is_given(wan, budget, tmp_path):
    """`shapefirst report --model <Wan folder> --height --width --num-frames --max-sequence-length`: the sizes reach
    every pipeline call (run.json) and the page names every section; a size that is not one is refused in a line."""
    from shapefirst.cli import main
    from shapefirst.tiny import tiny_clip_folder

    folder = tmp_path / "wan"
    wan.save_pretrained(folder, safe_serialization=True)
    clip = tiny_clip_folder(tmp_path / "clip")
    f = tmp_path / "prompts.txt"
    f.write_text("\n".join(PROMPTS) + "\n")
    pairs = tmp_path / "pairs.txt"
    pairs.write_text(f"{PROMPTS[0]} || {PROMPTS[1]}\n")
    size = ["--height", str(WAN_CALL["height"]), "--width", str(WAN_CALL["width"]), "--num-frames",
            str(WAN_CALL["num_frames"]), "--max-sequence-length", str(WAN_CALL["max_sequence_length"])]
    args = ["report", "--model", str(folder), "--prompts", str(f), "--pairs", str(pairs), "--clip", str(clip),
            "--guidance", str(W), "--out", str(tmp_path / "rep")]
    assert main(args + size) == 0
    secs = sections((tmp_path / "rep" / "index.html").read_text())
    assert {"generate", "spacetime", "stages", "frequency", "attention", "sweep"} <= set(secs)
    info = json.loads((tmp_path / "rep" / "results" / "report.json").read_text())
    assert info["call"] == WAN_CALL
    assert main(args[:-1] + [str(tmp_path / "rep2"), "--height", "0"]) == 2
    assert not (tmp_path / "rep2").exists()
