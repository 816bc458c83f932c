"""The recipe that trains the embedded shapes-world model, stage by stage, resumable.

world data -> tokenizer -> CLIP (contrastive, text + image tower) -> VAE (2 phases) -> latents -> UNet.
Every stage checkpoints to `<out>/work/<stage>.safetensors` (weights, optimizer moments, step)
and a finished stage writes its output and is skipped on a rerun. All randomness is derived
from (seed, stage, step), so an interrupted run resumed from its checkpoint continues the same
sequence. The result is a plain diffusers StableDiffusionPipeline folder plus `clip/` (the
full CLIPModel, the world's CLIPScore metric).
"""
from __future__ import annotations

import json
import math
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..errors import ShapefirstError
from ..outputs import OutputFolder
from . import render
from .vocab import load_tokenizer, write_tokenizer
from .card import write_card


@dataclass
class Recipe:
    seed: int = 0
    clip_steps: int = 600
    clip_batch: int = 128
    clip_width: int = 128
    clip_layers: int = 3
    vae_steps: int = 1000
    vae_batch: int = 16
    vae_channels: tuple = (32, 64, 64)
    vae_refine_steps: int = 1500
    vae_refine_lr: float = 3e-4
    latents: int = 40000
    unet_steps: int = 1000
    unet_batch: int = 64
    unet_channels: tuple = (64, 128, 128)
    unet_lr: float = 4e-4
    caption_dropout: float = 0.1
    ckpt_every: int = 100
    fp16: bool = True
    # a finished model folder to continue from: its tokenizer, CLIP, text encoder and VAE are taken as
    # they are and the UNet training starts from its UNet (fresh latents and batches from this seed)
    base: str = ""
    extra: dict = field(default_factory=dict)

    @classmethod
    def tiny(cls, seed: int = 0) -> "Recipe":
        """A few optimisation steps of every stage on tiny sizes: the smoke test."""
        return cls(seed=seed, clip_steps=3, clip_batch=8, clip_width=32, clip_layers=1,
                   vae_steps=3, vae_batch=4, vae_refine_steps=2,
                   vae_channels=(32, 32, 32), latents=64, unet_steps=4, unet_batch=4, unet_channels=(32, 32, 32),
                   ckpt_every=2, fp16=False)


# ----------------------------------------------------------------------------- helpers

def _progress():
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), transient=False)


def _save_ckpt(path: Path, step: int, modules: dict, opt: torch.optim.Optimizer):
    tensors = {}
    for name, mod in modules.items():
        for k, v in mod.state_dict().items():
            tensors[f"{name}.{k}"] = v.detach().contiguous().clone()
    for i, group in enumerate(opt.param_groups):
        for j, p in enumerate(group["params"]):
            st = opt.state.get(p, {})
            for k in ("exp_avg", "exp_avg_sq", "step"):
                if k in st:
                    tensors[f"opt.{i}.{j}.{k}"] = (torch.as_tensor(st[k]).detach().clone().reshape(-1) if k == "step"
                                                   else st[k].detach().clone())
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"step": str(step)})
    tmp.replace(path)


def _load_ckpt(path: Path, modules: dict, opt: torch.optim.Optimizer) -> int:
    from safetensors import safe_open

    tensors = load_file(str(path))
    with safe_open(str(path), "pt") as f:
        step = int(f.metadata()["step"])
    for name, mod in modules.items():
        pre = name + "."
        mod.load_state_dict({k[len(pre):]: v for k, v in tensors.items() if k.startswith(pre)})
    for i, group in enumerate(opt.param_groups):
        for j, p in enumerate(group["params"]):
            st = {}
            for k in ("exp_avg", "exp_avg_sq", "step"):
                key = f"opt.{i}.{j}.{k}"
                if key in tensors:
                    st[k] = tensors[key].reshape(()) if k == "step" else tensors[key]
            if st:
                opt.state[p] = st
    return step


def _lr_lambda(total: int, warmup: int):
    def f(step):
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))
    return f


class TrainingPaused(Exception):
    """Raised when the step budget of this invocation is spent; rerun to resume."""


