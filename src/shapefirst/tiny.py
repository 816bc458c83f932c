"""Tiny Stable-Diffusion pipelines built in code with random weights and an offline tokenizer.

For tests and for quick smoke runs: the same classes as SD 1.x/2.x (UNet2DConditionModel,
AutoencoderKL, CLIPTextModel, CLIPTokenizer), small enough to run 50 steps in a second on a CPU.
The tokenizer is the shapes world's CLIP-format BPE (shapefirst.world.vocab), written to a
folder, so nothing is downloaded. `pad_token="!"` gives the SD 2.x tokenizer convention.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch


def tiny_sd_pipeline(seed: int = 0, pad_token: str = "<|endoftext|>", prediction_type: str = "epsilon",
                     folder: str | Path | None = None, sample_size: int = 8):
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from .world.vocab import load_tokenizer, write_tokenizer

    folder = Path(folder) if folder else Path(tempfile.mkdtemp(prefix="shapefirst-tok-"))
    tok = load_tokenizer(write_tokenizer(folder / "tokenizer", pad_token=pad_token))
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=32)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 32), layers_per_block=1,
                        latent_channels=4, norm_num_groups=32, sample_size=sample_size * 2)
    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id))
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_clip_folder(folder: str | Path, seed: int = 0, image_size: int = 32) -> Path:
    """A tiny random CLIPModel + the world tokenizer saved to `folder` (a stand-in for a user's CLIP)."""
    from transformers import CLIPConfig, CLIPModel

    from .world.vocab import load_tokenizer, write_tokenizer

    folder = Path(folder)
    tok = load_tokenizer(write_tokenizer(folder))
    torch.manual_seed(seed)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, max_position_embeddings=77, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        vision_config=dict(image_size=image_size, patch_size=8, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=1, num_attention_heads=4),
        projection_dim=32)
    CLIPModel(cfg).save_pretrained(folder)
    return folder
