"""A third recipe for the shapes world: the moving world (shapefirst.world.motion) on Wan's video architecture.

T5 tokenizer (the world's, with the motion words) -> AutoencoderKLWan (causal 3D, 8x space, 4x time; trained on
9-frame clips, the object's pixels weighted) -> latents of 9-frame clips (posterior mean and std, normalised per
channel by the VAE's latents_mean / latents_std as WanPipeline decodes them) -> WanTransformer3DModel and a small
UMT5 text encoder trained together on the flow-matching loss (x_s = (1 - s) x0 + s eps, target eps - x0, s drawn
uniformly and shifted as the sampler's flow_shift shifts it; caption dropout to "", EMA of the transformer).
The text encoder's states reach the transformer exactly as WanPipeline passes them: cut at the caption's length
and padded with zeros to `max_tokens`, which the folder's recipe.json states as the call's max_sequence_length.

Stages, checkpoints, the step budget and the output folder rules are train.py's. The result is a plain diffusers
WanPipeline folder plus `recipe.json` (with `recommended.call`: height, width, num_frames, max_sequence_length).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from . import motion
from .render import RES, Scene
from .train import ema_updater, generator_at, object_weight, rng_at, run_recipe, train_loop, write_model_folder
from .train_dit import tokenizer_at as dit_tokenizer_at

MOTION_WORDS = ("moving", "standing", "still", "left", "right", "up", "down")
# stage numbers of this recipe's randomness (train.py uses 1-7, train_dit.py 11-13)
VAE_STAGE, STATS_STAGE, LATENT_STAGE, DIT_INIT, DIT_STAGE, VAE_CLIP_STAGE, FRAME_STAGE = 21, 22, 23, 24, 25, 26, 27
VAE_REFINE_STAGE = 28


@dataclass
class VideoRecipe:
    seed: int = 0
    arch: str = "wan2.1"
    frames: int = motion.FRAMES
    vae_base: int = 16
    vae_z: int = 16
    # 4x spatial, 2x temporal: 9 frames of 64x64 -> 5 x 16 x 16 latents. At 8x spatial / 4x temporal (Wan's own
    # [1, 2, 4, 4] with [False, True, True]: 3 x 8 x 8) the VAE reconstructed no object in 600 steps (measured)
    vae_dim_mult: tuple = (1, 2, 4)
    vae_temporal: tuple = (False, True)
    vae_image_steps: int = 1000  # phase 1: single frames (the causal VAE's first frame is an image)
    vae_image_batch: int = 16
    vae_steps: int = 600  # phase 2: whole clips, from phase 1
    vae_refine_steps: int = 1500  # phase 3: whole clips, the object's pixels weighted more
    vae_refine_weight: float = 10.0
    vae_batch: int = 3
    vae_frames: int = motion.FRAMES  # training clips' length (the VAE is causal: 1 + 4k frames)
    vae_lr: float = 1e-3
    object_weight: float = 5.0
    latents: int = 20000
    t5_width: int = 128
    t5_layers: int = 3
    t5_heads: int = 4
    max_tokens: int = 24  # the longest moving-world caption is 15 T5 tokens with its </s>
    dit_steps: int = 4000
    dit_batch: int = 64
    dit_heads: int = 4
    dit_head_dim: int = 32
    dit_layers: int = 8
    dit_ffn: int = 512
    dit_lr: float = 3e-4
    flow_shift: float = 3.0
    caption_dropout: float = 0.1
    ckpt_every: int = 100
    fp16: bool = True
    extra: dict = field(default_factory=dict)

    @classmethod
    def tiny(cls, seed: int = 0) -> "VideoRecipe":
        """A few optimisation steps of every stage on tiny sizes: the smoke test."""
        return cls(seed=seed, vae_base=4, vae_z=4, vae_image_steps=2, vae_image_batch=2, vae_steps=2,
                   vae_refine_steps=2, vae_batch=2, latents=8, t5_width=16, t5_layers=1,
                   t5_heads=2, dit_steps=3, dit_batch=4, dit_heads=2, dit_head_dim=8, dit_layers=1, dit_ffn=16,
                   ckpt_every=2, fp16=False)

    def call(self) -> dict:
        """The call arguments a clip of this world needs (recipe.json's recommended.call)."""
        return {"height": RES, "width": RES, "num_frames": self.frames, "max_sequence_length": self.max_tokens}


# ----------------------------------------------------------------------------- models

def make_vae(r: VideoRecipe):
    from diffusers import AutoencoderKLWan

    return AutoencoderKLWan(base_dim=r.vae_base, z_dim=r.vae_z, dim_mult=list(r.vae_dim_mult), num_res_blocks=1,
                            temperal_downsample=list(r.vae_temporal), scale_factor_spatial=2 ** len(r.vae_temporal),
                            scale_factor_temporal=2 ** sum(r.vae_temporal))


def make_text_encoder(tok, r: VideoRecipe):
    from transformers import UMT5Config, UMT5EncoderModel

    w = r.t5_width
    return UMT5EncoderModel(UMT5Config(vocab_size=len(tok), d_model=w, d_kv=w // r.t5_heads, d_ff=4 * w,
                                       num_layers=r.t5_layers, num_heads=r.t5_heads, feed_forward_proj="gated-gelu",
                                       dropout_rate=0.0, relative_attention_num_buckets=32,
                                       relative_attention_max_distance=128, pad_token_id=tok.pad_token_id,
                                       eos_token_id=tok.eos_token_id, decoder_start_token_id=tok.pad_token_id))


def make_transformer(r: VideoRecipe):
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=r.dit_heads,
                                 attention_head_dim=r.dit_head_dim, in_channels=r.vae_z, out_channels=r.vae_z,
                                 text_dim=r.t5_width, freq_dim=256, ffn_dim=r.dit_ffn, num_layers=r.dit_layers,
                                 cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=32)


