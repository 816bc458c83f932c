"""Guidance schedules, late caches, trajectories and attention capture on the pipelines beyond
text-to-image (issue #15): SD img2img, inpainting (9-channel UNet), ControlNet (SD and SDXL), SDXL
img2img (base and refiner); SD with a LoRA (load_lora_weights, unfused and fused), an IP-Adapter
(ip_adapter_image_embeds), attention slicing and fused QKV projections; capability detection.

Tiny in-code components (shapefirst.tiny, built like diffusers' get_dummy_components; the LoRA and the
IP-Adapter are made in code with random weights: tiny_lora, tiny_ip_adapter)."""
import numpy as np
import pytest
import torch
from diffusers.callbacks import SDCFGCutoffCallback, SDXLCFGCutoffCallback, SDXLControlnetCFGCutoffCallback

from shapefirst.attention import capture_attention
from shapefirst.cache import LateCache, late_cache
from shapefirst.errors import ShapefirstError
from shapefirst.guidance import AdaptiveStop, GuidanceSchedule, guidance_schedule
from shapefirst.models import FAMILIES, family_by_structure, family_of_pipe
from shapefirst.tiny import (tiny_image, tiny_ip_adapter, tiny_lora, tiny_mask, tiny_sd_pipeline, tiny_sd_variant,
                             tiny_sdxl_controlnet_pipeline, tiny_sdxl_img2img_pipeline)
from shapefirst.trace import TrajectoryRecorder

from conftest import gens

PROMPTS = ["a red circle", "a small blue striped square"]
STEPS = 8
W = 7.5
SD_KINDS = ("img2img", "inpaint", "controlnet")
SDXL_KINDS = ("sdxl-img2img", "sdxl-refiner", "sdxl-controlnet")
TEXT_KINDS = ("lora", "lora-fused", "ip-adapter", "sliced", "fused-qkv")  # StableDiffusionPipeline, modified
KINDS = SD_KINDS + SDXL_KINDS + TEXT_KINDS
CUTOFF_KINDS = tuple(k for k in KINDS if k != "ip-adapter")  # diffusers' callbacks cannot cut image embeddings
CONTROLNET_KINDS = ("controlnet", "sdxl-controlnet")
FAMILY = {k: "sdxl" if k.startswith("sdxl") else "sd" for k in KINDS}
IP_EMBEDS = torch.randn((2, 1, 16), generator=torch.Generator().manual_seed(7))  # [negative; positive] image


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    out = {k: tiny_sd_variant(k, folder=tmp_path_factory.mktemp(k)) for k in SD_KINDS}
    for k, refiner in (("sdxl-img2img", False), ("sdxl-refiner", True)):
        out[k] = tiny_sdxl_img2img_pipeline(folder=tmp_path_factory.mktemp(k), refiner=refiner)
    out["sdxl-controlnet"] = tiny_sdxl_controlnet_pipeline(folder=tmp_path_factory.mktemp("sdxl-controlnet"))
    for k in TEXT_KINDS:
        out[k] = tiny_sd_pipeline(folder=tmp_path_factory.mktemp(k))
    lora = tiny_lora(out["lora"].unet, tmp_path_factory.mktemp("lora-weights"), seed=5)
    for k in ("lora", "lora-fused"):
        out[k].load_lora_weights(lora)
    out["lora-fused"].fuse_lora()
    tiny_ip_adapter(out["ip-adapter"], seed=3, image_embed_dim=IP_EMBEDS.shape[-1])
    out["sliced"].enable_attention_slicing(1)
    out["fused-qkv"].fuse_qkv_projections()
    return out


