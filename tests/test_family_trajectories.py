"""Trajectories on every family (#32 item 4): Qwen-Image, Chroma, CogView4, Lumina 2, Sana, HunyuanDiT, Kolors and
HunyuanVideo, on their tiny in-code pipelines. Each is recorded under a guidance schedule (guided calls 0 and 1, the
conditional branch after) and its last call's x0-hat, decoded by Trajectory.decode as that pipeline decodes its
latents (its family's declared Family.latent_layout: Qwen-Image's packed tokens through its VAE's frame axis,
Chroma's packed tokens, HunyuanVideo's [C, F, H, W]; the VAE's scaling/shift factors or latents_mean/std), is
compared with the pipeline's own output (output_type="np"): equal within TOL. The first call's x0-hat decodes to
another picture (the check is not vacuous). The drawings (contact sheet and GIF for images, strip and animation for
a video) show the pipeline's output in their last call. Also: the layout declarations are consistent, a declared
family's latents of other dimensions are refused in one line, generate(trace=True) saves a Qwen-Image trajectory
that reloads and decodes, and a clipping DDPM (clip_sample) steps with the clipped x0-hat."""
import numpy as np
import pytest
import torch
from PIL import Image

from shapefirst.errors import ShapefirstError
from shapefirst.families import DECLARED, family
from shapefirst.guidance import GuidanceSchedule, guidance_schedule
from shapefirst.tiny import (tiny_chroma_pipeline, tiny_cogview4_pipeline, tiny_hunyuandit_pipeline,
                             tiny_hunyuanvideo_pipeline, tiny_kolors_pipeline, tiny_lumina2_pipeline,
                             tiny_qwenimage_pipeline, tiny_sana_pipeline)
from shapefirst.trace import Trajectory, TrajectoryRecorder, _recorded_layout
from shapefirst.video_strip import LAYOUT_DIMS, LAYOUTS, VIDEO_LAYOUTS

PROMPTS = ["a red circle on the left", "a large blue striped square"]
NEG = "a green triangle"
STEPS, W, STOP = 4, 4.0, 2
TOL = 1e-4
"""Decoded pixels (in [0, 1]) against the pipeline's: measured 0.0 on the flow families (the last Euler step lands
exactly on x_t - sigma v), 2.7e-7 on Kolors (Euler on epsilon, x0 through alpha_bar), 0.0 on HunyuanDiT."""


def hunyuandit_released():
    """The tiny HunyuanDiT with the scheduler settings HunyuanDiT-v1.2-Diffusers ships (DDPM, v-prediction, no
    clip_sample, steps_offset 1)."""
    from diffusers import DDPMScheduler

    pipe = tiny_hunyuandit_pipeline()
    pipe.scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.018, beta_schedule="scaled_linear",
                                   clip_sample=False, prediction_type="v_prediction", steps_offset=1,
                                   timestep_spacing="leading", variance_type="fixed_small")
    return pipe


# family -> (tiny builder, call arguments, its layout); the packed families run a non-square image (the recorded
# height and width unpack it)
SPECS = {
    "qwenimage": (tiny_qwenimage_pipeline, dict(true_cfg_scale=W, negative_prompt=NEG, height=16, width=32,
                                                max_sequence_length=16), "packed_frame"),
    "chroma": (tiny_chroma_pipeline, dict(guidance_scale=W, negative_prompt=NEG, height=32, width=16,
                                          max_sequence_length=16), "packed"),
    "cogview4": (tiny_cogview4_pipeline, dict(guidance_scale=W, negative_prompt=NEG, height=16, width=16,
                                              max_sequence_length=16), "image"),
    "lumina2": (tiny_lumina2_pipeline, dict(guidance_scale=W, negative_prompt=NEG, height=32, width=32,
                                            max_sequence_length=48), "image"),
    "sana": (tiny_sana_pipeline, dict(guidance_scale=W, height=32, width=32, max_sequence_length=16,
                                      complex_human_instruction=None, use_resolution_binning=False), "image"),
    "hunyuandit": (hunyuandit_released, dict(guidance_scale=W, height=16, width=16, use_resolution_binning=False),
                   "image"),
    "kolors": (tiny_kolors_pipeline, dict(guidance_scale=W, height=16, width=16, max_sequence_length=16), "image"),
    "hunyuanvideo": (tiny_hunyuanvideo_pipeline, dict(true_cfg_scale=W, negative_prompt=NEG, height=16, width=16,
                                                      num_frames=5, max_sequence_length=16), "video"),
}


def gens(n=len(PROMPTS)):
    return [torch.Generator().manual_seed(i) for i in range(n)]


def output(out) -> np.ndarray:
    """The pipeline's own pictures: images [N, H, W, 3] or videos [N, frames, H, W, 3]."""
    return out.frames if hasattr(out, "frames") else out.images


def hwc(x: torch.Tensor) -> np.ndarray:
    return x.movedim(-3, -1).numpy()


def q(x: np.ndarray) -> np.ndarray:
    return (np.clip(x, 0, 1) * 255).round().astype(np.uint8)


@pytest.fixture(scope="module", params=list(SPECS))
def recorded(request):
    """(family, pipeline, trajectory, the pipeline's own output) of one call under a stop after call 1."""
    name = request.param
    make, call, _ = SPECS[name]
    pipe = make()
    rec = TrajectoryRecorder()
    with guidance_schedule(pipe, GuidanceSchedule(W, stop_step=STOP, after="cond"), rec):
        out = pipe(PROMPTS, num_inference_steps=STEPS, output_type="np", generator=gens(), **call)
    return name, pipe, rec.trajectory, output(out)


def test_the_layout_is_the_familys_declaration(recorded):
    name, pipe, traj, _ = recorded
    want = SPECS[name][2]
    assert family(pipe).name == name and family(pipe).latent_layout == want and traj.layout == want
    assert traj.arrays["x0"].dim() - 2 == LAYOUT_DIMS[want]
    assert traj.n_calls == STEPS and traj.guided[:STOP].all() and not traj.guided[STOP:].any()
    call = SPECS[name][1]
    assert (traj.meta["height"], traj.meta["width"]) == (call["height"], call["width"])


def test_the_last_calls_x0_hat_decodes_to_the_pipelines_output(recorded):
    name, pipe, traj, ref = recorded
    last = hwc(traj.decode(pipe.vae, "x0", [traj.n_calls - 1])[0])
    assert last.shape == ref.shape
    gap = float(np.abs(last - ref).max())
    assert gap <= TOL, (name, gap)
    first = hwc(traj.decode(pipe.vae, "x0", [0])[0])
    assert float(np.abs(first - ref).max()) > 0.01  # the first call's guess is another picture


def test_the_drawing_ends_with_the_pipelines_output(recorded, tmp_path):
    """Images: the contact sheet's last column is each image as the pipeline returns it (within one 8-bit level),
    and the GIF has one frame per call. A video: the strip's last row per video is its frames, and the animation has
    one frame per video frame."""
    name, pipe, traj, ref = recorded
    n, calls = len(PROMPTS), traj.n_calls
    if traj.is_video:
        frames, h, w = ref.shape[1:4]
        with Image.open(traj.strip(pipe.vae, tmp_path / "strip.png")) as im:
            arr = np.asarray(im.convert("RGB"))
        assert arr.shape == (n * calls * h, frames * w, 3)
        for v in range(n):
            last = arr[(v * calls + calls - 1) * h:(v * calls + calls) * h]
            want = np.concatenate(list(q(ref[v])), axis=1)
            assert np.abs(last.astype(int) - want.astype(int)).max() <= 1
        with Image.open(traj.animation(pipe.vae, tmp_path / "x0.webp")) as im:
            assert im.n_frames == frames and im.size == (calls * w, n * h)
        return
    h, w = ref.shape[1:3]
    with Image.open(traj.contact_sheet(pipe.vae, tmp_path / "sheet.png")) as im:
        arr = np.asarray(im.convert("RGB"))
    assert arr.shape == (n * h, calls * w, 3)
    for i in range(n):
        tile = arr[i * h:(i + 1) * h, (calls - 1) * w:]
        assert np.abs(tile.astype(int) - q(ref[i]).astype(int)).max() <= 1
    with Image.open(traj.gif(pipe.vae, tmp_path / "x0.gif")) as im:
        assert im.n_frames == calls and im.size == (n * w, h)