class _Budget:
    def __init__(self, steps: int | None):
        self.left = steps

    def take(self):
        if self.left is not None:
            if self.left <= 0:
                raise TrainingPaused()
            self.left -= 1


_budget = _Budget(None)


def train_loop(name: str, total: int, ckpt: Path, modules: dict, opt, step_fn, every: int, prog, extra_save=None):
    """Run step_fn(step) from the checkpoint's step to total, saving every `every` steps.

    A paused run (step budget spent) checkpoints before stopping, so no finished step is lost."""
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(total, max(1, total // 20)))
    start = _load_ckpt(ckpt, modules, opt) if ckpt.exists() else 0
    with warnings.catch_warnings():  # fast-forwarding a resumed schedule: no optimizer step is due here
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
        for _ in range(start):
            sched.step()
    task = prog.add_task(name, total=total, completed=start)
    t0 = time.time()
    loss_ema = None
    for step in range(start, total):
        try:
            _budget.take()
        except TrainingPaused:
            _save_ckpt(ckpt, step, modules, opt)
            raise
        loss = step_fn(step)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        if extra_save is not None:
            extra_save(step)
        loss_ema = loss if loss_ema is None else 0.98 * loss_ema + 0.02 * loss
        prog.update(task, advance=1, description=f"{name} loss {loss_ema:.4f}")
        if (step + 1) % every == 0 or step + 1 == total:
            _save_ckpt(ckpt, step + 1, modules, opt)
    return time.time() - t0


def rng_at(seed: int, stage: int, step: int) -> np.random.Generator:
    return np.random.default_rng([seed, stage, step])


def generator_at(seed: int, stage: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(rng_at(seed, stage, step).integers(0, 2**62)))


def batch_at(seed: int, stage: int, step: int, n: int):
    rng = rng_at(seed, stage, step)
    scenes = render.sample_scenes(n, int(rng.integers(0, 2**31)), "train")
    caps = render.sample_captions(scenes, int(rng.integers(0, 2**31)))
    return scenes, caps


def combo_ids(scenes) -> torch.Tensor:
    """Per scene: the index of its attribute combination in render.all_combinations()."""
    index = {c: i for i, c in enumerate(render.all_combinations())}
    return torch.tensor([index[(s.shape, s.color, s.position, s.size, s.texture)] for s in scenes])


def training_captions() -> list[str]:
    """Every caption a training combination can have, after the empty prompt (caption dropout) at 0:
    caption 1 + combo * n_templates + template (latent_batch's indices)."""
    combos = render.all_combinations()
    return [""] + [render.Scene(*combos[c]).caption(t) for c in range(len(combos))
                   for t in range(len(render.TEMPLATES))]


def min_snr_weights(sched, gamma: float = 5.0) -> torch.Tensor:
    """Per training timestep: the min-SNR-gamma loss weight for epsilon prediction, min(SNR, gamma) / SNR."""
    snr = sched.alphas_cumprod / (1 - sched.alphas_cumprod)
    return torch.clamp(snr, max=gamma) / snr


def latent_batch(data: dict, scale: float, n: int, caption_dropout: float, rng: np.random.Generator,
                 g: torch.Generator):
    """n training latents (sampled from the cached posteriors, scaled) and their caption indices
    into training_captions(), a share caption_dropout of them the empty caption."""
    side = render.RES // 4
    idx = torch.from_numpy(rng.integers(0, data["mean"].shape[0], n))
    z = (data["mean"][idx].float() + data["std"][idx].float() * torch.randn(n, 4, side, side, generator=g)) * scale
    n_t = len(render.TEMPLATES)
    cap = 1 + data["combo"][idx] * n_t + torch.from_numpy(rng.integers(0, n_t, n))
    return z, torch.where(torch.from_numpy(rng.random(n) < caption_dropout), torch.zeros_like(cap), cap)


def ema_updater(ema: torch.nn.Module, model: torch.nn.Module):
    """extra_save for _loop: the EMA of the weights, decay min(0.999, (1 + step) / (10 + step))."""
    def update(step):
        d = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), model.parameters()):
                pe.mul_(d).add_(p.detach(), alpha=1 - d)
    return update


