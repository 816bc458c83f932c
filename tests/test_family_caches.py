"""diffusers' transformer caches (shapefirst.transformer_cache) on the families added by name (#32): batched CFG
(Sana, HunyuanDiT, CogVideoX) and one transformer call per branch (Qwen-Image, Lumina 2, CogView4, Chroma,
HunyuanVideo; Lumina 2 and Chroma open no cache_context, and shapefirst gives each branch its own).

The tiny builders' transformers get a few more blocks here (from their own config, seeded), so that a block cache has
a head, a middle and a tail. Each cache that composes: alone it skips work (plain torch forward pre-hooks on the leaf
modules of the last block: a skipped block, or a predicted or reused attention, never calls them); under a stop that
keeps the conditional branch the rows the transformer computes (counted on its first layer) are shapefirst's
evaluations while the cache still skips (fewer leaf calls than the same stop without the cache), and the images equal
a reference written without shapefirst's schedule, the same cache on: batched, conftest.CondHalfOn (from the stop the
transformer computes the conditional half and returns it in both halves); separate calls, a plain forward hook giving
the step's conditional output to its unconditional call from the stop on (which still runs, so the cache sees every
call). Afterwards the pipeline is bit-identical. The caches that cannot compose run alone and refuse a stop, or are
refused in one line up front."""
import numpy as np
import pytest
import torch

from shapefirst import tiny, tiny_dits
from shapefirst.errors import ShapefirstError
from shapefirst.guidance import GuidanceSchedule, guidance_schedule
from shapefirst.transformer_cache import TransformerCache, calibrate_mag_ratios, transformer_cache

from conftest import CondFromStep, CondHalfOn

PROMPTS = ["a red circle moving left", "a large blue striped square"]
NEG = "a green triangle"
STEPS, W, STOP = 6, 4.0, 3
BATCHED = ("sana", "hunyuandit", "cogvideox", "auraflow", "cogview3plus", "bria")
SEPARATE = ("qwenimage", "lumina2", "cogview4", "chroma", "hunyuanvideo")


class Spec:
    """A family's tiny pipeline with more blocks (`layers`: config fields), how it is called, its first layer (one
    call per row computed) and the ModuleList whose last block the work is counted on."""

    def __init__(self, make, layers: dict, first: str, last: str, video=False, **call):
        self.make, self.layers, self.first, self.last, self.video, self.call = make, layers, first, last, video, call


SPECS = {
    "sana": Spec(tiny.tiny_sana_pipeline, {"num_layers": 3}, "patch_embed", "transformer_blocks", height=32, width=32,
                 max_sequence_length=16, complex_human_instruction=None, use_resolution_binning=False,
                 guidance_scale=W),
    "hunyuandit": Spec(tiny.tiny_hunyuandit_pipeline, {"num_layers": 4}, "pos_embed", "blocks", height=16, width=16,
                       use_resolution_binning=False, guidance_scale=W),
    "cogvideox": Spec(tiny.tiny_cogvideox_pipeline, {"num_layers": 3}, "patch_embed", "transformer_blocks", video=True,
                      height=16, width=16, num_frames=9, max_sequence_length=16, guidance_scale=W),
    "auraflow": Spec(tiny_dits.tiny_auraflow_pipeline, {"num_mmdit_layers": 2, "num_single_dit_layers": 2},
                     "pos_embed", "single_transformer_blocks", height=16, width=16, max_sequence_length=16,
                     guidance_scale=W),
    "cogview3plus": Spec(tiny_dits.tiny_cogview3plus_pipeline, {"num_layers": 3}, "patch_embed", "transformer_blocks",
                         height=16, width=16, max_sequence_length=16, guidance_scale=W),
    "bria": Spec(tiny_dits.tiny_bria_pipeline, {"num_layers": 2, "num_single_layers": 2}, "x_embedder",
                 "single_transformer_blocks", height=16, width=16, max_sequence_length=16, guidance_scale=W),
    "qwenimage": Spec(tiny.tiny_qwenimage_pipeline, {"num_layers": 3}, "img_in", "transformer_blocks", height=16,
                      width=16, max_sequence_length=16, true_cfg_scale=W, negative_prompt=[NEG] * 2),
    "lumina2": Spec(tiny.tiny_lumina2_pipeline, {"num_layers": 3}, "x_embedder", "layers", height=32, width=32,
                    max_sequence_length=48, guidance_scale=W, negative_prompt=[NEG] * 2),
    "cogview4": Spec(tiny.tiny_cogview4_pipeline, {"num_layers": 3}, "patch_embed", "transformer_blocks", height=16,
                     width=16, max_sequence_length=16, guidance_scale=W, negative_prompt=[NEG] * 2),
    "chroma": Spec(tiny.tiny_chroma_pipeline, {"num_layers": 2, "num_single_layers": 2}, "x_embedder",
                   "single_transformer_blocks", height=16, width=16, max_sequence_length=16, guidance_scale=W,
                   negative_prompt=[NEG] * 2),
    "hunyuanvideo": Spec(tiny.tiny_hunyuanvideo_pipeline, {"num_layers": 2, "num_single_layers": 2}, "x_embedder",
                         "single_transformer_blocks", video=True, height=16, width=16, num_frames=5,
                         max_sequence_length=16, true_cfg_scale=W, negative_prompt=[NEG] * 2),
}
# options that make each cache skip on these tiny models and few steps (Sana's shifted timesteps run 1000 .. 47:
# the timestep ranges of PAB and FasterCache are opened to all of them)
ALL_T = (-1, 1001)
SKIPPING = {"fbc": {"threshold": 0.5}, "taylorseer": {"cache_interval": 3, "disable_cache_before_step": 2},
            "pab": {"spatial_attention_timestep_skip_range": ALL_T},
            "faster": {"spatial_attention_timestep_skip_range": ALL_T,
                       "unconditional_batch_timestep_skip_range": ALL_T, "unconditional_batch_skip_range": 2}}
