"""Tiny text-to-image pipelines built in code with random weights and offline tokenizers.

For tests and for quick smoke runs: the same classes as the real models, small enough to run 50
steps in a second on a CPU. One builder per supported family:
  tiny_sd_pipeline      SD 1.x/2.x (UNet2DConditionModel, AutoencoderKL, CLIPTextModel)
  tiny_sdxl_pipeline    SDXL (text_time UNet, CLIPTextModel + CLIPTextModelWithProjection)
  tiny_pixart_pipeline  PixArt-alpha (PixArtTransformer2DModel with learned sigma, T5EncoderModel)
  tiny_sd3_pipeline     SD3 (SD3Transformer2DModel, 2 x CLIPTextModelWithProjection + T5, 16-channel VAE)
and for the SD 1.x/2.x pipelines beyond text-to-image (tiny_sd_variant): "img2img"
(StableDiffusionImg2ImgPipeline), "inpaint" (StableDiffusionInpaintPipeline, a 9-channel UNet as the
real inpainting checkpoints) and "controlnet" (StableDiffusionControlNetPipeline, a ControlNetModel made
from the UNet with random, non-zero output convolutions so that its residuals matter); tiny_image /
tiny_mask give matching input images; tiny_sdxl_img2img_pipeline (StableDiffusionXLImg2ImgPipeline,
base or refiner layout); tiny_sdxl_controlnet_pipeline (StableDiffusionXLControlNetPipeline).
Adapters made in code: tiny_lora (a peft LoRA on the UNet's attention projections, saved as a
diffusers LoRA folder for `load_lora_weights`) and tiny_ip_adapter (IP-Adapter attention processors
and image projection with random weights, set through public diffusers API).
The CLIP tokenizer is the shapes world's CLIP-format BPE (shapefirst.world.vocab), written to a
folder; `pad_token="!"` gives the SD 2.x / SDXL-encoder-2 convention. The T5 tokenizer is a
unigram vocabulary over the world's words plus ASCII characters (tiny_t5_tokenizer). Nothing is
downloaded.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from .world.vocab import t5_vocab, world_t5_tokenizer  # noqa: F401 (t5_vocab: public here too)
from .world.vocab import load_tokenizer, world_word_counts, write_tokenizer

tiny_t5_tokenizer = world_t5_tokenizer  # the world's T5 tokenizer is the tiny pipelines' too


def tiny_sd_pipeline(seed: int = 0, pad_token: str = "<|endoftext|>", prediction_type: str = "epsilon",
                     folder: str | Path | None = None, sample_size: int = 8, time_cond_proj_dim: int | None = None):
    """time_cond_proj_dim: set it (e.g. 32) for a guidance-distilled (LCM-style) UNet."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel


    folder = Path(folder) if folder else Path(tempfile.mkdtemp(prefix="shapefirst-tok-"))
    tok = load_tokenizer(write_tokenizer(folder / "tokenizer", pad_token=pad_token))
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=32, time_cond_proj_dim=time_cond_proj_dim)
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


# -- the other supported families: SDXL, PixArt-alpha, SD3 --------------------------------------
# Same idea as tiny_sd_pipeline: the real pipeline and model classes, configured tiny (like the
# dummy components of diffusers' own fast tests), random weights, tokenizers built offline.

def _folder(folder, prefix: str) -> Path:
    return Path(folder) if folder else Path(tempfile.mkdtemp(prefix=prefix))


def _clip_text(tok, cls, hidden: int = 32, projection_dim: int = 32, layers: int = 2):
    from transformers import CLIPTextConfig

    return cls(CLIPTextConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, max_position_embeddings=77, projection_dim=projection_dim,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))


def _tiny_vae(latent_channels: int, sample_size: int, **kw):
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 32), layers_per_block=1,
                         latent_channels=latent_channels, norm_num_groups=32, sample_size=sample_size * 2, **kw)


def _tiny_t5(tok, d_model: int = 32, layers: int = 2):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(
        vocab_size=len(tok), d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=layers, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=32, dropout_rate=0.0,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, decoder_start_token_id=tok.pad_token_id))


