"""A second recipe for the shapes world: the same world on a diffusion transformer (PixArt-alpha).

T5 tokenizer (offline, shapefirst.tiny.tiny_t5_tokenizer) -> small T5 encoder, pretrained
contrastively against the FROZEN image tower of the shipped world CLIP -> the shipped VAE as it is
-> latents (train.encode_latents) -> PixArtTransformer2DModel on the 16x16x4 latents (epsilon,
min-SNR-5, caption dropout to "", EMA). Stages, checkpoints, the step budget and the output
folder rules are train.py's (its helpers are imported, not copied). The result is a plain
diffusers PixArtAlphaPipeline folder plus `clip/` (the shipped world CLIP, the CLIPScore metric
the text encoder was aligned to) and `recipe.json`.
"""
from __future__ import annotations

import json
import math
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..errors import ShapefirstError
from . import model_path, render
from .vocab import world_t5_tokenizer
from .train import (atomic_folder, batch_at, combo_ids, copy_folder, ema_updater, encode_latents, generator_at,
                    latent_batch, make_scheduler_config, min_snr_weights, rng_at, run_recipe, train_loop,
                    training_captions, write_model_folder)
from .card import write_card

# stage numbers of this recipe's randomness (train.py uses 1-7)
T5_STAGE, DIT_INIT, DIT_STAGE = 11, 12, 13


@dataclass
class DitRecipe:
    seed: int = 0
    arch: str = "pixart-alpha"
    t5_steps: int = 600
    t5_batch: int = 128
    t5_width: int = 128
    t5_layers: int = 3
    t5_heads: int = 4
    t5_lr: float = 5e-4
    max_tokens: int = 32  # the longest world caption is 12 T5 tokens with its </s>
    latents: int = 40000
    dit_steps: int = 1000
    dit_batch: int = 64
    dit_heads: int = 4
    dit_head_dim: int = 64
    dit_layers: int = 12
    dit_lr: float = 3e-4
    caption_dropout: float = 0.1
    ckpt_every: int = 100
    fp16: bool = True
    extra: dict = field(default_factory=dict)

    @classmethod
    def tiny(cls, seed: int = 0) -> "DitRecipe":
        """A few optimisation steps of every stage on tiny sizes: the smoke test."""
        return cls(seed=seed, t5_steps=3, t5_batch=8, t5_width=32, t5_layers=1, latents=64, dit_steps=4, dit_batch=4,
                   dit_heads=2, dit_head_dim=16, dit_layers=1, ckpt_every=2, fp16=False)


# ----------------------------------------------------------------------------- models

def t5_config(tok, r: DitRecipe):
    from transformers import T5Config

    w = r.t5_width
    return T5Config(vocab_size=len(tok), d_model=w, d_kv=w // r.t5_heads, d_ff=4 * w, num_layers=r.t5_layers,
                    num_heads=r.t5_heads, feed_forward_proj="gated-gelu", dropout_rate=0.0,
                    relative_attention_num_buckets=32, relative_attention_max_distance=128,
                    pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                    decoder_start_token_id=tok.pad_token_id)


def make_t5(tok, r: DitRecipe):
    from transformers import T5EncoderModel

    return T5EncoderModel(t5_config(tok, r))


def make_transformer(r: DitRecipe, caption_channels: int):
    from diffusers import PixArtTransformer2DModel

    inner = r.dit_heads * r.dit_head_dim
    return PixArtTransformer2DModel(
        sample_size=render.RES // 4, num_layers=r.dit_layers, patch_size=2, attention_head_dim=r.dit_head_dim,
        num_attention_heads=r.dit_heads, caption_channels=caption_channels, in_channels=4, out_channels=4,
        cross_attention_dim=inner, attention_bias=True, activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
        norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6, use_additional_conditions=False)


def fp16_megabytes(r: DitRecipe) -> dict:
    """float16 size (parameters x 2 bytes, in MB of 1e6 bytes) of a freshly built T5 encoder and transformer."""
    with tempfile.TemporaryDirectory(prefix="shapefirst-t5tok-") as folder:  # nothing left behind
        tok = world_t5_tokenizer(Path(folder), model_max_length=120)
    t5 = make_t5(tok, r)
    dit = make_transformer(r, t5.config.d_model)
    mb = {"text_encoder": sum(p.numel() for p in t5.parameters()) * 2 / 1e6,
          "transformer": sum(p.numel() for p in dit.parameters()) * 2 / 1e6}
    mb["total"] = mb["text_encoder"] + mb["transformer"]
    return mb