FORMAT = {("cogvideox", "faster"): {"tensor_format": "BFCHW"}}  # CogVideoX's latents: [B, F, C, H, W]
# diffusers 0.42 has block metadata (First Block Cache, MagCache) for CogVideoX's, Qwen-Image's, CogView4's and
# HunyuanVideo's blocks, none for Sana's, HunyuanDiT's, Lumina 2's and Chroma's (shapefirst does not add to it)
NO_BLOCK_METADATA = ("sana", "hunyuandit", "lumina2", "chroma", "auraflow", "cogview3plus", "bria")
COMPOSES = [(f, k) for f in BATCHED for k in ("fbc", "taylorseer", "pab")
            if not (f in NO_BLOCK_METADATA and k == "fbc")] + \
           [(f, k) for f in SEPARATE for k in ("fbc", "taylorseer", "mag")
            if not (f in NO_BLOCK_METADATA and k in ("fbc", "mag"))]
ALONE_ONLY = [("cogvideox", "mag")] + [(f, "faster") for f in ("sana", "cogvideox", "auraflow")]
# not verified: PAB under a stop on the tiny AuraFlow changes the images by 2.8e-5, less than its attention's rounding
# between the batch sizes of the stop and of the reference (4.8e-5, measured)
COMPOSES.remove(("auraflow", "pab"))


def build(name: str):
    pipe = SPECS[name].make()
    den = pipe.transformer
    torch.manual_seed(1)
    pipe.register_modules(transformer=type(den).from_config({**den.config, **SPECS[name].layers}).eval())
    return pipe


@pytest.fixture(scope="module")
def fams():
    """Each family's pipeline and its plain run, built on first use: {name: Fam}."""
    made = {}

    def get(name: str) -> "Fam":
        if name not in made:
            made[name] = Fam(name, build(name))
        return made[name]
    return get


def run(name: str, pipe):
    gens = [torch.Generator().manual_seed(i) for i in range(len(PROMPTS))]
    out = pipe(PROMPTS, num_inference_steps=STEPS, output_type="np", generator=gens, **SPECS[name].call)
    return out.frames if SPECS[name].video else out.images