def tiny_sdxl_pipeline(seed: int = 0, folder: str | Path | None = None, sample_size: int = 8):
    """StableDiffusionXLPipeline: a "text_time" UNet (micro-conditions + pooled text), CLIPTextModel
    + CLIPTextModelWithProjection (cross_attention_dim = 32 + 32), the world tokenizer padding with
    EOS for encoder 1 and with "!" for encoder 2 (as real SDXL), Euler scheduler (SDXL's)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection


    folder = _folder(folder, "shapefirst-sdxl-")
    tok = load_tokenizer(write_tokenizer(folder / "tokenizer"))
    tok2 = load_tokenizer(write_tokenizer(folder / "tokenizer_2", pad_token="!"))
    torch.manual_seed(seed)
    text, text2 = _clip_text(tok, CLIPTextModel), _clip_text(tok2, CLIPTextModelWithProjection)
    unet = _tiny_sdxl_unet(sample_size, text.config.hidden_size + text2.config.hidden_size,
                           6, text2.config.projection_dim)
    vae = _tiny_vae(4, sample_size)
    sched = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                                   timestep_spacing="leading", prediction_type="epsilon")
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text, text_encoder_2=text2, tokenizer=tok,
                                     tokenizer_2=tok2, unet=unet, scheduler=sched, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _tiny_sdxl_unet(sample_size: int, cross_attention_dim: int, n_time_ids: int, pooled_dim: int):
    """SDXL's "text_time" UNet, tiny: n_time_ids micro-conditions (6 for the base model; 5 for the refiner,
    which passes an aesthetic score instead of the target size) + the pooled text embedding."""
    from diffusers import UNet2DConditionModel

    time_dim = 8
    return UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=time_dim, transformer_layers_per_block=(1, 1),
        projection_class_embeddings_input_dim=n_time_ids * time_dim + pooled_dim,
        cross_attention_dim=cross_attention_dim, norm_num_groups=32)


def tiny_sdxl_img2img_pipeline(seed: int = 0, folder: str | Path | None = None, sample_size: int = 8,
                               refiner: bool = False):
    """StableDiffusionXLImg2ImgPipeline: tiny_sdxl_pipeline's components, or (refiner=True) the refiner's
    layout: no first text encoder, the second one only (cross_attention_dim = its width), aesthetic-score
    micro-conditions (requires_aesthetics_score=True, 5 time ids)."""
    from diffusers import StableDiffusionXLImg2ImgPipeline

    comp = dict(tiny_sdxl_pipeline(seed, folder=folder, sample_size=sample_size).components)
    if refiner:
        torch.manual_seed(seed + 1)
        text2 = comp["text_encoder_2"]
        comp.update(text_encoder=None, tokenizer=None,
                    unet=_tiny_sdxl_unet(sample_size, text2.config.hidden_size, 5, text2.config.projection_dim))
    comp = {k: v for k, v in comp.items() if k not in ("image_encoder", "feature_extractor")}
    pipe = StableDiffusionXLImg2ImgPipeline(**comp, requires_aesthetics_score=refiner, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sdxl_controlnet_pipeline(seed: int = 0, folder: str | Path | None = None, sample_size: int = 8):
    """StableDiffusionXLControlNetPipeline: tiny_sdxl_pipeline's components and a ControlNetModel made
    from its text_time UNet (random, non-zero output convolutions, as tiny_sd_variant("controlnet"))."""
    from diffusers import StableDiffusionXLControlNetPipeline

    comp = dict(tiny_sdxl_pipeline(seed, folder=folder, sample_size=sample_size).components)
    comp = {k: v for k, v in comp.items() if k not in ("image_encoder", "feature_extractor")}
    pipe = StableDiffusionXLControlNetPipeline(controlnet=_tiny_controlnet(comp["unet"], seed), **comp,
                                               add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_pixart_pipeline(seed: int = 0, folder: str | Path | None = None, sample_size: int = 8):
    """PixArtAlphaPipeline: a tiny PixArtTransformer2DModel (learned sigma: 8 output channels for
    4 latent channels), a tiny T5EncoderModel with the offline T5 tokenizer (tiny_t5_tokenizer),
    DDIM scheduler. sample_size is not one of PixArt's resolution bins (32/64/128): call the
    pipeline with use_resolution_binning=False."""
    from diffusers import DDIMScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel

    folder = _folder(folder, "shapefirst-pixart-")
    tok = tiny_t5_tokenizer(folder / "tokenizer", model_max_length=120)
    torch.manual_seed(seed)
    text = _tiny_t5(tok, d_model=32)
    transformer = PixArtTransformer2DModel(
        sample_size=sample_size, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=3,
        caption_channels=text.config.d_model, in_channels=4, cross_attention_dim=24, out_channels=8,
        attention_bias=True, activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
        norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6)
    vae = _tiny_vae(4, sample_size)
    sched = DDIMScheduler(beta_start=0.0001, beta_end=0.02, beta_schedule="linear", clip_sample=False,
                          prediction_type="epsilon")
    pipe = PixArtAlphaPipeline(tokenizer=tok, text_encoder=text, vae=vae, transformer=transformer, scheduler=sched)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sd3_pipeline(seed: int = 0, folder: str | Path | None = None, sample_size: int = 8):
    """StableDiffusion3Pipeline: a tiny SD3Transformer2DModel (joint attention, 16 latent channels),
    two CLIPTextModelWithProjection (world tokenizer, EOS padding; "!" padding for encoder 2), a
    tiny T5 (joint_attention_dim = T5 width = 64 = the two CLIP widths concatenated), an
    AutoencoderKL with 16 latent channels, FlowMatchEulerDiscreteScheduler (shift 3, as SD3)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    folder = _folder(folder, "shapefirst-sd3-")
    tok = load_tokenizer(write_tokenizer(folder / "tokenizer"))
    tok2 = load_tokenizer(write_tokenizer(folder / "tokenizer_2", pad_token="!"))
    tok3 = tiny_t5_tokenizer(folder / "tokenizer_3", model_max_length=256)
    torch.manual_seed(seed)
    text, text2 = _clip_text(tok, CLIPTextModelWithProjection), _clip_text(tok2, CLIPTextModelWithProjection)
    joint = text.config.hidden_size + text2.config.hidden_size
    text3 = _tiny_t5(tok3, d_model=joint)
    transformer = SD3Transformer2DModel(
        sample_size=sample_size, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=8,
        num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=joint,
        pooled_projection_dim=text.config.projection_dim + text2.config.projection_dim, out_channels=16,
        pos_embed_max_size=sample_size)
    vae = _tiny_vae(16, sample_size, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609,
                    scaling_factor=1.5035)
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=sched, vae=vae, text_encoder=text,
                                    tokenizer=tok, text_encoder_2=text2, tokenizer_2=tok2, text_encoder_3=text3,
                                    tokenizer_3=tok3)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# -- SD 1.x/2.x beyond text-to-image -----------------------------------------------------------
SD_VARIANTS = ("img2img", "inpaint", "controlnet")


def _tiny_controlnet(unet, seed: int):
    """A ControlNetModel made from `unet`, with random non-zero output convolutions (its residuals matter)."""
    from diffusers import ControlNetModel

    torch.manual_seed(seed + 1)
    return _random_zero_convs(ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32)), seed)


