"""Tiny video pipelines of the batched-CFG families of issue #32 (item 2), built in code with random weights and
offline tokenizers, for the tests (tests/test_batched_video_families.py). One builder per pipeline:
  tiny_latte_pipeline        LattePipeline: a tiny LatteTransformer3DModel (spatial and temporal blocks, learned
                             sigma), a tiny T5 with the world's T5 tokenizer, an image AutoencoderKL run frame by frame
  tiny_ltx_pipeline          LTXPipeline: a tiny LTXVideoTransformer3DModel on packed tokens, a tiny T5, a tiny
                             AutoencoderKLLTXVideo (timestep-conditioned decoder, non-trivial latents_mean/std)
  tiny_mochi_pipeline        MochiPipeline: a tiny MochiTransformer3DModel (joint attention), a tiny T5, a tiny
                             AutoencoderKLMochi, FlowMatchEulerDiscreteScheduler with inverted sigmas as Mochi 1 ships
  tiny_allegro_pipeline      AllegroPipeline: a tiny AllegroTransformer3DModel, a tiny T5, a tiny AutoencoderKLAllegro
                             (tiled decoding only: one tile of 24 frames at 144x144 pixels), Euler ancestral
  tiny_animatediff_pipeline  AnimateDiffPipeline (not served: the tests show why): shapefirst.tiny's SD components
                             with a tiny MotionAdapter (the pipeline makes its UNetMotionModel from them), DDIM
  tiny_easyanimate_pipeline  EasyAnimatePipeline: a tiny EasyAnimateTransformer3DModel, a tiny
                             Qwen2VLForConditionalGeneration with shapefirst.tiny's Qwen2 BPE and a text-only chat
                             template, a tiny AutoencoderKLMagvit
The helpers (tiny VAE, T5, Qwen2 BPE, SD components) are shapefirst.tiny's. Nothing is downloaded.
"""
from __future__ import annotations

import torch

from .tiny import (_tiny_t5_encoder, _tiny_vae, qwen_vl_text_config, tiny_qwen2_tokenizer, tiny_sd_pipeline,
                   world_t5_tokenizer)


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