def tokenizer_at(out: Path, model_max_length: int = 120, extra_words: tuple[str, ...] = ()):
    """The recipe's T5 tokenizer in out/tokenizer (the world's, with `extra_words`), written aside then renamed on the
    first call, loaded from there."""
    from transformers import AutoTokenizer

    if not (out / "tokenizer" / "tokenizer_config.json").exists():  # written aside, then renamed
        shutil.rmtree(out / ".tokenizer.tmp", ignore_errors=True)
        world_t5_tokenizer(out / ".tokenizer.tmp", model_max_length=model_max_length, extra_words=extra_words)
        (out / ".tokenizer.tmp").replace(out / "tokenizer")
    return AutoTokenizer.from_pretrained(str(out / "tokenizer"))


def _encode(text, tok, caps: list[str], max_tokens: int):
    enc = tok(caps, padding="max_length", max_length=max_tokens, truncation=True, return_tensors="pt")
    return text(input_ids=enc.input_ids, attention_mask=enc.attention_mask).last_hidden_state, enc.attention_mask


# ----------------------------------------------------------------------------- stages

class _Head(torch.nn.Module):
    """The contrastive head of the T5 stage (not part of the pipeline): mean-pooled T5 states -> CLIP space."""

    def __init__(self, width: int, dim: int):
        super().__init__()
        self.proj = torch.nn.Linear(width, dim, bias=False)
        self.logit_scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))


def train_t5(out: Path, tok, r: DitRecipe, prog) -> float:
    """InfoNCE of mean-pooled (masked) T5 states, projected, against the frozen world CLIP's image
    embeddings of the rendered scenes. Scenes of the same labels in a batch are all positives."""
    import torch.nn.functional as F
    from transformers import CLIPModel

    clip = CLIPModel.from_pretrained(model_path() / "clip", torch_dtype=torch.float32).eval().requires_grad_(False)
    torch.manual_seed(r.seed + T5_STAGE)
    text = make_t5(tok, r)
    head = _Head(r.t5_width, clip.config.projection_dim)
    opt = torch.optim.AdamW(list(text.parameters()) + list(head.parameters()), lr=r.t5_lr, weight_decay=0.05)

    def step_fn(step):
        scenes, caps = batch_at(r.seed, T5_STAGE, step, r.t5_batch)
        with torch.no_grad():
            img = clip.get_image_features(pixel_values=torch.from_numpy(render.render_batch(scenes)))
            img = F.normalize(img if torch.is_tensor(img) else img.pooler_output, dim=-1)
        h, mask = _encode(text, tok, caps, r.max_tokens)
        m = mask.unsqueeze(-1).to(h.dtype)
        txt = F.normalize(head.proj((h * m).sum(1) / m.sum(1)), dim=-1)
        logits = head.logit_scale.clamp(max=math.log(100.0)).exp() * txt @ img.T
        ids = combo_ids(scenes)
        same = (ids[:, None] == ids[None, :]).float()
        target = same / same.sum(1, keepdim=True)
        loss = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))
        loss.backward()
        return loss.item()

    dt = train_loop("t5", r.t5_steps, out / "work" / "t5.safetensors", {"m": text, "head": head}, opt, step_fn,
               r.ckpt_every, prog)
    text.save_pretrained(out / "text_encoder")
    return dt


def train_transformer(out: Path, tok, r: DitRecipe, prog) -> float:
    from diffusers import AutoencoderKL, DDPMScheduler
    from transformers import T5EncoderModel

    text = T5EncoderModel.from_pretrained(out / "text_encoder", torch_dtype=torch.float32).eval()
    scale = AutoencoderKL.load_config(out / "vae_refined")["scaling_factor"]
    data = load_file(str(out / "work" / "latents.safetensors"))
    caps = training_captions()
    with torch.no_grad():  # the T5 encoder is frozen here: every caption's states and mask, once
        embs, masks = zip(*(_encode(text, tok, caps[i:i + 256], r.max_tokens) for i in range(0, len(caps), 256)))
        embs, masks = torch.cat(embs), torch.cat(masks)
    sched = DDPMScheduler.from_config(make_scheduler_config())
    weight = min_snr_weights(sched)

    torch.manual_seed(r.seed + DIT_INIT)
    dit = make_transformer(r, text.config.d_model)
    with torch.no_grad():  # zero output layer (as DiT): the first prediction is 0, the blocks learn from there
        dit.proj_out.weight.zero_()
        dit.proj_out.bias.zero_()
    ema = make_transformer(r, text.config.d_model)
    ema.load_state_dict(dit.state_dict())
    ema.requires_grad_(False)
    opt = torch.optim.AdamW(dit.parameters(), lr=r.dit_lr, weight_decay=0.0)
    cond = {"resolution": None, "aspect_ratio": None}

    def step_fn(step):
        g, b = generator_at(r.seed, DIT_STAGE, step), r.dit_batch
        z, cap = latent_batch(data, scale, b, r.caption_dropout, rng_at(r.seed, DIT_STAGE, step), g)
        t = torch.randint(0, 1000, (b,), generator=g)
        noise = torch.randn(z.shape, generator=g)
        zt = sched.add_noise(z, noise, t)
        pred = dit(zt, encoder_hidden_states=embs[cap], encoder_attention_mask=masks[cap], timestep=t,
                   added_cond_kwargs=cond).sample
        loss = ((pred - noise).pow(2).mean(dim=(1, 2, 3)) * weight[t]).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(dit.parameters(), 1.0)
        return loss.item()

    dt = train_loop("transformer", r.dit_steps, out / "work" / "transformer.safetensors", {"m": dit, "ema": ema}, opt,
               step_fn, r.ckpt_every, prog, extra_save=ema_updater(ema, dit))
    ema.save_pretrained(out / "transformer")
    return dt