def copy_folder(src: Path, dst: Path) -> None:
    """Copy a folder (if dst is not there yet) aside, then rename: an interrupted copy is redone."""
    import shutil

    if dst.exists():
        return
    tmp = dst.parent / f".{dst.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    tmp.replace(dst)


def write_model_folder(dest: Path, r, timings: dict, fill, extra: dict | None = None) -> Path:
    """Write a finished model folder atomically: fill(tmp) writes the pipeline, then recipe.json, the card
    (README.md: dest's earlier card, if any, with a usage snippet that runs in plain diffusers; world.card)
    and the marker; the folder replaces `dest` (an earlier model of this command: check_dest) only when complete."""

    def write(tmp: Path) -> None:
        fill(tmp)
        rec = {"recipe": asdict(r), "seconds_per_stage": timings, **(extra or {})}
        (tmp / "recipe.json").write_text(json.dumps(rec, indent=2))
        write_card(tmp, keep=dest / "README.md")
        OutputFolder(tmp, "train-model", asdict(r)).claim(p.name for p in tmp.iterdir())
    return atomic_folder(dest, write)


def atomic_folder(dest: Path, fill) -> Path:
    """fill(tmp) writes a new folder beside `dest`, which it replaces only when complete (a failed fill
    leaves `dest` as it was and removes tmp)."""
    import shutil
    import tempfile

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    try:
        fill(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if dest.exists():
        shutil.rmtree(dest)
    tmp.replace(dest)
    return dest


# ----------------------------------------------------------------------------- stages

def clip_config(tok, r: Recipe):
    from transformers import CLIPConfig

    w = r.clip_width
    return CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=w, intermediate_size=4 * w, num_hidden_layers=r.clip_layers,
                         num_attention_heads=4, max_position_embeddings=77, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        vision_config=dict(image_size=render.RES, patch_size=8, hidden_size=w, intermediate_size=4 * w,
                           num_hidden_layers=r.clip_layers, num_attention_heads=4),
        projection_dim=w)


def train_clip(out: Path, tok, r: Recipe, prog) -> float:
    from transformers import CLIPModel

    torch.manual_seed(r.seed)
    model = CLIPModel(clip_config(tok, r))
    opt = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.05)

    def step_fn(step):
        scenes, caps = batch_at(r.seed, 1, step, r.clip_batch)
        # padded to the batch's longest caption, not 77: the text tower is causal and CLIP pools at the first
        # EOS, so positions after it cannot change the loss (same gradients, ~5x less compute)
        ids = tok(caps, padding="longest", max_length=77, truncation=True, return_tensors="pt").input_ids
        px = torch.from_numpy(render.render_batch(scenes))
        loss = model(input_ids=ids, pixel_values=px, return_loss=True).loss
        loss.backward()
        return loss.item()

    dt = train_loop("clip", r.clip_steps, out / "work" / "clip.safetensors", {"m": model},
                    opt, step_fn, r.ckpt_every, prog)
    model.save_pretrained(out / "clip")
    return dt


def make_vae(r: Recipe):
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
                         up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=tuple(r.vae_channels),
                         layers_per_block=1, latent_channels=4, norm_num_groups=32, sample_size=render.RES)


def object_weight(x: torch.Tensor, weight: float) -> torch.Tensor:
    """1 on the gray background, `weight` on the object (where the render has chroma)."""
    chroma = x.amax(1, keepdim=True) - x.amin(1, keepdim=True)
    return 1.0 + (weight - 1.0) * (chroma > 0.02).float()