def _random_zero_convs(controlnet, seed: int):
    """ControlNets start with zero output convolutions (no effect); tests need residuals that matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for conv in list(controlnet.controlnet_down_blocks) + [controlnet.controlnet_mid_block]:
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * 0.1)
            conv.bias.copy_(torch.randn(conv.bias.shape, generator=g) * 0.1)
    return controlnet


def tiny_sd_variant(kind: str, seed: int = 0, folder: str | Path | None = None, sample_size: int = 8):
    """A tiny SD 1.x pipeline of another kind (SD_VARIANTS), with tiny_sd_pipeline's components
    (the inpainting UNet takes 4 latent + 1 mask + 4 masked-image channels)."""
    from diffusers import (StableDiffusionControlNetPipeline, StableDiffusionImg2ImgPipeline,
                           StableDiffusionInpaintPipeline, UNet2DConditionModel)

    if kind not in SD_VARIANTS:
        raise ValueError(f"kind {kind!r} is not one of {SD_VARIANTS}")
    comp = dict(tiny_sd_pipeline(seed, folder=folder, sample_size=sample_size).components)
    if kind == "img2img":
        pipe = StableDiffusionImg2ImgPipeline(**comp, requires_safety_checker=False)
    elif kind == "inpaint":
        torch.manual_seed(seed + 1)
        cfg = dict(comp["unet"].config)
        cfg["in_channels"] = 9
        comp["unet"] = UNet2DConditionModel.from_config(cfg)
        pipe = StableDiffusionInpaintPipeline(**comp, requires_safety_checker=False)
    else:
        pipe = StableDiffusionControlNetPipeline(controlnet=_tiny_controlnet(comp["unet"], seed), **comp,
                                                 requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_image(seed: int = 0, size: int = 16, n: int = 1) -> torch.Tensor:
    """Smooth random RGB images [n, 3, size, size] in [0, 1] (img2img input, control image)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand((n, 3, 4, 4), generator=g)
    return torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)


def tiny_mask(size: int = 16) -> torch.Tensor:
    """An inpainting mask [1, 1, size, size]: 1 (repaint) on the right half."""
    m = torch.zeros((1, 1, size, size))
    m[..., size // 2:] = 1.0
    return m


# -- adapters made in code: LoRA, IP-Adapter -------------------------------------------------------
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def tiny_lora(unet, folder: str | Path, seed: int = 0, rank: int = 4) -> Path:
    """A diffusers LoRA folder for `pipe.load_lora_weights(folder)`, made as diffusers' own LoRA tests make
    one: a peft LoraConfig on the UNet's attention projections (LORA_TARGETS) with random, non-zero
    weights (init_lora_weights=False), on a copy of `unet` (left untouched), its peft state dict saved
    with StableDiffusionPipeline.save_lora_weights. Needs peft (the `test` extra)."""
    import copy

    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    folder = Path(folder)
    tmp = copy.deepcopy(unet)
    torch.manual_seed(seed)
    tmp.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=list(LORA_TARGETS), init_lora_weights=False))
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=get_peft_model_state_dict(tmp),
                                              safe_serialization=True)
    return folder


def tiny_ip_adapter(pipe, seed: int = 0, image_embed_dim: int = 16, num_tokens: int = 4) -> None:
    """Turn `pipe.unet` into an IP-Adapter UNet with random weights, through public diffusers API only (what
    `load_ip_adapter` builds, without a checkpoint): an IPAdapterAttnProcessor2_0 on every cross-attention
    layer (set_attn_processor; self-attention keeps its processor), an ImageProjection of image embeddings
    of width `image_embed_dim` to `num_tokens` tokens (unet.encoder_hid_proj, a MultiIPAdapterImageProjection)
    and encoder_hid_dim_type="ip_image_proj" (register_to_config). Call the pipeline with
    ip_adapter_image_embeds=[tensor [2, 1, image_embed_dim]] (negative; positive) under CFG: diffusers uses
    that one image embedding for every image of the batch."""
    from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0
    from diffusers.models.embeddings import ImageProjection, MultiIPAdapterImageProjection

    unet = pipe.unet
    cross = unet.config.cross_attention_dim
    torch.manual_seed(seed)
    procs = {}
    for name, proc in unet.attn_processors.items():
        mod = unet.get_submodule(name[:-len(".processor")])
        procs[name] = IPAdapterAttnProcessor2_0(hidden_size=mod.inner_dim, cross_attention_dim=cross, scale=1.0,
                                                num_tokens=num_tokens) if mod.is_cross_attention else proc
    unet.set_attn_processor(procs)
    unet.encoder_hid_proj = MultiIPAdapterImageProjection([ImageProjection(
        cross_attention_dim=cross, image_embed_dim=image_embed_dim, num_image_text_embeds=num_tokens)])
    unet.register_to_config(encoder_hid_dim_type="ip_image_proj")


