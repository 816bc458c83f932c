"""Tiny video pipelines of the batched-CFG families declared by name in issue #32 (item 2), built in code with random
weights and offline tokenizers, for the tests (tests/test_batched_video_families.py). One builder per pipeline:
  tiny_latte_pipeline   LattePipeline: a tiny LatteTransformer3DModel (spatial and temporal blocks, learned sigma),
                        a tiny T5 with the world's T5 tokenizer, an image AutoencoderKL that decodes frame by frame
The helpers (tiny VAE, T5) are shapefirst.tiny's. Nothing is downloaded.
"""
from __future__ import annotations

import torch

from .tiny import _tiny_t5_encoder, _tiny_vae, world_t5_tokenizer


def tiny_latte_pipeline(seed: int = 0):
    """LattePipeline (text-to-video, batched CFG, cross-attention to T5 states): a tiny LatteTransformer3DModel
    (learned sigma: 8 output channels for 4 latent channels, as Latte-1), a tiny T5 with the world's T5 tokenizer
    (Latte pads every prompt to 120 tokens), an image AutoencoderKL that the pipeline runs frame by frame, DDIM.
    Call with height=width=16, video_length=2, clean_caption=False."""
    from diffusers import DDIMScheduler, LattePipeline, LatteTransformer3DModel

    torch.manual_seed(seed)
    tok = world_t5_tokenizer(model_max_length=120)
    transformer = LatteTransformer3DModel(
        sample_size=8, num_layers=1, patch_size=2, attention_head_dim=8, num_attention_heads=2, caption_channels=32,
        in_channels=4, cross_attention_dim=16, out_channels=8, attention_bias=True, activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000, norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
        video_length=2).eval()
    sched = DDIMScheduler(beta_start=0.0001, beta_end=0.02, beta_schedule="linear", clip_sample=False)
    pipe = LattePipeline(tokenizer=tok, text_encoder=_tiny_t5_encoder(tok), vae=_tiny_vae(4, 8).eval(),
                         transformer=transformer, scheduler=sched)
    pipe.set_progress_bar_config(disable=True)
    return pipe