def tiny_ltx_pipeline(seed: int = 0):
    """LTXPipeline (text-to-video, batched CFG, cross-attention to T5 states, flow matching): a tiny
    LTXVideoTransformer3DModel (patch size 1: one token per latent voxel, [tokens, 8] per video), a tiny T5 with the
    world's T5 tokenizer, a tiny AutoencoderKLLTXVideo (8 latent channels, 4x spatial and temporal compression, a
    timestep-conditioned decoder as LTX-Video 0.9.1 and later ship; its latents_mean/std buffers set to random
    values so that denormalising matters), FlowMatchEulerDiscreteScheduler with LTX-Video's dynamic shifting and
    shift_terminal. Call with height=width=32 (LTX takes multiples of 32), num_frames=9 (3 latent frames of 8x8),
    max_sequence_length=16."""
    from diffusers import (AutoencoderKLLTXVideo, FlowMatchEulerDiscreteScheduler, LTXPipeline,
                           LTXVideoTransformer3DModel)

    torch.manual_seed(seed)
    tok = world_t5_tokenizer(model_max_length=32)
    transformer = LTXVideoTransformer3DModel(in_channels=8, out_channels=8, patch_size=1, patch_size_t=1,
                                             num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16,
                                             num_layers=1, caption_channels=32).eval()
    vae = AutoencoderKLLTXVideo(latent_channels=8, block_out_channels=(8, 8, 8, 8),
                                decoder_block_out_channels=(8, 8, 8, 8), layers_per_block=(1, 1, 1, 1, 1),
                                decoder_layers_per_block=(1, 1, 1, 1, 1),
                                spatio_temporal_scaling=(True, True, False, False),
                                decoder_spatio_temporal_scaling=(True, True, False, False), patch_size=1,
                                patch_size_t=1, timestep_conditioning=True, scaling_factor=1.0).eval()
    with torch.no_grad():
        vae.latents_mean.copy_(0.1 * torch.randn(8))
        vae.latents_std.copy_(0.5 + torch.rand(8))
    sched = FlowMatchEulerDiscreteScheduler(base_image_seq_len=1024, base_shift=0.95, max_image_seq_len=4096,
                                            max_shift=2.05, shift_terminal=0.1, use_dynamic_shifting=True)
    pipe = LTXPipeline(tokenizer=tok, text_encoder=_tiny_t5_encoder(tok), vae=vae, transformer=transformer,
                       scheduler=sched)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_mochi_pipeline(seed: int = 0):
    """MochiPipeline (text-to-video, batched CFG, joint attention over video and T5 tokens, flow matching): a tiny
    MochiTransformer3DModel, a tiny T5 with the world's T5 tokenizer, a tiny AutoencoderKLMochi (12 latent channels,
    8x spatial and 6x temporal compression; its latents_mean/latents_std config set to random values so that
    denormalising matters), FlowMatchEulerDiscreteScheduler(invert_sigmas=True) as mochi-1-preview ships it (the
    transformer gets 1000 (1 - noise level) and the scheduler steps toward sigma 1). Call with height=width=16,
    num_frames=7 (2 latent frames of 2x2), max_sequence_length=16."""
    from diffusers import AutoencoderKLMochi, FlowMatchEulerDiscreteScheduler, MochiPipeline, MochiTransformer3DModel

    torch.manual_seed(seed)
    tok = world_t5_tokenizer(model_max_length=32)
    transformer = MochiTransformer3DModel(patch_size=2, num_attention_heads=2, attention_head_dim=8, num_layers=1,
                                          pooled_projection_dim=16, in_channels=12, out_channels=None,
                                          qk_norm="rms_norm", text_embed_dim=32, time_embed_dim=4,
                                          activation_fn="swiglu", max_sequence_length=16).eval()
    mean, std = (0.1 * torch.randn(12)).tolist(), (0.5 + torch.rand(12)).tolist()
    vae = AutoencoderKLMochi(latent_channels=12, out_channels=3, encoder_block_out_channels=(32, 32, 32, 32),
                             decoder_block_out_channels=(32, 32, 32, 32), layers_per_block=(1, 1, 1, 1, 1),
                             latents_mean=mean, latents_std=std).eval()
    pipe = MochiPipeline(tokenizer=tok, text_encoder=_tiny_t5_encoder(tok), vae=vae, transformer=transformer,
                         scheduler=FlowMatchEulerDiscreteScheduler(invert_sigmas=True))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_allegro_pipeline(seed: int = 0, sample_size: int = 144):
    """AllegroPipeline (text-to-video, batched CFG, cross-attention to T5 states): a tiny AllegroTransformer3DModel,
    a tiny T5 with the world's T5 tokenizer, a tiny AutoencoderKLAllegro (4 latent channels, 8x spatial and 4x
    temporal compression) with tiling and slicing enabled, as diffusers' Allegro needs (it decodes only in tiles of
    24 frames and sample_size pixels, with fixed overlaps of 8 frames and 120 x 80 pixels, so sample_size 128 is the
    least that leaves a stride; and one video at a time), EulerAncestralDiscreteScheduler (ancestral noise from each
    video's generator). Call with height=width=sample_size, num_frames=24 (6 latent frames of sample_size / 8
    squared: exactly one tile), max_sequence_length=16. The default 144 makes the transformer's rotary tables 6 and
    9 positions long (patch size 2), a length no CFG batch of 1 to 4 videos has (128 makes them 8 long: the rows of 4
    videos; see tests/test_batched_video_families.py)."""
    from diffusers import (AllegroPipeline, AllegroTransformer3DModel, AutoencoderKLAllegro,
                           EulerAncestralDiscreteScheduler)

    torch.manual_seed(seed)
    tok = world_t5_tokenizer(model_max_length=32)
    side = sample_size // 8
    transformer = AllegroTransformer3DModel(num_attention_heads=2, attention_head_dim=12, in_channels=4,
                                            out_channels=4, num_layers=1, cross_attention_dim=24, sample_width=side,
                                            sample_height=side, sample_frames=6, caption_channels=32).eval()
    vae = AutoencoderKLAllegro(block_out_channels=(4, 4, 4, 4), latent_channels=4, layers_per_block=1,
                               norm_num_groups=2, temporal_compression_ratio=4, sample_size=sample_size).eval()
    vae.enable_tiling()  # its only decoding path
    vae.enable_slicing()  # its tiled decoding takes one video at a time
    sched = EulerAncestralDiscreteScheduler(beta_start=0.0001, beta_end=0.02, beta_schedule="linear")
    pipe = AllegroPipeline(tokenizer=tok, text_encoder=_tiny_t5_encoder(tok), vae=vae, transformer=transformer,
                           scheduler=sched)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_animatediff_pipeline(seed: int = 0):
    """AnimateDiffPipeline (text-to-video, batched CFG, an SD UNet with motion modules): shapefirst.tiny's SD 1.x
    components (CLIP text encoder with the world's tokenizer, UNet2DConditionModel, AutoencoderKL) and a tiny
    MotionAdapter (one temporal transformer per UNet layer, 2 heads); the pipeline makes its UNetMotionModel from the
    UNet and the adapter (UNetMotionModel.from_unet2d); an image VAE that it runs frame by frame; DDIM as AnimateDiff
    is commonly run (linear betas, steps_offset 1). Call with height=width=16, num_frames=3."""
    from diffusers import AnimateDiffPipeline, DDIMScheduler, MotionAdapter

    sd = tiny_sd_pipeline(seed=seed)
    torch.manual_seed(seed)
    adapter = MotionAdapter(block_out_channels=(32, 32), motion_layers_per_block=1, motion_norm_num_groups=2,
                            motion_num_attention_heads=2, motion_max_seq_length=8)
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="linear", clip_sample=False,
                          steps_offset=1)
    pipe = AnimateDiffPipeline(vae=sd.vae, text_encoder=sd.text_encoder, tokenizer=sd.tokenizer, unet=sd.unet,
                               motion_adapter=adapter, scheduler=sched)
    pipe.set_progress_bar_config(disable=True)
    return pipe