def tiny_wan_pipeline(seed: int = 0, two_experts: bool = False):
    """WanPipeline (Wan 2.1 text-to-video; with `two_experts` Wan 2.2's layout: `transformer` for the high-noise
    steps, `transformer_2` below boundary_ratio 0.5): tiny WanTransformer3DModels, a tiny UMT5EncoderModel with
    the world's T5 tokenizer, a tiny AutoencoderKLWan (16 latent channels, 4x temporal and 8x spatial
    compression), UniPC on flow sigmas as Wan ships it. Call with height=width=16, num_frames=5 (2 latent
    frames), max_sequence_length=16."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    tok = world_t5_tokenizer(model_max_length=32)
    text = UMT5EncoderModel(UMT5Config(vocab_size=len(tok), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                       relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1,
                                       decoder_start_token_id=0)).eval()
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True]).eval()

    def transformer():
        return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
                                     in_channels=16, out_channels=16, text_dim=32, freq_dim=256, ffn_dim=32,
                                     num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                     rope_max_seq_len=32).eval()

    sched = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    extra = {"transformer_2": transformer(), "boundary_ratio": 0.5} if two_experts else {}
    pipe = WanPipeline(tokenizer=tok, text_encoder=text, vae=vae, transformer=transformer(), scheduler=sched, **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_flux_pipeline(seed: int = 0, folder: str | Path | None = None):
    """FluxPipeline (call it with true_cfg_scale > 1 and a negative prompt for true guidance: one transformer
    call per branch): a tiny FluxTransformer2DModel (4 latent channels packed 2x2), a tiny CLIPTextModel (world
    tokenizer) for the pooled vector, a tiny T5 (world T5 tokenizer), a tiny AutoencoderKL,
    FlowMatchEulerDiscreteScheduler. Call with height=width=16, max_sequence_length=16."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    folder = _folder(folder, "shapefirst-flux-")
    tok = load_tokenizer(write_tokenizer(folder / "tokenizer"))
    tok2 = tiny_t5_tokenizer(folder / "tokenizer_2", model_max_length=32)
    torch.manual_seed(seed)
    text = _clip_text(tok, CLIPTextModel)
    text2 = _tiny_t5(tok2, d_model=32)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, out_channels=16, num_layers=1,
                                         num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
                                         joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8])
    vae = _tiny_vae(4, 8, shift_factor=0.0609, scaling_factor=1.5035)
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=text, tokenizer=tok,
                        text_encoder_2=text2, tokenizer_2=tok2, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _tiny_t5_encoder(tok, d_model: int = 32):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=len(tok), d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=2,
                                   num_heads=4, relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1,
                                   decoder_start_token_id=0)).eval()