# ----------------------------------------------------------------------------- the model folder

def assemble(out: Path, dest: Path, r: DitRecipe, timings: dict) -> Path:
    """Write the final diffusers folder (transformer and VAE weights in float16 when r.fp16; the T5
    encoder stays float32, which transformers 5 loads back as it is), atomically."""
    from diffusers import AutoencoderKL, DDIMScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel
    from transformers import AutoTokenizer, T5EncoderModel

    pipe = PixArtAlphaPipeline(
        tokenizer=AutoTokenizer.from_pretrained(str(out / "tokenizer")),
        text_encoder=T5EncoderModel.from_pretrained(out / "text_encoder", torch_dtype=torch.float32),
        vae=AutoencoderKL.from_pretrained(out / "vae_refined", torch_dtype=torch.float32),
        transformer=PixArtTransformer2DModel.from_pretrained(out / "transformer", torch_dtype=torch.float32),
        scheduler=DDIMScheduler.from_config(make_scheduler_config()))
    if r.fp16:
        pipe.transformer.to(torch.float16)
        pipe.vae.to(torch.float16)

    def fill(tmp: Path) -> None:
        pipe.save_pretrained(tmp, safe_serialization=True)
        shutil.copytree(model_path() / "clip", tmp / "clip")

    return write_model_folder(dest, r, timings, fill,
                              {"architecture": "PixArtAlphaPipeline (PixArtTransformer2DModel + T5EncoderModel)"})


def train_dit(out: str | Path, recipe: DitRecipe | None = None, dest: str | Path | None = None,
              max_steps: int | None = None, overwrite: bool = False) -> Path | None:
    """Run (or resume) the DiT recipe in `out`; the finished model folder is `dest` (default out/model).
    Ownership of `out` and `dest` as train.train; max_steps: stop (checkpointed) after this many
    optimisation steps in this invocation and return None; a rerun resumes where it stopped."""
    entries = ["work", "tokenizer", "text_encoder", "vae_refined", "transformer", "model"]
    return run_recipe(out, recipe or DitRecipe(), dest, max_steps, overwrite, entries, _stages, assemble)


def _stages(out: Path, r: DitRecipe, prog, done) -> None:
    tok = tokenizer_at(out)
    if not (out / "text_encoder" / "config.json").exists():
        done("t5", train_t5(out, tok, r, prog))
    copy_folder(model_path() / "vae", out / "vae_refined")  # the shipped VAE as it is
    done("latents", encode_latents(out, r, prog))
    if not (out / "transformer" / "config.json").exists():
        done("transformer", train_transformer(out, tok, r, prog))


# ----------------------------------------------------------------------------- the shipped copy

def ship(model: str | Path, dest: str | Path, recommended: dict) -> Path:
    """The package's copy of a trained DiT world (world/model_dit, `--model embedded-dit`), written atomically:
    the model folder without clip/ (it is the embedded UNet world's CLIP, which models.world_clip falls back
    to) and without the output marker, its T5 weights in float16 (to fit the package budget; the pipeline
    loads them back in float32), recipe.json gaining `recommended` (guidance_scale and its evidence), and the card
    (dest's earlier README.md, else the trained folder's) with a snippet that runs at that scale (world.card)."""
    from transformers import T5EncoderModel


    model, dest = Path(model), Path(dest)
    if not (model / "recipe.json").is_file() or not (model / "transformer" / "config.json").is_file():
        raise ShapefirstError(f"{model} is not a model folder of `shapefirst train --arch dit`",
                              "pass the model/ folder that training wrote")

    def fill(tmp: Path) -> None:
        shutil.copytree(model, tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns("clip", ".shapefirst.json"))
        t5 = T5EncoderModel.from_pretrained(model / "text_encoder", torch_dtype=torch.float32)
        shutil.rmtree(tmp / "text_encoder")
        t5.to(torch.float16).save_pretrained(tmp / "text_encoder", safe_serialization=True)
        rec = json.loads((model / "recipe.json").read_text())
        (tmp / "recipe.json").write_text(json.dumps({**rec, "recommended": recommended}, indent=2))
        keep = dest / "README.md" if (dest / "README.md").is_file() else model / "README.md"
        write_card(tmp, recommended.get("guidance_scale"), keep=keep,
                   title="The shapes world on a diffusion transformer")
    return atomic_folder(dest, fill)