QWEN2VL_TEXT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% for c in m['content'] %}"
                         "{{ c['text'] }}{% endfor %}<|im_end|>\n{% endfor %}"
                         "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
"""Qwen2-VL's chat template for text-only messages (its system line, image and video parts left out):
"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n", what EasyAnimatePipeline encodes."""


def tiny_easyanimate_pipeline(seed: int = 0):
    """EasyAnimatePipeline (EasyAnimate V5.1 text-to-video, batched CFG, joint attention over video and text tokens,
    flow matching): a tiny EasyAnimateTransformer3DModel, a tiny Qwen2VLForConditionalGeneration (random weights;
    the pipeline takes its second-to-last hidden states) with shapefirst.tiny's Qwen2 BPE and QWEN2VL_TEXT_TEMPLATE,
    a tiny AutoencoderKLMagvit (8x spatial, 4x temporal compression), FlowMatchEulerDiscreteScheduler. Call with
    height=width=16, num_frames=5 (2 latent frames of 2x2); its prompts are padded to 256 tokens."""
    from diffusers import (AutoencoderKLMagvit, EasyAnimatePipeline, EasyAnimateTransformer3DModel,
                           FlowMatchEulerDiscreteScheduler)
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    tok = tiny_qwen2_tokenizer(model_max_length=256)
    tok.chat_template = QWEN2VL_TEXT_TEMPLATE
    n = len(tok)
    torch.manual_seed(seed)
    transformer = EasyAnimateTransformer3DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4,
                                                out_channels=4, time_embed_dim=2, text_embed_dim=16, num_layers=1,
                                                sample_width=16, sample_height=16, patch_size=2).eval()
    vae = AutoencoderKLMagvit(down_block_types=("SpatialDownBlock3D",) + ("SpatialTemporalDownBlock3D",) * 3,
                              up_block_types=("SpatialUpBlock3D",) + ("SpatialTemporalUpBlock3D",) * 3,
                              block_out_channels=(8, 8, 8, 8), latent_channels=4, layers_per_block=1,
                              norm_num_groups=2, spatial_group_norm=False).eval()
    config = Qwen2VLConfig(vision_config=dict(depth=1, embed_dim=16, hidden_size=16, num_heads=2, mlp_ratio=1),
                           **qwen_vl_text_config(tok, n))
    text = Qwen2VLForConditionalGeneration(config).eval()
    pipe = EasyAnimatePipeline(vae=vae, text_encoder=text, tokenizer=tok, transformer=transformer,
                               scheduler=FlowMatchEulerDiscreteScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe
