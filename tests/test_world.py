"""The shapes world: deterministic renders, captions, the judge's accuracy, the tokenizer, training."""
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from shapefirst.errors import ShapefirstError
from shapefirst.world import dit_model_path, model_path, render
from shapefirst.world.judge import degrade, judge
from shapefirst.world.vocab import load_tokenizer, write_tokenizer


def test_renders_are_deterministic():
    a = render.sample_scenes(20, 3)
    b = render.sample_scenes(20, 3)
    assert a == b
    assert np.array_equal(render.render_batch(a), render.render_batch(b))
    assert a != render.sample_scenes(20, 4)


def test_held_out_split_is_disjoint_and_about_one_in_eight():
    combos = render.all_combinations()
    held = [c for c in combos if render.is_held_out(c)]
    assert 0.1 < len(held) / len(combos) < 0.15
    train = {(s.shape, s.color, s.position, s.size, s.texture) for s in render.sample_scenes(500, 0, "train")}
    assert not train & set(held)


@pytest.mark.parametrize("template", range(len(render.TEMPLATES)))
def test_captions_parse_back_to_labels(template):
    for s in render.sample_scenes(100, template, "all"):
        assert render.parse_caption(s.caption(template)) == s.labels()


def _accuracy(scenes, images):
    hits = {a: 0 for a in render.ATTRIBUTES}
    count_ok = 0
    for s, im in zip(scenes, images):
        v = judge(im)
        count_ok += v.count == 1
        for a, ok in v.matches(s.labels()).items():
            hits[a] += ok
    return {a: h / len(scenes) for a, h in hits.items()}, count_ok / len(scenes)


def test_judge_on_fresh_renders():
    scenes = render.sample_scenes(300, 11, "all")
    acc, count = _accuracy(scenes, [render.render(s) for s in scenes])
    assert count == 1.0
    assert all(v >= 0.99 for v in acc.values()), acc


def test_judge_on_degraded_renders():
    rng = np.random.default_rng(0)
    scenes = render.sample_scenes(300, 12, "all")
    acc, count = _accuracy(scenes, [degrade(render.render(s), rng) for s in scenes])
    assert count >= 0.97
    assert all(v >= 0.97 for v in acc.values()), acc


def test_judge_counts_empty_and_two_objects():
    blank = np.full((64, 64, 3), render.BACKGROUND, np.float32)
    assert judge(blank).count == 0
    a = render.render(render.Scene("circle", "red", "left", "small", "plain"))
    b = render.render(render.Scene("square", "blue", "right", "small", "plain"))
    two = np.where(np.abs(b - render.BACKGROUND).sum(-1, keepdims=True) > 0.05, b, a)
    assert judge(two).count == 2


def test_judge_accepts_tensor_and_pil_layouts():
    from PIL import Image

    s = render.Scene("triangle", "green", "top", "large", "striped")
    img = render.render(s)
    chw = torch.from_numpy(img.transpose(2, 0, 1) * 2 - 1)
    pil = Image.fromarray((img * 255).round().astype(np.uint8))
    for x in (img, chw, pil):
        assert judge(x).labels == s.labels()


def test_tokenizer_words_are_single_tokens_and_pad_with_eos(tmp_path):
    tok = load_tokenizer(write_tokenizer(tmp_path / "tok"))
    for vals in render.VALUES.values():
        for w in vals:
            assert len(tok(w, add_special_tokens=False).input_ids) == 1, w
    ids = tok("a red circle", padding="max_length", max_length=77).input_ids
    assert len(ids) == 77 and tok.model_max_length == 77
    assert ids[0] == tok.bos_token_id and ids[4] == tok.eos_token_id and set(ids[4:]) == {tok.eos_token_id}
    assert tok.pad_token_id == tok.eos_token_id
    # unknown words still tokenize (byte-level fallback)
    assert tok.decode(tok("zebra!", add_special_tokens=False).input_ids).replace(" ", "") == "zebra!"


def test_bang_padding_variant(tmp_path):
    tok = load_tokenizer(write_tokenizer(tmp_path / "tok", pad_token="!"))
    ids = tok("a red circle", padding="max_length", max_length=77).input_ids
    assert ids[4] == tok.eos_token_id and set(ids[5:]) == {tok.pad_token_id} and tok.pad_token_id != tok.eos_token_id