def make_scheduler(r: VideoRecipe):
    from diffusers import UniPCMultistepScheduler

    return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=r.flow_shift)


def encode_text(text, tok, caps: list[str], max_tokens: int) -> torch.Tensor:
    """The text states as WanPipeline passes them: each caption's states up to its length, then zeros."""
    enc = tok(caps, padding="max_length", max_length=max_tokens, truncation=True, add_special_tokens=True,
              return_attention_mask=True, return_tensors="pt")
    h = text(enc.input_ids, enc.attention_mask).last_hidden_state
    return h * enc.attention_mask.unsqueeze(-1).to(h.dtype)


def tokenizer_at(out: Path):
    """The recipe's tokenizer: the world's T5 tokenizer with the motion words (train_dit.tokenizer_at)."""
    return dit_tokenizer_at(out, model_max_length=512, extra_words=MOTION_WORDS)


# ----------------------------------------------------------------------------- data

def clip_batch(clips: list[motion.Clip], frames: int) -> torch.Tensor:
    """[N, 3, frames, H, W] in [-1, 1], the layout AutoencoderKLWan takes."""
    arr = np.stack([motion.render_clip(c, frames) for c in clips])
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(0, 4, 1, 2, 3) * 2.0 - 1.0))


def clips_at(seed: int, stage: int, step: int, n: int) -> list[motion.Clip]:
    return motion.sample_clips(n, int(rng_at(seed, stage, step).integers(0, 2**31)), "train")


def combo_index(clips: list[motion.Clip]) -> torch.Tensor:
    index = {c: i for i, c in enumerate(motion.all_combinations())}
    return torch.tensor([index[tuple(c.labels().values())] for c in clips])


def training_captions() -> list[str]:
    """"" (caption dropout) at 0, then caption 1 + combo * n_templates + template."""
    combos = motion.all_combinations()
    return [""] + [motion.Clip(Scene(*combos[c][:5]), combos[c][5]).caption(t) for c in range(len(combos))
                   for t in range(len(motion.TEMPLATES))]


# ----------------------------------------------------------------------------- stages

def sampling_ramp(step: int, total: int) -> float:
    """How much of the posterior's noise the decoder sees: none for the first 30% of the steps (an autoencoder: with
    the initial std of 1 against means of ~0.04 the decoder learns to ignore the latent and paints the gray
    background, measured), then rising linearly to all of it at 70%."""
    return min(1.0, max(0.0, (step / max(total, 1) - 0.3) / 0.4))


def frame_batch(seed: int, step: int, n: int) -> torch.Tensor:
    """[n, 3, 1, H, W]: one random frame of each of n training clips (phase 1's images)."""
    clips, rng = clips_at(seed, VAE_STAGE, step, n), rng_at(seed, FRAME_STAGE, step)
    x = clip_batch(clips, motion.FRAMES)
    return x[torch.arange(n), :, torch.from_numpy(rng.integers(0, motion.FRAMES, n))].unsqueeze(2).contiguous()


@dataclass
class VaePhase:
    """One phase of the VAE's training: its checkpoint name, steps, peak rate and the object pixels' weight."""

    name: str
    steps: int
    lr: float
    weight: float
    frames: bool  # single frames (batch r.vae_image_batch) or whole clips (batch r.vae_batch)


def vae_phases(r: VideoRecipe) -> list[VaePhase]:
    """Single frames (the causal VAE encodes a first frame alone, as an image: every spatial weight learns as in the
    image world); whole clips from there (the temporal down/upsampling) at a third of the rate; then the clips again
    with the object's pixels weighted r.vae_refine_weight x, as the image world's refinement (after the first two
    phases, 32 held-out clips kept shape in 10 and texture in 11, measured)."""
    return [VaePhase("vae_frames", r.vae_image_steps, r.vae_lr, r.object_weight, True),
            VaePhase("vae", r.vae_steps, r.vae_lr / 3, r.object_weight, False),
            VaePhase("vae_refine", r.vae_refine_steps, r.vae_lr / 3, r.vae_refine_weight, False)]


def train_vae(out: Path, r: VideoRecipe, prog) -> float:
    """Weighted L2 + L1 reconstruction + 1e-6 KL through vae_phases, the posterior's noise brought in by
    sampling_ramp over the frames phase and full after it. On clips from scratch (batch 3) the VAE reconstructed no
    object in 600 steps (measured). Then latents_mean / latents_std per channel from 64 fresh full-length clips."""
    torch.manual_seed(r.seed + VAE_STAGE)
    vae = make_vae(r).train()
    dt = 0.0
    for ph in vae_phases(r):
        opt = torch.optim.AdamW(vae.parameters(), lr=ph.lr, weight_decay=0.0)
        stage = VAE_STAGE if ph.frames else VAE_CLIP_STAGE if ph.name == "vae" else VAE_REFINE_STAGE

        def step_fn(step, ph=ph, stage=stage):
            x = frame_batch(r.seed, step, r.vae_image_batch) if ph.frames else \
                clip_batch(clips_at(r.seed, stage, step, r.vae_batch), r.vae_frames)
            post = vae.encode(x).latent_dist
            noise = torch.randn(post.mean.shape, generator=generator_at(r.seed, stage, step))
            z = post.mean + post.std * noise * (sampling_ramp(step, ph.steps) if ph.frames else 1.0)
            rec = vae.decode(z).sample
            w = object_weight(x, ph.weight)
            loss = (w * (rec - x).pow(2)).mean() + 0.5 * (w * (rec - x).abs()).mean() + 1e-6 * post.kl().mean()
            loss.backward()
            return loss.item()

        dt += train_loop(ph.name, ph.steps, out / "work" / f"{ph.name}.safetensors", {"m": vae}, opt, step_fn,
                         r.ckpt_every, prog)
    vae.eval()
    with torch.no_grad():
        mu = vae.encode(clip_batch(clips_at(r.seed, STATS_STAGE, 0, 64), r.frames)).latent_dist.mean
    dims = (0, 2, 3, 4)
    vae.register_to_config(latents_mean=mu.mean(dims).tolist(), latents_std=mu.std(dims).clamp_min(1e-3).tolist())
    vae.save_pretrained(out / "vae")
    return dt


def encode_latents(out: Path, r: VideoRecipe, prog) -> float:
    """r.latents training clips -> their normalised posterior means and stds (float16) and combinations."""
    import time

    from diffusers import AutoencoderKLWan

    path = out / "work" / "latents.safetensors"
    if path.exists():
        return 0.0
    t0 = time.time()
    vae = AutoencoderKLWan.from_pretrained(out / "vae").eval()
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    clips = motion.sample_clips(r.latents, r.seed + LATENT_STAGE, "train")
    means, stds = [], []
    task = prog.add_task("latents", total=r.latents)
    with torch.no_grad():
        for i in range(0, r.latents, 32):
            post = vae.encode(clip_batch(clips[i:i + 32], r.frames)).latent_dist
            means.append(((post.mean - mean) / std).half())
            stds.append((post.std / std).half())
            prog.update(task, advance=len(clips[i:i + 32]))
    save_file({"mean": torch.cat(means).contiguous(), "std": torch.cat(stds).contiguous(),
               "combo": combo_index(clips)}, str(path))
    return time.time() - t0


def flow_time(u: torch.Tensor, shift: float) -> torch.Tensor:
    """The sampler's shift of a uniform time: s = shift u / (1 + (shift - 1) u)."""
    return shift * u / (1 + (shift - 1) * u)