def test_generate_trace_saves_a_qwenimage_trajectory_that_reloads_and_decodes(tmp_path):
    """shapefirst.generate(trace=True) on Qwen-Image: the saved trajectory keeps its layout and the pipeline's
    vae_scale_factor, reloads, and its last call decodes to the images generate returned; the contact sheet is
    written beside it."""
    from shapefirst.generate import generate

    pipe = tiny_qwenimage_pipeline()
    call = {k: v for k, v in SPECS["qwenimage"][1].items() if k not in ("negative_prompt", "true_cfg_scale")}
    res = generate(pipe, PROMPTS, GuidanceSchedule(W, stop_step=STOP, after="cond"), steps=STEPS, trace=True,
                   negative_prompt=NEG, **call)
    res.save(tmp_path / "out", vae=pipe.vae)
    folder = tmp_path / "out" / "trajectory"
    traj = Trajectory.load(folder)
    assert traj.layout == "packed_frame" and traj.meta["vae_scale_factor"] == pipe.vae_scale_factor
    last = hwc(traj.decode(pipe.vae, "x0", [traj.n_calls - 1])[0])
    assert float(np.abs(last - res.images).max()) <= TOL
    with Image.open(folder / "contact_sheet.png") as im:
        assert im.size == (STEPS * 32, 2 * 16)


def test_a_clipping_ddpm_steps_with_the_clipped_x0_hat():
    """The recorded x0-hat is the model's prediction. A scheduler with clip_sample (DDPMScheduler's default, which
    the tiny HunyuanDiT keeps) clips it to [-clip_sample_range, clip_sample_range] before its step, and its last
    step lands on that clipped x0-hat: decoded clipped, it equals the pipeline's images; unclipped it does not."""
    pipe = tiny_hunyuandit_pipeline()
    assert pipe.scheduler.config.clip_sample
    rec = TrajectoryRecorder()
    with guidance_schedule(pipe, GuidanceSchedule(W, stop_step=STOP, after="cond"), rec):
        ref = pipe(PROMPTS, num_inference_steps=STEPS, output_type="np", generator=gens(),
                   **SPECS["hunyuandit"][1]).images
    traj = rec.trajectory
    r = pipe.scheduler.config.clip_sample_range
    clipped = Trajectory(traj.timesteps, {"x0": traj.arrays["x0"].clamp(-r, r)}, traj.guided, traj.meta)
    assert float(np.abs(hwc(clipped.decode(pipe.vae, "x0", [STEPS - 1])[0]) - ref).max()) <= TOL
    assert float(np.abs(hwc(traj.decode(pipe.vae, "x0", [STEPS - 1])[0]) - ref).max()) > 1e-3


def test_every_declared_layout_is_known_and_fits_the_video_flag():
    for fam in DECLARED:
        assert fam.latent_layout in LAYOUTS, fam.name
        assert (fam.latent_layout in VIDEO_LAYOUTS) == fam.video, fam.name


def test_latents_that_do_not_fit_the_declared_layout_are_refused():
    """A Flux trajectory whose latents are [C, H, W] (not its packed tokens) is refused in one line; a trajectory
    of no declared family takes its layout from its dimensions."""
    guided = torch.zeros(1, 1, dtype=torch.bool)
    wrong = Trajectory([1.0], {"x0": torch.zeros(1, 1, 4, 2, 2)}, guided, {"family": "flux"})
    with pytest.raises(ShapefirstError, match="flux's latents are laid out 'packed'"):
        wrong.decode(None)
    assert _recorded_layout("flux", wrong.arrays) is None  # the recorder still assembles it, with no layout
    for shape, want in (((1, 1, 16, 16), "packed"), ((1, 1, 4, 2, 2), "image"), ((1, 1, 4, 2, 2, 2), "video")):
        assert Trajectory([1.0], {"x0": torch.zeros(shape)}, guided, {}).layout == want