class Count:
    """Independent counts, plain torch forward pre-hooks: the rows the transformer's first layer sees, and the calls
    of the leaf modules of its last block (the work a cache skips)."""

    def __init__(self, name: str, pipe):
        den = pipe.transformer
        last = getattr(den, SPECS[name].last)[-1]
        leaves = [m for m in last.modules() if not list(m.children())]
        self.rows = self.work = 0
        self.handles = [getattr(den, SPECS[name].first).register_forward_pre_hook(self.row)]
        self.handles += [m.register_forward_pre_hook(self.leaf) for m in leaves]

    def row(self, module, args):
        self.rows += args[0].shape[0]

    def leaf(self, module, args):
        self.work += 1

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def counted(name: str, pipe, go):
    """go()'s output, the rows and the leaf calls counted while it ran."""
    count = Count(name, pipe)
    try:
        out = go()
    finally:
        count.close()
    return out, count.rows, count.work


class Fam:
    """A family's pipeline, its plain run and its run under the stop (with their counts), its MagCache ratios."""

    def __init__(self, name: str, pipe):
        self.name, self.pipe = name, pipe
        self.plain, _, self.plain_work = counted(name, pipe, self.run)
        with guidance_schedule(pipe, GuidanceSchedule(W, stop_step=STOP, after="cond")):
            self.stop, _, self.stop_work = counted(name, pipe, self.run)
        self._ratios = None

    def run(self):
        return run(self.name, self.pipe)

    def cache(self, kind: str) -> TransformerCache:
        if kind != "mag":
            return TransformerCache(kind, **SKIPPING[kind], **FORMAT.get((self.name, kind), {}))
        if self._ratios is None:
            self._ratios = calibrate_mag_ratios(self.pipe, self.run, STEPS)
        return TransformerCache("mag", mag_ratios=self._ratios, threshold=0.5)



def reference(fam: Fam):
    """The stop's images with the cache on and no shapefirst schedule (see the module docstring)."""
    den = fam.pipe.transformer
    ref = CondHalfOn(den, lambda i: i >= STOP) if fam.name in BATCHED else CondFromStep([den], STOP)
    try:
        return fam.run()
    finally:
        ref.close()


@pytest.mark.parametrize("name,kind", COMPOSES)
def test_a_cache_skips_alone_and_under_a_stop_equals_the_reference(fams, name, kind):
    fam = fams(name)
    cache = fam.cache(kind)
    with transformer_cache(fam.pipe, cache) as calls:
        alone, _, alone_work = counted(name, fam.pipe, fam.run)
        ref = reference(fam)
        with guidance_schedule(fam.pipe, GuidanceSchedule(W, stop_step=STOP, after="cond")) as hook:
            got, rows, work = counted(name, fam.pipe, fam.run)
    assert calls.added and 0 < alone_work < fam.plain_work and not np.array_equal(alone, fam.plain)
    evals = 2 * STOP + STEPS - STOP
    assert hook.evaluations_per_image() == [evals] * 2 and rows == evals * len(PROMPTS)  # the stop saves rows
    assert 0 < work < fam.stop_work  # ... and the cache still skips
    assert np.array_equal(got, ref) and not np.array_equal(got, fam.stop)
    assert np.array_equal(fam.run(), fam.plain)  # every hook removed


@pytest.mark.parametrize("name,kind", ALONE_ONLY)
def test_caches_that_cannot_follow_a_batch_drop_run_alone_and_refuse_a_stop(fams, name, kind):
    """Batched CFG: MagCache's ratios are indexed by the step a restart at the stop would misalign, and FasterCache
    splits every batch into [uncond, cond] halves itself; alone they skip work."""
    fam = fams(name)
    with transformer_cache(fam.pipe, fam.cache(kind)):
        alone, _, alone_work = counted(name, fam.pipe, fam.run)
        with guidance_schedule(fam.pipe, GuidanceSchedule(W, stop_step=STOP, after="cond")):
            with pytest.raises(ShapefirstError, match=f"the {kind} cache does not compose with a guidance schedule"):
                fam.run()
    assert 0 < alone_work < fam.plain_work and not np.array_equal(alone, fam.plain)
    assert np.array_equal(fam.run(), fam.plain)