def train_transformer(out: Path, tok, r: VideoRecipe, prog) -> float:
    data = load_file(str(out / "work" / "latents.safetensors"))
    caps = training_captions()
    n_t = len(motion.TEMPLATES)
    torch.manual_seed(r.seed + DIT_INIT)
    text = make_text_encoder(tok, r).train()
    dit = make_transformer(r)
    with torch.no_grad():  # zero output layer (as DiT): the first prediction is 0
        dit.proj_out.weight.zero_()
        dit.proj_out.bias.zero_()
    ema = make_transformer(r)
    ema.load_state_dict(dit.state_dict())
    ema.requires_grad_(False)
    opt = torch.optim.AdamW(list(dit.parameters()) + list(text.parameters()), lr=r.dit_lr, weight_decay=0.0)

    def step_fn(step):
        g, rng, b = generator_at(r.seed, DIT_STAGE, step), rng_at(r.seed, DIT_STAGE, step), r.dit_batch
        idx = torch.from_numpy(rng.integers(0, data["mean"].shape[0], b))
        x0 = data["mean"][idx].float() + data["std"][idx].float() * torch.randn(data["mean"][idx].shape, generator=g)
        cap = 1 + data["combo"][idx] * n_t + torch.from_numpy(rng.integers(0, n_t, b))
        cap = torch.where(torch.from_numpy(rng.random(b) < r.caption_dropout), torch.zeros_like(cap), cap)
        s = flow_time(torch.rand(b, generator=g), r.flow_shift)
        noise = torch.randn(x0.shape, generator=g)
        xs = (1 - s.view(-1, 1, 1, 1, 1)) * x0 + s.view(-1, 1, 1, 1, 1) * noise
        emb = encode_text(text, tok, [caps[i] for i in cap.tolist()], r.max_tokens)
        pred = dit(xs, timestep=s * 1000, encoder_hidden_states=emb).sample
        loss = (pred - (noise - x0)).pow(2).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(dit.parameters()) + list(text.parameters()), 1.0)
        return loss.item()

    dt = train_loop("transformer", r.dit_steps, out / "work" / "transformer.safetensors",
                    {"m": dit, "ema": ema, "text": text}, opt, step_fn, r.ckpt_every, prog,
                    extra_save=ema_updater(ema, dit))
    ema.save_pretrained(out / "transformer")
    text.save_pretrained(out / "text_encoder")
    return dt


# ----------------------------------------------------------------------------- the model folder

def assemble(out: Path, dest: Path, r: VideoRecipe, timings: dict) -> Path:
    """The final WanPipeline folder (transformer and VAE in float16 when r.fp16; the text encoder float32)."""
    from diffusers import AutoencoderKLWan, WanPipeline, WanTransformer3DModel
    from transformers import AutoTokenizer, UMT5EncoderModel

    pipe = WanPipeline(tokenizer=AutoTokenizer.from_pretrained(str(out / "tokenizer")),
                       text_encoder=UMT5EncoderModel.from_pretrained(out / "text_encoder", torch_dtype=torch.float32),
                       vae=AutoencoderKLWan.from_pretrained(out / "vae", torch_dtype=torch.float32),
                       transformer=WanTransformer3DModel.from_pretrained(out / "transformer",
                                                                         torch_dtype=torch.float32),
                       scheduler=make_scheduler(r))
    if r.fp16:
        pipe.transformer.to(torch.float16)
        pipe.vae.to(torch.float16)
    return write_model_folder(dest, r, timings, lambda tmp: pipe.save_pretrained(tmp, safe_serialization=True),
                              {"architecture": "WanPipeline (WanTransformer3DModel + UMT5EncoderModel + "
                                               "AutoencoderKLWan)", "recommended": {"call": r.call()}})


def train_video(out: str | Path, recipe: VideoRecipe | None = None, dest: str | Path | None = None,
                max_steps: int | None = None, overwrite: bool = False) -> Path | None:
    """Run (or resume) the video recipe in `out`; the finished model folder is `dest` (default out/model).
    As train.train: `out` owned, max_steps pauses (checkpointed) and returns None, a rerun resumes."""
    entries = ["work", "tokenizer", "vae", "text_encoder", "transformer", "model"]
    return run_recipe(out, recipe or VideoRecipe(), dest, max_steps, overwrite, entries, _stages, assemble)


def _stages(out: Path, r: VideoRecipe, prog, done) -> None:
    tok = tokenizer_at(out)
    if not (out / "vae" / "config.json").exists():
        done("vae", train_vae(out, r, prog))
    done("latents", encode_latents(out, r, prog))
    if not (out / "transformer" / "config.json").exists():
        done("transformer", train_transformer(out, tok, r, prog))