def train_vae(out: Path, r: Recipe, prog, refine: bool = False) -> float:
    """Phase 1 (refine=False): from scratch, lr 1e-3, plain L2 + L1. Phase 2 (refine=True): from
    phase 1, lr r.vae_refine_lr, the loss weighted 10x on the object's pixels (the background is
    most of the image but trivial; the object's 2-px texture is what the VAE must keep)."""
    from diffusers import AutoencoderKL

    stage = 7 if refine else 2
    torch.manual_seed(r.seed + 1)
    vae = AutoencoderKL.from_pretrained(out / "vae") if refine else make_vae(r)
    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=r.vae_refine_lr if refine else 1e-3, weight_decay=0.0)

    def step_fn(step):
        scenes, _ = batch_at(r.seed, stage, step, r.vae_batch)
        x = torch.from_numpy(render.render_batch(scenes))
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=generator_at(r.seed, stage, step))
        rec = vae.decode(z).sample
        w = object_weight(x, 10.0) if refine else 1.0
        loss = (w * (rec - x).pow(2)).mean() + 0.5 * (w * (rec - x).abs()).mean() + 1e-6 * post.kl().mean()
        loss.backward()
        return loss.item()

    name = "vae_refine" if refine else "vae"
    steps = r.vae_refine_steps if refine else r.vae_steps
    dt = train_loop(name, steps, out / "work" / f"{name}.safetensors", {"m": vae}, opt, step_fn, r.ckpt_every, prog)
    vae.eval()
    # scaling factor: 1 / std of sampled latents on fresh renders, as SD does
    with torch.no_grad():
        scenes, _ = batch_at(r.seed, 3, 0, 256)
        post = vae.encode(torch.from_numpy(render.render_batch(scenes))).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=generator_at(r.seed, 3, 0))
        vae.register_to_config(scaling_factor=float(1.0 / z.std()))
    vae.save_pretrained(out / ("vae_refined" if refine else "vae"))
    return dt


def encode_latents(out: Path, r: Recipe, prog) -> float:
    from diffusers import AutoencoderKL

    path = out / "work" / "latents.safetensors"
    if path.exists():
        return 0.0
    t0 = time.time()
    vae = AutoencoderKL.from_pretrained(out / "vae_refined").eval()
    scenes = render.sample_scenes(r.latents, r.seed + 4, "train")
    combo_idx = combo_ids(scenes)
    means, stds = [], []
    task = prog.add_task("latents", total=r.latents)
    with torch.no_grad():
        for i in range(0, r.latents, 256):
            post = vae.encode(torch.from_numpy(render.render_batch(scenes[i:i + 256]))).latent_dist
            means.append(post.mean.half())
            stds.append(post.std.half())
            prog.update(task, advance=len(scenes[i:i + 256]))
    save_file({"mean": torch.cat(means).contiguous(), "std": torch.cat(stds).contiguous(),
               "combo": combo_idx}, str(path))
    return time.time() - t0


def make_unet(r: Recipe, cross_dim: int):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(sample_size=render.RES // 4, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=tuple(r.unet_channels),
                                down_block_types=("CrossAttnDownBlock2D",) * 3,
                                up_block_types=("CrossAttnUpBlock2D",) * 3,
                                cross_attention_dim=cross_dim, attention_head_dim=4, norm_num_groups=32)