@pytest.mark.parametrize("name,kind,why", [
    ("hunyuandit", "faster", "does not run on HunyuanDiT2DModel in diffusers 0.42: FasterCache does not split "
                             "HunyuanDiT's image_meta_size"),
    ("cogview3plus", "faster", "FasterCache does not split CogView3Plus's original_size"),
    ("bria", "faster", "Bria's positional ids are \\[tokens, 3\\] for every row"),
] + [(f, k, f"the {k} cache does not run on .*Pipeline, which calls the transformer once per branch")
     for f in SEPARATE for k in ("faster", "pab")] + \
    [(f, k, f"the {k} cache skips whole blocks and reads their outputs through diffusers' block metadata, which "
            "diffusers 0.42 has none for") for f in NO_BLOCK_METADATA for k in ("fbc", "mag")])
def test_caches_that_cannot_run_are_refused_in_one_line(fams, name, kind, why):
    fam = fams(name)
    ratios = {"mag_ratios": [1.0] * STEPS} if kind == "mag" else {}
    with pytest.raises(ShapefirstError, match=why):
        with transformer_cache(fam.pipe, TransformerCache(kind, **ratios)):
            pass
    assert np.array_equal(fam.run(), fam.plain)


@pytest.mark.parametrize("name", ["lumina2", "chroma"])
def test_a_stop_keeping_the_unconditional_branch_is_refused_with_the_branch_contexts_shapefirst_opens(fams, name):
    """As on the pipelines that open their own contexts: from the stop on, the first call of a step (the "cond"
    context) would compute the unconditional branch."""
    fam = fams(name)
    with guidance_schedule(fam.pipe, GuidanceSchedule(W, stop_step=STOP, after="uncond")):
        with pytest.raises(ShapefirstError, match="the taylorseer cache does not compose .* after='uncond'"):
            with transformer_cache(fam.pipe, fam.cache("taylorseer")):
                fam.run()
    assert np.array_equal(fam.run(), fam.plain)


def test_first_block_cache_needs_two_blocks_and_known_block_outputs():
    """CogVideoX with one block: First Block Cache (a head and a tail) is refused, MagCache runs on it (diffusers puts
    head and tail on the one block). A block class with no block metadata in diffusers is refused for the block
    caches and runs TaylorSeer."""
    pipe = tiny.tiny_cogvideox_pipeline()
    den = pipe.transformer
    pipe.register_modules(transformer=type(den).from_config({**den.config, "num_layers": 1}).eval())
    assert len(pipe.transformer.transformer_blocks) == 1
    with pytest.raises(ShapefirstError, match="First Block Cache needs two transformer blocks .* has 1"):
        with transformer_cache(pipe, TransformerCache("fbc")):
            pass
    with transformer_cache(pipe, TransformerCache("mag", mag_ratios=[1.0] * STEPS)) as calls:
        assert calls.added
    block = pipe.transformer.transformer_blocks[0]
    plain_cls = type(block)
    block.__class__ = type("UserBlock", (plain_cls,), {})  # a user's own block class
    try:
        for cache in (TransformerCache("fbc"), TransformerCache("mag", mag_ratios=[1.0] * STEPS)):
            with pytest.raises(ShapefirstError, match=f"the {cache.kind} cache skips whole blocks .* none for on "
                                                      "UserBlock"):
                with transformer_cache(pipe, cache):
                    pass
        with transformer_cache(pipe, TransformerCache("taylorseer")) as calls:
            assert calls.added
    finally:
        block.__class__ = plain_cls


def test_chroma_branch_contexts_equal_diffusers_own(fams):
    """Chroma's pipeline opens no cache_context: shapefirst gives each call its branch's context. The same cache with
    the transformer's calls wrapped in diffusers' own `cache_context("cond")` / `("uncond")` by plain test code (what
    Qwen-Image's pipeline does) gives the same images, and with one context for both branches it does not."""
    fam = fams("chroma")
    den = fam.pipe.transformer
    orig = den.forward

    def wrapped(names):
        calls = [0]

        def forward(*args, **kwargs):
            name = names[calls[0] % 2]
            calls[0] += 1
            with den.cache_context(name):
                return orig(*args, **kwargs)
        return forward

    with transformer_cache(fam.pipe, fam.cache("taylorseer")):
        ours = fam.run()
        for names, same in ((("cond", "uncond"), True), (("both", "both"), False)):
            den.forward = wrapped(names)
            try:
                assert np.array_equal(fam.run(), ours) == same, names
            finally:
                del den.forward
    assert not np.array_equal(ours, fam.plain)