def tiny_sana_pipeline(seed: int = 0):
    """SanaPipeline: a tiny SanaTransformer2DModel (linear attention, cross-attention to the text), a tiny
    Gemma2Model text encoder over the world's T5 tokenizer (Sana reads any tokenizer's ids), a tiny AutoencoderDC,
    FlowMatchEulerDiscreteScheduler. Call with height=width=32, max_sequence_length=16,
    complex_human_instruction=None."""
    from diffusers import AutoencoderDC, FlowMatchEulerDiscreteScheduler, SanaPipeline, SanaTransformer2DModel
    from transformers import Gemma2Config, Gemma2Model

    torch.manual_seed(seed)
    tok = world_t5_tokenizer(model_max_length=64)
    text = Gemma2Model(Gemma2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=2, num_key_value_heads=1, head_dim=16, pad_token_id=0,
                                    bos_token_id=1, eos_token_id=1)).eval()
    transformer = SanaTransformer2DModel(patch_size=1, in_channels=4, out_channels=4, num_layers=1,
                                         num_attention_heads=2, attention_head_dim=4, num_cross_attention_heads=2,
                                         cross_attention_head_dim=4, cross_attention_dim=8, caption_channels=32,
                                         sample_size=32)
    vae = AutoencoderDC(in_channels=3, latent_channels=4, attention_head_dim=2,
                        encoder_block_types=("ResBlock", "EfficientViTBlock"),
                        decoder_block_types=("ResBlock", "EfficientViTBlock"), encoder_block_out_channels=(8, 8),
                        decoder_block_out_channels=(8, 8), encoder_qkv_multiscales=((), (5,)),
                        decoder_qkv_multiscales=((), (5,)), encoder_layers_per_block=(1, 1),
                        decoder_layers_per_block=[1, 1], downsample_block_type="conv",
                        upsample_block_type="interpolate", decoder_norm_types="rms_norm", decoder_act_fns="silu",
                        scaling_factor=0.41407)
    pipe = SanaPipeline(tokenizer=tok, text_encoder=text, vae=vae, transformer=transformer,
                        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_cogvideox_pipeline(seed: int = 0):
    """CogVideoXPipeline (text-to-video, batched CFG, joint attention over text and video tokens): a tiny
    CogVideoXTransformer3DModel, a tiny T5 with the world's T5 tokenizer, a tiny AutoencoderKLCogVideoX (4x temporal
    compression), CogVideoXDDIMScheduler (v-prediction). Call with height=width=16, num_frames=9,
    max_sequence_length=16."""
    from diffusers import (AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXPipeline,
                           CogVideoXTransformer3DModel)

    torch.manual_seed(seed)
    tok = world_t5_tokenizer(model_max_length=32)
    transformer = CogVideoXTransformer3DModel(num_attention_heads=4, attention_head_dim=8, in_channels=4,
                                              out_channels=4, time_embed_dim=2, text_embed_dim=32, num_layers=1,
                                              sample_width=2, sample_height=2, sample_frames=9, patch_size=2,
                                              temporal_compression_ratio=4, max_text_seq_length=16)
    vae = AutoencoderKLCogVideoX(in_channels=3, out_channels=3, down_block_types=("CogVideoXDownBlock3D",) * 4,
                                 up_block_types=("CogVideoXUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8),
                                 latent_channels=4, layers_per_block=1, norm_num_groups=2,
                                 temporal_compression_ratio=4)
    pipe = CogVideoXPipeline(tokenizer=tok, text_encoder=_tiny_t5_encoder(tok), vae=vae, transformer=transformer,
                             scheduler=CogVideoXDDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_hunyuandit_pipeline(seed: int = 0, folder: str | Path | None = None):
    """HunyuanDiTPipeline (batched CFG, two text encoders): a tiny HunyuanDiT2DModel, a tiny BertModel with a
    BertTokenizer over the world's words (written to `folder`), a tiny T5 with the world's T5 tokenizer, a tiny
    AutoencoderKL, DDPMScheduler. Call with height=width=16, use_resolution_binning=False."""
    from diffusers import DDPMScheduler, HunyuanDiT2DModel, HunyuanDiTPipeline
    from transformers import BertConfig, BertModel, BertTokenizer

    folder = _folder(folder, "shapefirst-hunyuandit-")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted(world_word_counts())
    (folder / "vocab.txt").write_text("\n".join(words) + "\n", encoding="utf-8")
    torch.manual_seed(seed)
    tok = BertTokenizer(str(folder / "vocab.txt"), model_max_length=77)
    text = BertModel(BertConfig(vocab_size=len(words), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=64, max_position_embeddings=128)).eval()
    tok2 = world_t5_tokenizer(model_max_length=256)
    transformer = HunyuanDiT2DModel(sample_size=16, num_layers=2, patch_size=2, attention_head_dim=8,
                                    num_attention_heads=3, in_channels=4, cross_attention_dim=32,
                                    cross_attention_dim_t5=32, pooled_projection_dim=16, hidden_size=24,
                                    activation_fn="gelu-approximate", text_len=77, text_len_t5=256)
    pipe = HunyuanDiTPipeline(vae=_tiny_vae(4, 8), text_encoder=text, tokenizer=tok, transformer=transformer,
                              scheduler=DDPMScheduler(), safety_checker=None, feature_extractor=None,
                              text_encoder_2=_tiny_t5_encoder(tok2), tokenizer_2=tok2, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_wan_i2v_pipeline(seed: int = 0):
    """WanImageToVideoPipeline (Wan 2.1 image-to-video): tiny_wan_pipeline's components with a transformer that
    takes the image latents (36 input channels) and image embeddings (image_dim 4) from a tiny CLIPVisionModel.
    Pass prompt_embeds / negative_prompt_embeds (its prompt cleaning needs ftfy, which diffusers 0.42 calls
    without checking it is installed): `encode_prompt` of `wan_text_pipeline(pipe)`."""
    from diffusers import WanImageToVideoPipeline, WanTransformer3DModel
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    base = tiny_wan_pipeline(seed)
    torch.manual_seed(seed + 1)
    encoder = CLIPVisionModel(CLIPVisionConfig(hidden_size=4, projection_dim=4, num_hidden_layers=2,
                                               num_attention_heads=2, image_size=32, intermediate_size=16,
                                               patch_size=1)).eval()
    transformer = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
                                        in_channels=36, out_channels=16, text_dim=32, freq_dim=256, ffn_dim=32,
                                        num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                        rope_max_seq_len=32, image_dim=4).eval()
    pipe = WanImageToVideoPipeline(tokenizer=base.tokenizer, text_encoder=base.text_encoder, vae=base.vae,
                                   scheduler=base.scheduler, transformer=transformer, image_encoder=encoder,
                                   image_processor=CLIPImageProcessor(crop_size=32, size=32))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def wan_text_pipeline(pipe):
    """A WanPipeline on `pipe`'s text encoder and tokenizer, for its encode_prompt."""
    from diffusers import WanPipeline

    return WanPipeline(tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder, vae=pipe.vae,
                       scheduler=pipe.scheduler)


# -- more separate-call families (#32): Qwen-Image, Lumina 2, CogView4, Chroma; Kolors (batched) -----------------
QWEN_TEMPLATE = ("<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, "
                 "text, spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}"
                 "<|im_end|>\n<|im_start|>assistant\n")  # QwenImagePipeline.prompt_template_encode (diffusers 0.42.1)
QWEN_SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
# Qwen2's pre-tokenizer split (transformers' tokenization_qwen2.PRETOKENIZE_REGEX)
QWEN_SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
              r"""\s*[\r\n]+|\s+(?!\S)|\s+""")


def _world_texts(template: str) -> list[str]:
    """What the tiny BPE tokenizers learn from: the chat template around the world's words, and each word alone
    (with and without a leading space), so the template's words and every world word are single tokens."""
    words = sorted(world_word_counts())
    return [template.format(" ".join(words))] * 3 + [" " + w for w in words] + words


def tiny_qwen2_tokenizer(model_max_length: int = 1024):
    """A Qwen2Tokenizer (byte-level BPE, Qwen2's pre-tokenizer split, <|endoftext|> padding, the chat tokens
    <|im_start|> / <|im_end|> special) trained in code by the `tokenizers` library on the Qwen-Image chat template
    and the world's words: the template's system part and "<|im_start|>user\\n" come out as 34 tokens, the
    number QwenImagePipeline drops (prompt_template_encode_start_idx), as with the real tokenizer."""
    import json

    from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import BPE
    from tokenizers.trainers import BpeTrainer
    from transformers import Qwen2Tokenizer

    tk = Tokenizer(BPE())
    tk.normalizer = normalizers.NFC()
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    trainer = BpeTrainer(vocab_size=4096, special_tokens=list(QWEN_SPECIAL), show_progress=False,
                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(_world_texts(QWEN_TEMPLATE), trainer)
    model = json.loads(tk.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    return Qwen2Tokenizer(vocab=model["vocab"], merges=merges, additional_special_tokens=list(QWEN_SPECIAL[1:]),
                          model_max_length=model_max_length)


def tiny_qwenimage_pipeline(seed: int = 0):
    """QwenImagePipeline (true CFG as separate calls: true_cfg_scale > 1 and a negative prompt): a tiny
    QwenImageTransformer2DModel (MMDiT; 16 packed channels = 4 latent channels x 2x2), a tiny
    Qwen2_5_VLForConditionalGeneration (random weights; its text tower encodes the chat-templated prompt) with
    tiny_qwen2_tokenizer, a tiny AutoencoderKLQwenImage (4 latent channels, 8x spatial compression),
    FlowMatchEulerDiscreteScheduler. Call with height=width=16, max_sequence_length=16."""
    from diffusers import (AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline,
                           QwenImageTransformer2DModel)
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tok = tiny_qwen2_tokenizer()
    n = len(tok)
    torch.manual_seed(seed)
    transformer = QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=1,
                                              attention_head_dim=16, num_attention_heads=2, joint_attention_dim=16,
                                              guidance_embeds=False, axes_dims_rope=(8, 4, 4)).eval()
    vae = AutoencoderKLQwenImage(base_dim=8, z_dim=4, dim_mult=[1, 2, 4], num_res_blocks=1,
                                 temperal_downsample=[False, True], latents_mean=[0.0] * 4,
                                 latents_std=[1.0] * 4).eval()
    config = Qwen2_5_VLConfig(
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=16),
        hidden_size=16, **qwen_vl_text_config(tok, n))
    text = Qwen2_5_VLForConditionalGeneration(config).eval()
    pipe = QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=text, tokenizer=tok,
                             transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _trained_bpe(texts: list[str], special: list[str], normalizer=None, pre_tokenizer=None) -> tuple[dict, list]:
    """(vocab, merges) of a BPE the `tokenizers` library trains on `texts` (deterministic for the same texts)."""
    import json

    from tokenizers import Tokenizer
    from tokenizers.models import BPE
    from tokenizers.trainers import BpeTrainer

    tk = Tokenizer(BPE())
    if normalizer is not None:
        tk.normalizer = normalizer
    if pre_tokenizer is not None:
        tk.pre_tokenizer = pre_tokenizer
    tk.train_from_iterator(texts, BpeTrainer(vocab_size=4096, special_tokens=special, show_progress=False))
    model = json.loads(tk.to_str())["model"]
    return model["vocab"], [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]


LUMINA2_SYSTEM = ("You are an assistant designed to generate superior images with the superior degree of image-text "
                  "alignment based on textual prompts or user prompts. <Prompt Start> {}")  # Lumina2Pipeline's


def tiny_gemma_tokenizer(model_max_length: int = 256):
    """A GemmaTokenizer (BPE with byte fallback over "▁"-joined words, <bos> first, <pad> = 0) trained in code on
    Lumina 2's system prompt and the world's words: each of those words is one token, any other text falls back to
    sub-words and bytes (<0x00>..<0xFF> are in the vocabulary)."""
    from tokenizers import normalizers, pre_tokenizers
    from transformers import GemmaTokenizer

    special = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"] + [f"<0x{b:02X}>" for b in range(256)]
    texts = [LUMINA2_SYSTEM.format(" ".join(sorted(world_word_counts())))] * 3
    texts += [" " + w for w in sorted(world_word_counts())]
    vocab, merges = _trained_bpe(texts, special, normalizers.Replace(" ", "▁"),
                                 pre_tokenizers.Split("▁", behavior="merged_with_next"))  # merges inside words only
    return GemmaTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length, add_bos_token=True)


def tiny_lumina2_pipeline(seed: int = 0):
    """Lumina2Pipeline (Lumina-Image 2.0: CFG as separate calls, `cfg_trunc_ratio` ends the unconditional calls, the
    guided prediction renormalised to the conditional one's norm): a tiny Lumina2Transformer2DModel, a tiny
    Gemma2Model with tiny_gemma_tokenizer (right padding, the pipeline's own setting), a tiny AutoencoderKL with
    8x compression (the pipeline's fixed vae_scale_factor), FlowMatchEulerDiscreteScheduler. Call with
    height=width=32 (4x4 latents, 4 image tokens), max_sequence_length=48 (the system prompt takes 27 positions,
    <bos> included)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Lumina2Pipeline, Lumina2Transformer2DModel

    tok = tiny_gemma_tokenizer()
    torch.manual_seed(seed)
    text = tiny_gemma2_encoder(tok)
    transformer = Lumina2Transformer2DModel(sample_size=4, patch_size=2, in_channels=4, hidden_size=16, num_layers=1,
                                            num_refiner_layers=1, num_attention_heads=2, num_kv_heads=1,
                                            multiple_of=16, norm_eps=1e-5, scaling_factor=1.0,
                                            axes_dim_rope=[4, 2, 2], axes_lens=[64, 16, 16], cap_feat_dim=16).eval()
    vae = tiny_vae_8x(use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035)
    pipe = Lumina2Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae,
                           text_encoder=text, tokenizer=tok)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_glm_tokenizer(model_max_length: int = 1024):
    """A PreTrainedTokenizerFast in the GLM-4 layout CogView4 loads (byte-level BPE trained in code on the world's
    words, "[gMASK]<sop>" put before every prompt, <|endoftext|> padding on the left)."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    special = ["<|endoftext|>", "[gMASK]", "<sop>"]
    words = sorted(world_word_counts())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    vocab, merges = _trained_bpe([" ".join(words)] * 3 + [" " + w for w in words] + words, special,
                                 pre_tokenizer=byte_level)
    alphabet = [c for c in pre_tokenizers.ByteLevel.alphabet() if c not in vocab]
    vocab = {**vocab, **{c: len(vocab) + i for i, c in enumerate(sorted(alphabet))}}  # every byte tokenizes
    tk = Tokenizer(BPE(vocab=vocab, merges=merges))
    tk.pre_tokenizer, tk.decoder = byte_level, decoders.ByteLevel()
    tk.post_processor = processors.TemplateProcessing(single="[gMASK] <sop> $A", pair="[gMASK] <sop> $A $B",
                                                      special_tokens=[("[gMASK]", vocab["[gMASK]"]),
                                                                      ("<sop>", vocab["<sop>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   additional_special_tokens=special[1:], padding_side="left",
                                   model_max_length=model_max_length)


def tiny_cogview4_pipeline(seed: int = 0):
    """CogView4Pipeline (CFG as separate calls): a tiny CogView4Transformer2DModel, a tiny GlmModel with
    tiny_glm_tokenizer (the pipeline left-pads the ids to a multiple of 16 and reads the second-to-last hidden
    state), a tiny AutoencoderKL (2x compression), FlowMatchEulerDiscreteScheduler with CogView4's dynamic linear
    shift. Call with height=width=16, max_sequence_length=16."""
    from diffusers import CogView4Pipeline, CogView4Transformer2DModel, FlowMatchEulerDiscreteScheduler
    from transformers import GlmConfig, GlmModel

    tok = tiny_glm_tokenizer()
    torch.manual_seed(seed)
    transformer = CogView4Transformer2DModel(patch_size=2, in_channels=4, num_layers=1, attention_head_dim=4,
                                             num_attention_heads=4, out_channels=4, text_embed_dim=32,
                                             time_embed_dim=8, condition_dim=4).eval()
    text = GlmModel(GlmConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=16, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                              pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)).eval()
    sched = FlowMatchEulerDiscreteScheduler(base_shift=0.25, max_shift=0.75, base_image_seq_len=256,
                                            use_dynamic_shifting=True, time_shift_type="linear")
    pipe = CogView4Pipeline(tokenizer=tok, text_encoder=text, vae=_tiny_vae(4, 8).eval(), transformer=transformer,
                            scheduler=sched)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_chatglm_tokenizer(folder: str | Path | None = None):
    """Kolors' ChatGLMTokenizer (diffusers.pipelines.kolors.tokenizer) over a SentencePiece BPE model trained in code
    (sentencepiece.SentencePieceTrainer, the world's words, <unk> = 0 = padding, <s> = 1, </s> = 2) and written to
    `folder` (a new temporary folder if None) as tokenizer.model. The tokenizer puts [gMASK] sop before a prompt and
    pads on the left."""
    import sentencepiece as spm
    from diffusers.pipelines.kolors.tokenizer import ChatGLMTokenizer

    folder = _folder(folder, "shapefirst-chatglm-")
    folder.mkdir(parents=True, exist_ok=True)
    words = sorted(world_word_counts())
    spm.SentencePieceTrainer.train(sentence_iterator=iter([" ".join(words)] * 5 + words),
                                   model_prefix=str(folder / "tokenizer"), vocab_size=400, model_type="bpe",
                                   hard_vocab_limit=False, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2,
                                   pad_id=-1, num_threads=1, minloglevel=2)
    return ChatGLMTokenizer(str(folder / "tokenizer.model"))


def tiny_kolors_pipeline(seed: int = 0, folder: str | Path | None = None, sample_size: int = 8):
    """KolorsPipeline (batched CFG; an SDXL-like UNet): a tiny ChatGLMModel (diffusers.pipelines.kolors.text_encoder)
    with tiny_chatglm_tokenizer, a "text_time" UNet whose text_proj maps the ChatGLM states (width 32) to its
    cross-attention width (64) and whose added conditioning takes the pooled last-token state, a tiny AutoencoderKL,
    EulerDiscreteScheduler (Kolors'). Call with height=width=16, max_sequence_length=16."""
    from diffusers import EulerDiscreteScheduler, KolorsPipeline, UNet2DConditionModel
    from diffusers.pipelines.kolors.text_encoder import ChatGLMConfig, ChatGLMModel

    tok = tiny_chatglm_tokenizer(folder)
    torch.manual_seed(seed)
    text = ChatGLMModel(ChatGLMConfig(num_layers=2, padded_vocab_size=tok.vocab_size, hidden_size=32,
                                      ffn_hidden_size=64, kv_channels=8, num_attention_heads=4, seq_length=64,
                                      multi_query_attention=True, multi_query_group_num=2, original_rope=True)).eval()
    with torch.no_grad():  # ChatGLMModel leaves its weights uninitialised (torch.empty; its _init_weights is a no-op)
        for name, param in text.named_parameters():  # norms 1, word embeddings N(0, 1), the rest N(0, 0.1)
            std = 1.0 if "word_embeddings" in name else 0.1
            param.copy_(torch.ones_like(param) if param.dim() == 1 else torch.randn_like(param) * std)
    time_dim = 8
    unet = UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=time_dim, transformer_layers_per_block=(1, 1),
        projection_class_embeddings_input_dim=6 * time_dim + 32, encoder_hid_dim_type="text_proj",
        encoder_hid_dim=32, cross_attention_dim=64, norm_num_groups=32).eval()
    sched = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.014, beta_schedule="scaled_linear", steps_offset=1,
                                   timestep_spacing="leading", prediction_type="epsilon")
    pipe = KolorsPipeline(vae=_tiny_vae(4, sample_size).eval(), text_encoder=text, tokenizer=tok, unet=unet,
                          scheduler=sched, force_zeros_for_empty_prompt=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_chroma_pipeline(seed: int = 0, folder: str | Path | None = None):
    """ChromaPipeline (CFG as separate calls; T5 only, its text attention mask passed to the transformer): a tiny
    ChromaTransformer2DModel (4 latent channels packed 2x2), a tiny T5 with the world's T5 tokenizer, a tiny
    AutoencoderKL, FlowMatchEulerDiscreteScheduler. Call with height=width=16, max_sequence_length=16."""
    from diffusers import ChromaPipeline, ChromaTransformer2DModel, FlowMatchEulerDiscreteScheduler

    folder = _folder(folder, "shapefirst-chroma-")
    tok = tiny_t5_tokenizer(folder / "tokenizer", model_max_length=32)
    torch.manual_seed(seed)
    transformer = ChromaTransformer2DModel(patch_size=1, in_channels=16, out_channels=16, num_layers=1,
                                           num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
                                           joint_attention_dim=32, axes_dims_rope=(4, 4, 8),
                                           approximator_num_channels=16, approximator_hidden_dim=32,
                                           approximator_layers=1).eval()
    vae = _tiny_vae(4, 8, shift_factor=0.0609, scaling_factor=1.5035).eval()
    pipe = ChromaPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=_tiny_t5(tok).eval(),
                          tokenizer=tok, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_llama3_tokenizer(template: str, model_max_length: int = 512):
    """A PreTrainedTokenizerFast in Llama 3's layout (byte-level BPE with its pre-tokenizer split, <|begin_of_text|>
    first, the chat header tokens special, <|end_of_text|> padding) trained in code on `template` around the world's
    words: on HunyuanVideo's prompt template the part before the prompt comes out as 95 tokens, its crop_start."""
    from tokenizers import Regex, Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    special = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    split = QWEN_SPLIT.replace(r"\p{N}|", r"\p{N}{1,3}|")  # Llama 3's: digits in groups of up to three
    pre = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                   pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    vocab, merges = _trained_bpe(_world_texts(template), special, pre_tokenizer=pre)
    tk = Tokenizer(BPE(vocab=vocab, merges=merges))
    tk.pre_tokenizer, tk.decoder = pre, decoders.ByteLevel()
    tk.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A $B",
                                                      special_tokens=[("<|begin_of_text|>", vocab[special[0]])])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=special[0], eos_token=special[1],
                                   pad_token=special[1], additional_special_tokens=special[2:],
                                   model_max_length=model_max_length)


