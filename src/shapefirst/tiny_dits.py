"""Tiny batched-CFG image pipelines built in code (random weights, offline tokenizers), for the tests of the families
declared in shapefirst.families beside shapefirst.tiny's (#32 item 2). One builder per pipeline:
  tiny_auraflow_pipeline     AuraFlowPipeline (AuraFlowTransformer2DModel, UMT5EncoderModel, AutoencoderKL)
  tiny_cogview3plus_pipeline CogView3PlusPipeline (CogView3PlusTransformer2DModel, T5EncoderModel, AutoencoderKL)
  tiny_bria_pipeline         BriaPipeline (BriaTransformer2DModel on packed 2x2 latent patches, T5EncoderModel)
  tiny_lumina_pipeline       LuminaPipeline (Lumina-Next: LuminaNextDiT2DModel, Gemma2Model); not a declared family
                             (its CFG batch is [cond, uncond]): built to show that it is refused
Each uses the real pipeline and model classes configured tiny; tokenizers are the world's (shapefirst.world.vocab).
Nothing is downloaded.
"""
from __future__ import annotations

import torch

from .tiny import _tiny_t5_encoder, _tiny_vae, tiny_gemma2_encoder, tiny_gemma_tokenizer, tiny_vae_8x
from .world.vocab import world_t5_tokenizer


def _scaled(module: torch.nn.Module, factors: dict[str, float]) -> torch.nn.Module:
    """Multiply the parameters whose name contains a key by its factor. Random DiTs with adaLN modulation start with
    gates near 0 (a small timestep embedding through small random projections), so the text barely reaches the image
    tokens and guidance changes next to nothing; scaled up, a stop changes the images measurably."""
    with torch.no_grad():
        for name, param in module.named_parameters():
            for key, factor in factors.items():
                if key in name:
                    param.mul_(factor)
    return module


def _tiny_umt5(tok, d_model: int = 32):
    from transformers import UMT5Config, UMT5EncoderModel

    return UMT5EncoderModel(UMT5Config(vocab_size=len(tok), d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=2,
                                       num_heads=4, relative_attention_num_buckets=8, dropout_rate=0.0,
                                       pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                                       decoder_start_token_id=tok.pad_token_id)).eval()


def tiny_auraflow_pipeline(seed: int = 0):
    """AuraFlowPipeline (batched CFG, joint attention over text and image tokens, flow matching; the transformer gets
    t / 1000): a tiny AuraFlowTransformer2DModel (one MMDiT and one single-stream block), a tiny UMT5EncoderModel with
    the world's T5 tokenizer, a tiny AutoencoderKL (2x compression), FlowMatchEulerDiscreteScheduler. The timestep
    embedding and the blocks' modulations are scaled up (_scaled: the text then changes the prediction by about 0.2,
    not 7e-5). Call with height=width=16 (8x8 latents, 16 image tokens), max_sequence_length=16."""
    from diffusers import AuraFlowPipeline, AuraFlowTransformer2DModel, FlowMatchEulerDiscreteScheduler

    tok = world_t5_tokenizer(model_max_length=64)
    torch.manual_seed(seed)
    transformer = AuraFlowTransformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_mmdit_layers=1,
                                             num_single_dit_layers=1, attention_head_dim=8, num_attention_heads=2,
                                             joint_attention_dim=32, caption_projection_dim=16, out_channels=4,
                                             pos_embed_max_size=64).eval()
    _scaled(transformer, {"time_step_proj.linear_2": 10.0, "norm1.linear": 3.0, "norm1_context.linear": 3.0})
    pipe = AuraFlowPipeline(tokenizer=tok, text_encoder=_tiny_umt5(tok), vae=_tiny_vae(4, 8),
                            transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_cogview3plus_pipeline(seed: int = 0):
    """CogView3PlusPipeline (batched CFG; without a negative prompt its unconditional embeddings are zeros; SDXL-like
    size and crop conditions): a tiny CogView3PlusTransformer2DModel, a tiny T5 with the world's T5 tokenizer, a tiny
    AutoencoderKL (2x compression), CogVideoXDDIMScheduler (v-prediction, its SNR shift); the blocks' modulations
    scaled up (_scaled). Call with height=width=16, max_sequence_length=16."""
    from diffusers import CogVideoXDDIMScheduler, CogView3PlusPipeline, CogView3PlusTransformer2DModel

    tok = world_t5_tokenizer(model_max_length=64)
    torch.manual_seed(seed)
    transformer = CogView3PlusTransformer2DModel(patch_size=2, in_channels=4, num_layers=1, attention_head_dim=4,
                                                 num_attention_heads=2, out_channels=4, text_embed_dim=32,
                                                 time_embed_dim=8, condition_dim=2, pos_embed_max_size=8,
                                                 sample_size=8).eval()
    _scaled(transformer, {"norm1.linear": 3.0})  # a stop at call 2 of 5 then moves pixels by 9e-3, not 3e-3
    pipe = CogView3PlusPipeline(tokenizer=tok, text_encoder=_tiny_t5_encoder(tok), vae=_tiny_vae(4, 8),
                                transformer=transformer, scheduler=CogVideoXDDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_bria_pipeline(seed: int = 0):
    """BriaPipeline (batched CFG on Flux-like packed latents, [tokens, 4C]; each prompt encoded alone and padded with
    zeros; without a negative prompt its unconditional embeddings are zeros): a tiny BriaTransformer2DModel, a tiny
    T5 with the world's T5 tokenizer, a tiny AutoencoderKL (2x compression, so the pipeline's vae_scale_factor,
    2 ** len(block_out_channels), is 4: Bria's is twice its VAE's compression) with a shift factor,
    FlowMatchEulerDiscreteScheduler. Call with height=width=16 (8x8 latents, 16 packed tokens),
    max_sequence_length=16."""
    from diffusers import BriaPipeline, BriaTransformer2DModel, FlowMatchEulerDiscreteScheduler

    tok = world_t5_tokenizer(model_max_length=64)
    torch.manual_seed(seed)
    transformer = BriaTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                         attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                                         axes_dims_rope=[2, 2, 4]).eval()
    vae = _tiny_vae(4, 8, shift_factor=0.0609, scaling_factor=1.5035)
    pipe = BriaPipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae,
                        text_encoder=_tiny_t5_encoder(tok), tokenizer=tok)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_lumina_pipeline(seed: int = 0):
    """LuminaPipeline (Lumina-Next; its CFG batch is [cond, uncond], so shapefirst does not serve it): a tiny
    LuminaNextDiT2DModel (learned sigma), a tiny Gemma2Model with shapefirst.tiny's Gemma tokenizer, a tiny
    AutoencoderKL with 8x compression (the pipeline's fixed vae_scale_factor), FlowMatchEulerDiscreteScheduler. Call
    with height=width=32 (4x4 latents) and clean_caption=False (its default True wants Beautiful Soup)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, LuminaNextDiT2DModel, LuminaPipeline

    tok = tiny_gemma_tokenizer()
    torch.manual_seed(seed)
    text = tiny_gemma2_encoder(tok)
    transformer = LuminaNextDiT2DModel(sample_size=4, patch_size=2, in_channels=4, hidden_size=16, num_layers=1,
                                       num_attention_heads=2, num_kv_heads=1, multiple_of=16,
                                       cross_attention_dim=16).eval()
    vae = tiny_vae_8x()
    pipe = LuminaPipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae,
                          text_encoder=text, tokenizer=tok)
    pipe.set_progress_bar_config(disable=True)
    return pipe