def inputs(kind: str, rows: int = 1) -> dict:
    """The pipeline's image inputs. Inpainting gets one row per image: with a single image, diffusers
    encodes the masked image once with the FIRST generator for the whole batch (so image i of a batch
    differs from its solo run in the plain pipeline too). IP-Adapter: one image embedding, which diffusers
    uses for every image of the batch."""
    if kind in ("sdxl-img2img", "sdxl-refiner"):
        return dict(image=tiny_image(0), strength=0.75)
    return {"img2img": dict(image=tiny_image(0), strength=0.75),
            "inpaint": dict(image=tiny_image(0).repeat(rows, 1, 1, 1), mask_image=tiny_mask().repeat(rows, 1, 1, 1)),
            "controlnet": dict(image=tiny_image(1)), "sdxl-controlnet": dict(image=tiny_image(1)),
            "ip-adapter": dict(ip_adapter_image_embeds=[IP_EMBEDS])}.get(kind, {})


def run(pipe, kind, prompts=PROMPTS, n_img=1, generators=None, **kw):
    g = generators if generators is not None else gens(0, len(prompts) * n_img)
    return pipe(prompts, num_inference_steps=STEPS, guidance_scale=W, num_images_per_prompt=n_img, generator=g,
                output_type="np", **{**inputs(kind, len(g)), **kw}).images


class Cutoff(SDCFGCutoffCallback):
    """diffusers' SDCFGCutoffCallback, also cutting the pipeline's other CFG-batch tensors to their
    conditional row at the cutoff (the inpainting mask and masked-image latents, the control image),
    as SDXLControlnetCFGCutoffCallback does for the control image."""

    def __init__(self, cutoff_step_index: int, extra: tuple[str, ...]):
        super().__init__(cutoff_step_ratio=None, cutoff_step_index=cutoff_step_index)
        self.extra = extra

    @property
    def tensor_inputs(self):
        return ["prompt_embeds", *self.extra]

    def callback_fn(self, pipeline, step_index, timestep, callback_kwargs):
        out = super().callback_fn(pipeline, step_index, timestep, callback_kwargs)
        if step_index == self.config.cutoff_step_index:
            for name in self.extra:
                out[name] = out[name][-1:]
        return out


EXTRA = {"inpaint": ("mask", "masked_image_latents"), "controlnet": ("image",)}


def cutoff_callback(kind: str, index: int):
    """diffusers' CFG-cutoff callback for the pipeline (after step `index`)."""
    if kind == "sdxl-controlnet":
        return SDXLControlnetCFGCutoffCallback(cutoff_step_ratio=None, cutoff_step_index=index)
    if kind.startswith("sdxl"):
        return SDXLCFGCutoffCallback(cutoff_step_ratio=None, cutoff_step_index=index)
    return Cutoff(index, EXTRA.get(kind, ()))


@pytest.mark.parametrize("kind", KINDS)
def test_family_and_no_stop_is_bit_identical(pipes, kind):
    pipe = pipes[kind]
    assert family_of_pipe(pipe) == FAMILY[kind] == family_by_structure(pipe)
    ref = run(pipe, kind, n_img=2)
    for sched in (GuidanceSchedule(W), GuidanceSchedule(W, stop=1.0)):
        with guidance_schedule(pipe, sched) as hook:
            assert np.array_equal(run(pipe, kind, n_img=2), ref)
        assert hook.evaluations_per_image() == [2 * pipe.num_timesteps] * 4


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("kind", CUTOFF_KINDS)
def test_cond_mode_equals_the_cfg_cutoff_callback(pipes, kind, k):
    pipe = pipes[kind]
    cb = cutoff_callback(kind, k - 1)
    ref = run(pipe, kind, PROMPTS[:1], callback_on_step_end=cb, callback_on_step_end_tensor_inputs=cb.tensor_inputs)
    with guidance_schedule(pipe, GuidanceSchedule(W, stop_step=k, after="cond")) as hook:
        got = run(pipe, kind, PROMPTS[:1])
    n = pipe.num_timesteps
    assert np.array_equal(got, ref) and hook.evaluations_per_image() == [2 * k + (n - k)]


@pytest.mark.parametrize("after", ["uncond", "cond"])
@pytest.mark.parametrize("kind", KINDS)
def test_two_prompts_two_images_match_their_solo_runs(pipes, kind, after):
    pipe = pipes[kind]
    g = gens(0, 4)
    with guidance_schedule(pipe, GuidanceSchedule(W, stop_step=3, after=after)):
        batch = run(pipe, kind, PROMPTS, n_img=2, generators=g)
        for i in range(4):
            solo = run(pipe, kind, [PROMPTS[i // 2]], generators=[gens(0, 4)[i]])
            assert np.abs(batch[i] - solo[0]).max() <= 1 / 255, (kind, after, i)


@pytest.mark.parametrize("kind", KINDS)
def test_late_cache_with_the_stop_at_the_end_is_bit_identical(pipes, kind):
    pipe = pipes[kind]
    ref = run(pipe, kind)
    cut = None
    for stop, cache in ((1.0, LateCache("mean", 2)), (1.0, LateCache("kept")), (0.5, LateCache("mean", 2))):
        with guidance_schedule(pipe, GuidanceSchedule(W, stop=stop)), late_cache(pipe, cache):
            got = run(pipe, kind)
        if stop == 1.0:
            assert np.array_equal(got, ref)
        else:
            cut = got
    with guidance_schedule(pipe, GuidanceSchedule(W, stop=0.5)):
        assert not np.array_equal(run(pipe, kind), cut)  # the cache acts after a stop


@pytest.mark.parametrize("kind", KINDS)
def test_interval_and_adaptive_schedules_count_per_run_calls(pipes, kind):
    pipe = pipes[kind]
    with guidance_schedule(pipe, GuidanceSchedule(W, start_step=1, stop_step=4, after="cond")) as hook:
        run(pipe, kind)
    n = pipe.num_timesteps
    assert hook.evaluations_per_image() == [2 * 3 + (n - 3)] * 2
    with guidance_schedule(pipe, GuidanceSchedule(W, adaptive=AdaptiveStop(0.5, min_call=2))) as hook:
        run(pipe, kind)
    assert hook.evaluations_per_image() == [2 * 3 + (n - 3)] * 2 and hook.stop_calls.tolist() == [3, 3]
    with guidance_schedule(pipe, GuidanceSchedule(W, stop=0.5)) as hook:  # fractions of this run's calls
        run(pipe, kind)
    k = int(np.floor(0.5 * n + 0.5))
    assert hook.n_calls == n and hook.stop_calls.tolist() == [k, k]
    assert hook.evaluations_per_image() == [2 * k + (n - k)] * 2


@pytest.mark.parametrize("kind", KINDS)
def test_trajectory_and_attention_capture_leave_images_unchanged(pipes, kind):
    pipe = pipes[kind]
    sched = GuidanceSchedule(W, stop_step=2)
    with guidance_schedule(pipe, sched):
        ref = run(pipe, kind)
    rec = TrajectoryRecorder()
    with guidance_schedule(pipe, sched, rec), capture_attention(pipe) as cap:
        got = run(pipe, kind)
    n = pipe.num_timesteps
    tr = rec.trajectory
    assert np.array_equal(got, ref) and tr.n_calls == n == cap.n_calls
    assert tr.guided[:2].all() and not tr.guided[2:].any() and torch.isfinite(tr.arrays["x0"]).all()
    assert cap.complete == [True, True] + [False] * (n - 2) and torch.isfinite(cap.mass[:2]).all()


# -- ControlNet ---------------------------------------------------------------------------------
class Rows:
    """Rows entering a module (a forward pre-hook: counts what really runs)."""

    def __init__(self, module):
        self.rows, self.h = 0, module.register_forward_pre_hook(self)

    def __call__(self, mod, args):
        self.rows += args[0].shape[0]


@pytest.mark.parametrize("kind", CONTROLNET_KINDS)
def test_controlnet_runs_only_the_rows_the_unet_needs(pipes, kind):
    pipe = pipes[kind]
    cn, un = Rows(pipe.controlnet.conv_in), Rows(pipe.unet.conv_in)
    try:
        with guidance_schedule(pipe, GuidanceSchedule(W, stop_step=3, after="cond")):
            run(pipe, kind, PROMPTS)
    finally:
        cn.h.remove()
        un.h.remove()
    assert cn.rows == un.rows == 2 * (2 * 3 + (STEPS - 3))


@pytest.mark.parametrize("after", ["uncond", "cond"])
@pytest.mark.parametrize("kind", CONTROLNET_KINDS)
def test_controlnet_guess_mode_and_conditioning_scale_keep_working(pipes, kind, after):
    pipe = pipes[kind]
    kw = dict(guess_mode=True, controlnet_conditioning_scale=0.5)
    ref = run(pipe, kind, **kw)
    assert not np.array_equal(ref, run(pipe, kind))  # guess_mode and the scale change the images
    with guidance_schedule(pipe, GuidanceSchedule(W)):
        assert np.array_equal(run(pipe, kind, **kw), ref)
    with guidance_schedule(pipe, GuidanceSchedule(W, stop_step=3, after=after)) as hook:
        batch = run(pipe, kind, **kw)
        for i in range(2):
            solo = run(pipe, kind, [PROMPTS[i]], generators=[gens(0, 2)[i]], **kw)
            assert np.abs(batch[i] - solo[0]).max() <= 1 / 255
    assert hook.evaluations_per_image() == [2 * 3 + (STEPS - 3)]


# -- LoRA, IP-Adapter, attention slicing, fused QKV ----------------------------------------------
@pytest.mark.parametrize("kind", TEXT_KINDS)
def test_the_modification_really_acts(pipes, tiny_pipe, kind):
    """The LoRA and the IP-Adapter change the images (against the same components without them); fusing the
    LoRA, slicing attention and fusing QKV change them only by float rounding, also with a stop."""
    pipe = pipes[kind]
    base = pipes["lora"] if kind == "lora-fused" else tiny_pipe  # the same components without the modification
    got, ref = run(pipe, kind), run(base, "plain")
    if kind in ("lora", "ip-adapter"):
        assert np.abs(got - ref).max() > 10 / 255
        return
    assert np.abs(got - ref).max() <= 1 / 255
    stopped = []
    for p in (pipe, base):
        with guidance_schedule(p, GuidanceSchedule(W, stop_step=3)):
            stopped.append(run(p, "plain"))
    assert np.abs(stopped[0] - stopped[1]).max() <= 1 / 255


def test_lora_is_in_the_unet_the_hooks_see(pipes):
    from peft.tuners.tuners_utils import BaseTunerLayer

    for kind in ("lora", "lora-fused"):
        layers = [m for m in pipes[kind].unet.modules() if isinstance(m, BaseTunerLayer)]
        assert layers and all(bool(m.merged) == (kind == "lora-fused") for m in layers)


@pytest.mark.parametrize("after", ["uncond", "cond"])
def test_ip_adapter_image_embeddings_follow_the_rows_that_run(pipes, after):
    """Unguided from the first call, a run is the kept branch alone: bit-identical to the pipeline without CFG
    (guidance_scale=1) given that branch's prompt and image embedding only (the negative one for uncond)."""
    pipe = pipes["ip-adapter"]
    neg, pos = IP_EMBEDS[:1], IP_EMBEDS[1:]
    assert not np.array_equal(run(pipe, "ip-adapter", PROMPTS[:1], ip_adapter_image_embeds=[torch.cat([pos, pos])]),
                              run(pipe, "ip-adapter", PROMPTS[:1]))  # the negative image embedding matters
    with guidance_schedule(pipe, GuidanceSchedule(W, stop_step=0, after=after)) as hook:
        got = run(pipe, "ip-adapter", PROMPTS[:1])
    prompt, embeds = (PROMPTS[0], pos) if after == "cond" else ("", neg)
    ref = pipe([prompt], num_inference_steps=STEPS, guidance_scale=1.0, generator=gens(0, 1), output_type="np",
               ip_adapter_image_embeds=[embeds]).images
    assert np.array_equal(got, ref) and hook.evaluations_per_image() == [STEPS]


# -- capability detection -----------------------------------------------------------------------
def test_an_unlisted_pipeline_is_detected_by_its_structure(pipes, monkeypatch):
    pipe = pipes["img2img"]
    monkeypatch.setitem(FAMILIES, "sd", tuple(c for c in FAMILIES["sd"] if c != "StableDiffusionImg2ImgPipeline"))
    assert family_of_pipe(pipe) == "sd"
    ref = run(pipe, "img2img")
    with guidance_schedule(pipe, GuidanceSchedule(W, stop=1.0)) as hook:
        assert np.array_equal(run(pipe, "img2img"), ref)
    assert hook.state.verify


def test_another_cfg_batch_layout_is_refused(pipes):
    from diffusers import StableDiffusionPAGPipeline

    comp = {k: v for k, v in pipes["img2img"].components.items() if k != "image_encoder"}
    pag = StableDiffusionPAGPipeline(**comp, requires_safety_checker=False, pag_applied_layers=["mid"])
    pag.set_progress_bar_config(disable=True)
    assert family_of_pipe(pag) == "sd"  # by structure; its CFG batch is [uncond, cond, perturbed]
    for prompts in (PROMPTS[:1], PROMPTS):
        with guidance_schedule(pag, GuidanceSchedule(W, stop_step=2)):
            with pytest.raises(ShapefirstError, match=r"not \[uncond, cond\]") as e:
                pag(prompts, num_inference_steps=2, guidance_scale=W, pag_scale=2.0, output_type="np")
        assert "\n" not in str(e.value) and "StableDiffusionPipeline" in str(e.value)


# -- no host synchronisation in the per-call path -----------------------------------------------
SYNCS = {"item", "cpu", "tolist", "numpy", "equal", "nonzero", "__bool__", "__int__", "__float__", "__index__"}


class SyncChecker:
    """Counts device-to-host reads made by shapefirst's hooks themselves (not by the modules they wrap).

    The pipeline's latents are a DeviceTensor (a tensor subclass, so every value computed from them, the
    denoiser's outputs included, is one too): reading one back while a hook's own code runs (armed) is a
    sync: .item(), .cpu(), .tolist(), .numpy(), bool()/int()/float(), torch.equal, nonzero, and boolean-
    mask indexing. The hooks' entry points arm it, their calls into the wrapped forward disarm it."""

    def __init__(self):
        self.armed, self.syncs = 0, []
        checker = self

        class DeviceTensor(torch.Tensor):
            @classmethod
            def __torch_function__(cls, func, types, args=(), kwargs=None):
                name = getattr(func, "__name__", "")
                mask = name in ("__getitem__", "__setitem__") and len(args) > 1 and any(
                    isinstance(i, torch.Tensor) and i.dtype == torch.bool
                    for i in (args[1] if isinstance(args[1], tuple) else (args[1],)))
                if checker.armed and (name in SYNCS or mask):
                    checker.syncs.append(name)
                if name == "cpu":  # what comes back to the host is a host tensor
                    with torch._C.DisableTorchFunctionSubclass():
                        return func(*args, **(kwargs or {})).as_subclass(torch.Tensor)
                return super().__torch_function__(func, types, args, kwargs or {})

        self.cls = DeviceTensor

    def arm(self, fn):
        def armed(*a, **k):
            self.armed += 1
            try:
                return fn(*a, **k)
            finally:
                self.armed -= 1
        return armed

    def disarm(self, fn):
        def disarmed(*a, **k):
            saved, self.armed = self.armed, 0
            try:
                return fn(*a, **k)
            finally:
                self.armed = saved
        return disarmed


def _all_hooks(pipe):
    from diffusers.hooks import HookRegistry

    mods = list(pipe.unet.modules()) + (list(pipe.controlnet.modules()) if hasattr(pipe, "controlnet") else [])
    for m in mods:
        reg = HookRegistry.check_if_exists_or_initialize(m)
        for name in ("shapefirst_guidance", "shapefirst_cache", "shapefirst_controlnet_rows"):
            if reg.get_hook(name) is not None:
                yield reg.get_hook(name)


@pytest.mark.parametrize("case", ["stop+mean+deep", "kept", "controlnet", "sdxl-controlnet", "ip-adapter",
                                  "adaptive"])
def test_the_hooks_make_no_host_sync_per_call(pipes, tiny_pipe, monkeypatch, case):
    from shapefirst import cache as cache_mod, guidance as guidance_mod

    chk = SyncChecker()
    for cls, meth in ((guidance_mod.GuidanceHook, "new_forward"), (guidance_mod.ControlNetRows, "new_forward"),
                      (cache_mod.CrossAttentionReuse, "new_forward"), (cache_mod.DeepSkip, "new_forward"),
                      (cache_mod._DeepState, "on_call")):
        monkeypatch.setattr(cls, meth, chk.arm(getattr(cls, meth)))
    kind = case if case in pipes else None
    pipe = pipes[kind] if kind else tiny_pipe
    sched = GuidanceSchedule(W, adaptive=AdaptiveStop(0.5, min_call=2)) if case == "adaptive" else \
        GuidanceSchedule(W, stop_step=3, after="cond" if kind else "uncond")
    cache = {"stop+mean+deep": LateCache("mean", 2), "kept": LateCache("kept")}.get(case)
    g = torch.Generator().manual_seed(0)
    latents = torch.randn((2, 4, 8, 8), generator=g).as_subclass(chk.cls)
    with guidance_schedule(pipe, sched) as hook, late_cache(pipe, cache):
        for h in _all_hooks(pipe):
            if h.fn_ref.original_forward is not None:
                h.fn_ref.original_forward = chk.disarm(h.fn_ref.original_forward)
        pipe(PROMPTS, num_inference_steps=STEPS, guidance_scale=W, latents=latents, output_type="np",
             **(inputs(kind) if kind else {}))
    assert hook.call == STEPS and hook.evaluations_per_image() == [2 * 3 + STEPS - 3] * 2
    if case == "adaptive":  # documented: at most one read per call, of the adaptive stop flags
        assert 0 < len(chk.syncs) <= STEPS and set(chk.syncs) == {"cpu"}, chk.syncs
    else:
        assert chk.syncs == [], chk.syncs


@pytest.mark.parametrize("kind", CONTROLNET_KINDS)
def test_a_controlnet_that_fails_mid_run_leaves_the_next_run_clean(pipes, kind):
    """The ControlNet raising inside a stopped call (its rows cut) must not leave the shared state
    half-prepared: the next run equals a run on a fresh schedule."""
    pipe = pipes[kind]
    sched = GuidanceSchedule(W, stop=0.5)
    with guidance_schedule(pipe, sched):
        ref = run(pipe, kind)
    calls = [0]

    def boom(module, args):
        calls[0] += 1
        if calls[0] == STEPS - 1:  # a late call: the hook runs the ControlNet on the kept rows only
            raise RuntimeError("boom")

    with guidance_schedule(pipe, sched):
        h = pipe.controlnet.conv_in.register_forward_pre_hook(boom)
        try:
            with pytest.raises(RuntimeError, match="boom"):
                run(pipe, kind)
        finally:
            h.remove()
        again = run(pipe, kind)
    np.testing.assert_allclose(again, ref, atol=1e-6)