@pytest.mark.heavy
def test_training_smoke_and_resume(tmp_path):
    """A few steps of every stage on tiny sizes; an interrupted run resumes to the same weights."""
    from safetensors.torch import load_file

    from shapefirst.world.train import Recipe, train

    r = Recipe.tiny()
    full = train(tmp_path / "a", r)
    assert (full / "model_index.json").exists() and (full / "clip" / "config.json").exists()
    assert train(tmp_path / "b", r, max_steps=r.clip_steps + r.vae_steps + 2) is None  # paused inside the UNet stage
    assert not (tmp_path / "b" / "unet").exists()
    resumed = train(tmp_path / "b", r)
    wa = load_file(str(full / "unet" / "diffusion_pytorch_model.safetensors"))
    wb = load_file(str(resumed / "unet" / "diffusion_pytorch_model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_training_continues_from_a_base_model(tmp_path):
    """--base keeps the base model's text encoder, VAE and CLIP and trains its UNet further."""
    import json

    from safetensors.torch import load_file

    from shapefirst.world.train import Recipe, train

    base = train(tmp_path / "a", Recipe.tiny())
    r = Recipe.tiny(seed=1)
    r.base, r.unet_lr, r.fp16 = str(base), 1e-12, False
    cont = train(tmp_path / "b", r)
    w = lambda m, f: load_file(str(m / f))  # noqa: E731
    for f in ("text_encoder/model.safetensors", "vae/diffusion_pytorch_model.safetensors"):
        a, b = w(base, f), w(cont, f)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ua, ub = w(base, "unet/diffusion_pytorch_model.safetensors"), w(cont, "unet/diffusion_pytorch_model.safetensors")
    assert all(torch.allclose(ua[k], ub[k], atol=1e-6) for k in ua)  # started from the base UNet (lr ~ 0)
    rec = json.loads((cont / "recipe.json").read_text())
    assert rec["recipe"]["base"] == str(base) and rec["base"]["recipe"]["seed"] == 0


def test_training_base_must_be_a_model_folder(tmp_path):
    from shapefirst.world.train import Recipe, train

    r = Recipe.tiny()
    r.base = str(tmp_path)
    with pytest.raises(ShapefirstError, match="not a shapes-world model folder"):
        train(tmp_path / "b", r)
    r.base = str(model_path())  # the shipped model's UNet is wider than the tiny recipe's
    with pytest.raises(ShapefirstError, match="UNet of widths"):
        train(tmp_path / "b", r)
    assert not (tmp_path / "b").exists()  # refused before the work folder is claimed


SHIPPED = model_path()


def test_shipped_text_model_pools_at_the_tokenizers_eos():
    from transformers import CLIPTextModel

    tok = load_tokenizer(SHIPPED / "tokenizer")
    text = CLIPTextModel.from_pretrained(SHIPPED / "text_encoder", torch_dtype=torch.float32)
    assert text.config.eos_token_id == tok.eos_token_id
    enc = tok(["a red circle", "a large blue striped square at the top"], padding="max_length", max_length=77,
              return_tensors="pt")
    out = text(enc.input_ids)
    eos = (enc.input_ids == tok.eos_token_id).int().argmax(1)
    assert torch.allclose(out.pooler_output, out.last_hidden_state[torch.arange(2), eos])


def test_shipped_model_loads_with_plain_diffusers_and_follows_color():
    code = textwrap.dedent(f"""
        import sys, json, torch
        from diffusers import StableDiffusionPipeline
        pipe = StableDiffusionPipeline.from_pretrained({str(SHIPPED)!r}, torch_dtype=torch.float32)
        pipe.set_progress_bar_config(disable=True)
        assert "shapefirst" not in sys.modules
        prompts = ["a large red plain square in the center", "a large blue plain circle in the center",
                   "a large green plain square in the center", "a large yellow plain circle in the center"]
        g = [torch.Generator("cpu").manual_seed(i) for i in range(4)]
        ims = pipe(prompts, num_inference_steps=20, guidance_scale=7.5, generator=g, output_type="np").images
        print(json.dumps(ims.tolist()))
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    import json

    ims = np.array(json.loads(r.stdout.strip().splitlines()[-1]), dtype=np.float32)
    colors = [judge(im).labels.get("color") for im in ims]
    assert colors == ["red", "blue", "green", "yellow"]


def test_judge_after_a_round_trip_through_the_shipped_vae():
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(SHIPPED / "vae", torch_dtype=torch.float32).eval()
    scenes = render.sample_scenes(120, 21, "all")
    x = torch.from_numpy(render.render_batch(scenes))
    with torch.no_grad():
        rec = vae.decode(vae.encode(x).latent_dist.mean).sample
    acc, count = _accuracy(scenes, list(rec))
    assert count >= 0.97
    assert all(v >= 0.97 for v in acc.values()), acc


def test_shipped_transformer_world_loads_with_plain_diffusers_and_follows_shape_and_color():
    """`--model embedded-dit`: a plain PixArtAlphaPipeline folder (no shapefirst import); at its recommended
    scale it draws the prompted shape and colour (shape is what the first, shorter training got wrong)."""
    code = textwrap.dedent(f"""
        import sys, json, torch
        from diffusers import PixArtAlphaPipeline
        pipe = PixArtAlphaPipeline.from_pretrained({str(dit_model_path())!r}, torch_dtype=torch.float32)
        pipe.set_progress_bar_config(disable=True)
        assert "shapefirst" not in sys.modules
        prompts = ["a large red plain square in the center", "a large blue plain circle in the center",
                   "a large green plain triangle in the center", "a large yellow plain cross in the center"]
        g = [torch.Generator("cpu").manual_seed(i) for i in range(4)]
        ims = pipe(prompts, num_inference_steps=20, guidance_scale=3.0, generator=g, output_type="np",
                   height=64, width=64, use_resolution_binning=False, clean_caption=False).images
        print(json.dumps(ims.tolist()))
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    import json

    ims = np.array(json.loads(r.stdout.strip().splitlines()[-1]), dtype=np.float32)
    got = [(judge(im).labels.get("shape"), judge(im).labels.get("color")) for im in ims]
    assert got == [("square", "red"), ("circle", "blue"), ("triangle", "green"), ("cross", "yellow")]