def tiny_hunyuanvideo_pipeline(seed: int = 0, folder: str | Path | None = None):
    """HunyuanVideoPipeline (true CFG as separate calls: true_cfg_scale > 1 and a negative prompt; its guidance_scale
    is the distilled guidance embedding): a tiny HunyuanVideoTransformer3DModel, a tiny LlamaModel with
    tiny_llama3_tokenizer on the pipeline's prompt template, a tiny CLIPTextModel (world tokenizer) for the pooled
    vector, a tiny AutoencoderKLHunyuanVideo (4x temporal, 8x spatial compression), FlowMatchEulerDiscreteScheduler.
    Call with height=width=16, num_frames=5 (2 latent frames), max_sequence_length=16."""
    from diffusers import (AutoencoderKLHunyuanVideo, FlowMatchEulerDiscreteScheduler, HunyuanVideoPipeline,
                           HunyuanVideoTransformer3DModel)
    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE
    from transformers import CLIPTextModel, LlamaConfig, LlamaModel

    folder = _folder(folder, "shapefirst-hunyuanvideo-")
    tok = tiny_llama3_tokenizer(DEFAULT_PROMPT_TEMPLATE["template"])
    tok2 = load_tokenizer(write_tokenizer(folder / "tokenizer_2"))
    torch.manual_seed(seed)
    text = LlamaModel(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                                  num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                                  max_position_embeddings=256, pad_token_id=tok.pad_token_id,
                                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)).eval()
    text2 = _clip_text(tok2, CLIPTextModel).eval()
    transformer = HunyuanVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2,
                                                 attention_head_dim=10, num_layers=1, num_single_layers=1,
                                                 num_refiner_layers=1, patch_size=1, patch_size_t=1,
                                                 guidance_embeds=True, text_embed_dim=16, pooled_projection_dim=32,
                                                 rope_axes_dim=(2, 4, 4)).eval()
    vae = AutoencoderKLHunyuanVideo(in_channels=3, out_channels=3, latent_channels=4,
                                    down_block_types=("HunyuanVideoDownBlock3D",) * 4,
                                    up_block_types=("HunyuanVideoUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8),
                                    layers_per_block=1, act_fn="silu", norm_num_groups=4, scaling_factor=0.476986,
                                    spatial_compression_ratio=8, temporal_compression_ratio=4,
                                    mid_block_add_attention=True).eval()
    pipe = HunyuanVideoPipeline(text_encoder=text, tokenizer=tok, transformer=transformer, vae=vae,
                                scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0), text_encoder_2=text2,
                                tokenizer_2=tok2)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_gemma2_encoder(tok):
    """A tiny Gemma2Model (width 16, 2 layers) for a Gemma tokenizer (Lumina 2, Lumina-Next)."""
    from transformers import Gemma2Config, Gemma2Model

    return Gemma2Model(Gemma2Config(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                    num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                                    pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                                    eos_token_id=tok.eos_token_id)).eval()


def tiny_vae_8x(**config):
    """A tiny AutoencoderKL with 8x compression (4 levels of 8 channels, 4 latent channels), for 32-pixel images."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
                         latent_channels=4, norm_num_groups=4, sample_size=32, **config).eval()


def qwen_vl_text_config(tok, n: int) -> dict:
    """The text side of a tiny Qwen2-VL / Qwen2.5-VL config (its mrope sections, the chat template's end token) for a
    tokenizer of n tokens; the vision tower's token ids lie past the text vocabulary, so no prompt holds them."""
    ids = dict(bos_token_id=tok.pad_token_id, eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
               pad_token_id=tok.pad_token_id)
    text = dict(hidden_size=16, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=2, vocab_size=n, rope_theta=1e6,
                rope_scaling={"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"}, **ids)
    return dict(text_config=text, vocab_size=n, image_token_id=n + 1, video_token_id=n + 2,
                vision_start_token_id=n + 3, vision_end_token_id=n + 4, **ids)