def make_scheduler_config() -> dict:
    return dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                prediction_type="epsilon", clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def train_unet(out: Path, tok, r: Recipe, prog) -> float:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    text = CLIPTextModel.from_pretrained(out / "text_encoder").eval()
    scale = AutoencoderKL.load_config(out / "vae_refined")["scaling_factor"]
    data = load_file(str(out / "work" / "latents.safetensors"))
    caps = training_captions()
    with torch.no_grad():
        embs = []
        for i in range(0, len(caps), 256):
            ids = tok(caps[i:i + 256],
                      padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
            embs.append(text(ids).last_hidden_state)
        embs = torch.cat(embs)
    sched = DDPMScheduler.from_config(make_scheduler_config())
    weight = min_snr_weights(sched)

    torch.manual_seed(r.seed + 5)
    unet = make_unet(r, text.config.hidden_size)
    if r.base:  # float16 shipped weights, trained on in float32
        unet.load_state_dict(UNet2DConditionModel.from_pretrained(Path(r.base) / "unet").float().state_dict())
    ema = make_unet(r, text.config.hidden_size)
    ema.load_state_dict(unet.state_dict())
    ema.requires_grad_(False)
    opt = torch.optim.AdamW(unet.parameters(), lr=r.unet_lr, weight_decay=0.01)

    def step_fn(step):
        g = generator_at(r.seed, 6, step)
        z, cap = latent_batch(data, scale, r.unet_batch, r.caption_dropout, rng_at(r.seed, 6, step), g)
        t = torch.randint(0, 1000, (r.unet_batch,), generator=g)
        noise = torch.randn(z.shape, generator=g)
        zt = sched.add_noise(z, noise, t)
        pred = unet(zt, t, embs[cap]).sample
        loss = ((pred - noise).pow(2).mean(dim=(1, 2, 3)) * weight[t]).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        return loss.item()

    dt = train_loop("unet", r.unet_steps, out / "work" / "unet.safetensors", {"m": unet, "ema": ema}, opt, step_fn,
               r.ckpt_every, prog, extra_save=ema_updater(ema, unet))
    ema.save_pretrained(out / "unet")
    return dt


def finish_clip_folder(clip, tok, folder: Path) -> None:
    """The full CLIPModel with its tokenizer and image preprocessing ([-1, 1] pixels at 64 px), so
    `CLIPModel/CLIPProcessor.from_pretrained(folder)` works alone: the world's CLIPScore metric."""
    from transformers import CLIPImageProcessor

    clip.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": render.RES}, crop_size={"height": render.RES, "width": render.RES},
                       image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5]).save_pretrained(folder)


def base_record(r: Recipe) -> dict:
    """For a continued model, recipe.json's record of the model it continued from (so the whole training
    history stays with the weights); {} otherwise."""
    if not r.base:
        return {}
    base = json.loads((Path(r.base) / "recipe.json").read_text()) if (Path(r.base) / "recipe.json").exists() else {}
    base.pop("recommended", None)  # measured on the base model, not on this one
    return {"base": base}


def assemble(out: Path, dest: Path, r: Recipe, timings: dict) -> Path:
    """Write the final diffusers folder (UNet and VAE weights in float16 when r.fp16)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPModel, CLIPTextModel

    tok = load_tokenizer(out / "tokenizer")
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(out / "vae_refined"),
        text_encoder=CLIPTextModel.from_pretrained(out / "text_encoder"),
        tokenizer=tok, unet=UNet2DConditionModel.from_pretrained(out / "unet"),
        scheduler=DDIMScheduler.from_config(make_scheduler_config()), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    clip = CLIPModel.from_pretrained(out / "clip")
    if r.fp16:  # diffusers loads these back as float32 by default; transformers 5 would keep a float16
        pipe.unet.to(torch.float16)  # text encoder as float16 ("auto" dtype), so the text models stay float32
        pipe.vae.to(torch.float16)

    def fill(tmp: Path) -> None:
        pipe.save_pretrained(tmp, safe_serialization=True)
        finish_clip_folder(clip, tok, tmp / "clip")

    return write_model_folder(dest, r, timings, fill, base_record(r))


def check_dest(dest: Path, out: Path, overwrite: bool) -> None:
    """The finished model goes to a new or empty folder, or replaces one an earlier `train` wrote
    (with overwrite, or when it lies inside the work folder, whose recipe was already checked)."""
    inside = out.resolve() in dest.resolve().parents
    owner = OutputFolder(dest, "train-model", None, overwrite=overwrite or inside, reuse=False)
    owner.check(dry=True)
    if dest.resolve() == out.resolve() or dest.resolve() in out.resolve().parents:
        raise ShapefirstError(f"--dest {dest} would hold the work folder {out}", "pass a --dest outside --out")


def train(out: str | Path, recipe: Recipe | None = None, dest: str | Path | None = None,
          max_steps: int | None = None, overwrite: bool = False) -> Path | None:
    """Run (or resume) the whole recipe in `out`; the finished model folder is `dest` (default out/model).
    `out` is owned (shapefirst.outputs): a folder of other files, or of another recipe, is refused
    (overwrite=True restarts an own folder with another recipe); `dest` must be new, empty, or an
    earlier model of this command (replaced only with overwrite, unless it lies inside `out`).

    max_steps: stop (checkpointed) after this many optimisation steps in this invocation, for
    time-boxed sessions; returns None then, and a rerun resumes where it stopped."""
    r = recipe or Recipe()
    if r.base:
        check_base(r)
    entries = ["work", "tokenizer", "clip", "text_encoder", "vae", "vae_refined", "latents", "unet", "model"]
    return run_recipe(out, r, dest, max_steps, overwrite, entries, _stages, assemble)


def run_recipe(out, r, dest, max_steps: int | None, overwrite: bool, entries: list[str], stages, assemble_fn):
    """The frame of every recipe: own `out` (and check `dest`), run stages(out, r, prog, done) under the
    step budget, then assemble_fn(out, dest, r, timings); None when the budget pauses the run."""
    global _budget
    _budget = _Budget(max_steps)
    out = Path(out)
    dest = Path(dest) if dest else out / "model"
    owner = OutputFolder(out, "train", asdict(r), overwrite=overwrite).check()
    check_dest(dest, out, overwrite)
    (out / "work").mkdir(parents=True, exist_ok=True)
    owner.claim(entries)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    times_path = out / "work" / "times.json"
    timings = json.loads(times_path.read_text()) if times_path.exists() else {}

    def done(stage, seconds):
        timings[stage] = timings.get(stage, 0.0) + seconds
        times_path.write_text(json.dumps(timings, indent=2))

    try:
        with _progress() as prog:
            stages(out, r, prog, done)
    except TrainingPaused:
        return None
    return assemble_fn(out, dest, r, timings)


def check_base(r: Recipe) -> None:
    """Before any work: r.base is a finished shapes-world model whose UNet has the recipe's sizes."""
    base = Path(r.base)
    if not (base / "unet" / "config.json").exists() or not (base / "clip" / "config.json").exists():
        raise ShapefirstError(f"--base {base} is not a shapes-world model folder (no unet/ or clip/ in it)",
                              "pass a folder `shapefirst train` wrote, or `embedded` for the shipped model")
    widths = tuple(json.loads((base / "unet" / "config.json").read_text()).get("block_out_channels", ()))
    if widths != tuple(r.unet_channels):
        raise ShapefirstError(f"--base {base} has a UNet of widths {widths}, "
                              f"this recipe trains {tuple(r.unet_channels)}",
                              "continue a model with the recipe it was made with (drop --tiny)")


def take_base(out: Path, base: Path) -> None:
    """Continue from a finished model: its tokenizer, CLIP, text encoder and (refined) VAE become this
    run's finished stages, so only the latents and the UNet are made anew."""
    for src, dst in (("tokenizer", "tokenizer"), ("clip", "clip"), ("text_encoder", "text_encoder"),
                     ("vae", "vae_refined")):
        copy_folder(base / src, out / dst)


def _stages(out: Path, r: Recipe, prog, done) -> None:
    if r.base:
        take_base(out, Path(r.base))
    else:
        _early_stages(out, r, prog, done)
    tok = load_tokenizer(out / "tokenizer")
    done("latents", encode_latents(out, r, prog))
    if not (out / "unet" / "config.json").exists():
        done("unet", train_unet(out, tok, r, prog))


def _early_stages(out: Path, r: Recipe, prog, done) -> None:
    write_tokenizer(out / "tokenizer")
    tok = load_tokenizer(out / "tokenizer")
    if not (out / "clip" / "config.json").exists():
        done("clip", train_clip(out, tok, r, prog))
    if not (out / "text_encoder" / "config.json").exists():
        from transformers import CLIPModel

        CLIPModel.from_pretrained(out / "clip").text_model.save_pretrained(out / "text_encoder")
    if not (out / "vae" / "config.json").exists():
        done("vae", train_vae(out, r, prog))
    if not (out / "vae_refined" / "config.json").exists():
        done("vae_refine", train_vae(out, r, prog, refine=True))
