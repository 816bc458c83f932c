"""diffusers' transformer caches on tiny PixArt-alpha and SD3 pipelines through shapefirst.transformer_cache:
each runs as diffusers ships it (its blocks really skip work), leaves the plain transformer behind,
composes with a guidance stop where it can (a never-skipping cache under a stop gives the stop's
own latents) and refuses clearly where it cannot."""
import pytest
import torch

from shapefirst.errors import ShapefirstError
from shapefirst.guidance import GuidanceSchedule, guidance_schedule
from shapefirst.transformer_cache import (
    KINDS,
    TransformerCache,
    calibrate_mag_ratios,
    transformer_cache,
)

STEPS = 10


@pytest.fixture(scope="module")
def pixart():
    from shapefirst.tiny import tiny_pixart_pipeline

    return tiny_pixart_pipeline()


def run(pipe, n=2):
    g = [torch.Generator().manual_seed(i) for i in range(n)]
    return pipe(["a red circle", "a blue square"][:n], num_inference_steps=STEPS, guidance_scale=4.5, generator=g,
                use_resolution_binning=False, output_type="latent", height=64, width=64, clean_caption=False).images


def counted(module):
    n = [0]
    h = module.register_forward_pre_hook(lambda *a: n.__setitem__(0, n[0] + 1))
    return n, h


@pytest.fixture(scope="module")
def ratios(pixart):
    return calibrate_mag_ratios(pixart, lambda: run(pixart), STEPS)


def skipping(kind, ratios):
    options = {"fbc": {"threshold": 0.5}, "taylorseer": {"cache_interval": 3, "disable_cache_before_step": 2},
               "mag": {"mag_ratios": ratios, "threshold": 0.5}}
    return TransformerCache(kind, **options.get(kind, {}))


@pytest.mark.parametrize("kind", KINDS)
def test_each_cache_skips_work_and_leaves_the_plain_transformer(pixart, ratios, kind):
    plain = run(pixart)
    block = pixart.transformer.transformer_blocks[1]
    attn = block.attn1 if kind in ("fbc", "mag") else block.attn1.to_q  # whole blocks vs attention outputs skipped
    n, h = counted(attn)
    try:
        run(pixart)
        full = n[0]
        n[0] = 0
        with transformer_cache(pixart, skipping(kind, ratios)) as calls:
            cached = run(pixart)
        assert calls.calls == STEPS
        assert 0 < n[0] < full, (n[0], full)  # some calls of the block's work skipped, not all
    finally:
        h.remove()
    assert not torch.equal(cached, plain)
    assert torch.equal(run(pixart), plain)  # every hook removed


def test_a_never_skipping_cache_under_a_stop_gives_the_stops_latents(pixart):
    with guidance_schedule(pixart, GuidanceSchedule(4.5, stop=0.5)):
        stop = run(pixart)
        with transformer_cache(pixart, TransformerCache("fbc", threshold=0.0)):
            both = run(pixart)
    assert torch.equal(both, stop)


@pytest.mark.parametrize("kind", ["pab", "fbc", "taylorseer"])
def test_caches_that_look_back_a_few_calls_compose_with_a_stop(pixart, ratios, kind):
    with guidance_schedule(pixart, GuidanceSchedule(4.5, stop=0.5)) as hook:
        stop = run(pixart)
        with transformer_cache(pixart, skipping(kind, ratios)) as calls:
            both = run(pixart)
        assert hook.evaluations.tolist() == [15, 15]  # 5 guided calls of 2 rows, 5 of one
    assert calls.calls == STEPS and torch.isfinite(both).all() and not torch.equal(both, stop)


@pytest.mark.parametrize("kind", ["faster", "mag"])
def test_faster_cache_and_mag_cache_refuse_a_stop(pixart, ratios, kind):
    plain = run(pixart)
    with guidance_schedule(pixart, GuidanceSchedule(4.5, stop=0.5)):
        with pytest.raises(ShapefirstError, match=f"the {kind} cache does not compose with a guidance schedule"):
            with transformer_cache(pixart, skipping(kind, ratios)):
                run(pixart)
    assert torch.equal(run(pixart), plain)


def test_on_sd3_pab_taylorseer_and_mag_run_and_the_two_diffusers_cannot_are_refused():
    from shapefirst.tiny import tiny_sd3_pipeline

    sd3 = tiny_sd3_pipeline()

    def run3():
        g = [torch.Generator().manual_seed(i) for i in range(2)]
        return sd3(["a red circle", "a blue square"], num_inference_steps=STEPS, guidance_scale=4.5, generator=g,
                   output_type="latent", height=32, width=32).images

    plain = run3()
    ratios = calibrate_mag_ratios(sd3, run3, STEPS)
    for cache in (TransformerCache("pab"), skipping("taylorseer", None), skipping("mag", ratios)):
        with transformer_cache(sd3, cache) as calls:
            cached = run3()
        assert calls.added and calls.calls == STEPS and not torch.equal(cached, plain), cache.kind
    for kind in ("faster", "fbc"):
        with pytest.raises(ShapefirstError, match=f"the {kind} cache does not run on SD3Transformer2DModel"):
            with transformer_cache(sd3, TransformerCache(kind)):
                pass
    assert torch.equal(run3(), plain)


def test_calibrated_mag_ratios_have_one_per_step(ratios):
    assert len(ratios) == STEPS and ratios[0] == 1.0 and all(r > 0 for r in ratios)


def test_bad_input(tiny_pipe):
    with pytest.raises(ShapefirstError, match="unknown transformer cache 'deep'"):
        TransformerCache("deep")
    with pytest.raises(ShapefirstError, match="MagCache needs mag_ratios"):
        TransformerCache("mag")
    with pytest.raises(ShapefirstError, match="bad fbc cache option"):
        TransformerCache("fbc", thresh=0.1).diffusers_config(lambda: 0)
    with pytest.raises(ShapefirstError, match="need a diffusion transformer with `transformer_blocks`"):
        with transformer_cache(tiny_pipe, TransformerCache("fbc")):
            pass
