"""Family knowledge, in one bottom-floor module: a family is a declaration, not a branch in the code.

Each Family states what the rest of shapefirst needs to know about a kind of diffusers pipeline:
  pipelines       the diffusers pipeline classes tested with shapefirst (a subclass counts as its base)
  denoisers       the pipeline attributes that hold its denoiser(s), in the order they run
  cfg             how classifier-free guidance reaches the denoiser: "batched" ([uncond, cond] rows of one
                  call, diffusers' `torch.cat([latents] * 2)`) or "separate" (one denoiser call per branch and
                  step, shapefirst.separate)
  branches        "separate" only: the denoiser arguments that differ between the branches, each with the
                  names of the pipeline call's locals that hold its conditional and unconditional value; the
                  first one identifies a call's branch (by identity: the very tensor the pipeline passes)
  scale_local     "separate" only: the local of the pipeline's `__call__` holding the guidance scale of the
                  current step, where a step can have its own (Wan 2.2's low-noise expert: guidance_scale_2),
                  or where the pipeline's `guidance_scale` is something else (Flux: true_cfg_scale)
  cfg_local       "separate" only: the local of the pipeline's `__call__` that says whether it runs CFG, for a
                  pipeline without a `do_classifier_free_guidance` property (Flux: do_true_cfg)
  cond_only_local "separate" only: the local of the pipeline's `__call__` that is true at the steps where it makes
                  its conditional call alone (Lumina 2's do_classifier_free_truncation, after its cfg_trunc_ratio):
                  such a step is unguided with the conditional branch kept, whatever the schedule says
  time_reversed   the denoiser is given 1 - t / num_train_timesteps for the scheduler's timestep t (Lumina 2: its
                  time runs from noise at 0 to the image at 1); x0-hat maps it back
  negated         the pipeline steps its scheduler with minus the denoiser's output (Lumina 2); x0-hat negates it
  scale_arg       the call argument that carries the CFG scale (Flux: true_cfg_scale; its guidance_scale is the
                  distilled guidance embedding)
  video           the pipeline returns `.frames` ([N, frames, H, W, 3]) and counts `num_videos_per_prompt`
  latent_layout   how the denoiser's latents are laid out per image and reach the VAE (shapefirst.video_strip):
                  "image" [C, H, W]; "packed" [tokens, 4C], 2x2 latent patches as tokens (Flux, Chroma);
                  "packed_frame" packed tokens decoded as a one-frame video by a VAE with a frame axis (Qwen-Image:
                  [C, 1, H, W], its first decoded frame kept); "video" [C, F, H, W] (Wan, HunyuanVideo);
                  "video_frames" [F, C, H, W] (CogVideoX)
  call_defaults   call arguments shapefirst.generate supplies unless given (Flux: a negative prompt, without which
                  it runs no true CFG)
  prediction      how x0-hat follows from a prediction: "scheduler" (epsilon / v / sample from the
                  scheduler's prediction_type, alphas_cumprod) or "flow" (x0 = x_t - sigma * v)
  attention       where the text enters: "cross" (separate cross-attention, attn2) or "joint" (one attention
                  over image and text tokens, SD3's MMDiT)
  tokenizer       the tokenizer that makes the token positions the analyses label: "clip" or "t5"
  schedulers      the scheduler short names that fit (shapefirst.models.SCHEDULERS): flow-matching
                  families only take "euler"
Other pipelines are detected by their structure (family_by_structure) and then verified while they run.
This module imports nothing of shapefirst but its errors, so every other module may import it.
"""
from __future__ import annotations

from dataclasses import dataclass

from .errors import ShapefirstError

DDPM_SCHEDULERS = ("ddim", "pndm", "euler", "euler-a", "dpm++", "unipc")


@dataclass(frozen=True)
class Family:
    name: str
    pipelines: tuple[str, ...]
    denoisers: tuple[str, ...] = ("unet",)
    cfg: str = "batched"
    prediction: str = "scheduler"
    attention: str = "cross"
    tokenizer: str = "clip"
    schedulers: tuple[str, ...] = DDPM_SCHEDULERS
    branches: tuple[tuple[str, str, str], ...] = ()
    scale_local: str | None = None
    cfg_local: str | None = None
    cond_only_local: str | None = None
    time_reversed: bool = False
    negated: bool = False
    scale_arg: str = "guidance_scale"
    video: bool = False
    call_defaults: tuple[tuple[str, object], ...] = ()
    latent_layout: str = "image"


DECLARED = (
    Family("sd", ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline",
                  "StableDiffusionControlNetPipeline")),  # SD 1.x and 2.x
    Family("sdxl", ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline",
                    "StableDiffusionXLControlNetPipeline")),
    Family("pixart", ("PixArtAlphaPipeline", "PixArtSigmaPipeline"), denoisers=("transformer",), tokenizer="t5"),
    Family("sd3", ("StableDiffusion3Pipeline",), denoisers=("transformer",), prediction="flow", attention="joint",
           schedulers=("euler",)),
    Family("sana", ("SanaPipeline",), denoisers=("transformer",), prediction="flow", tokenizer="gemma", schedulers=()),
    Family("cogvideox", ("CogVideoXPipeline",), denoisers=("transformer",), attention="joint", tokenizer="t5",
           schedulers=(), video=True, latent_layout="video_frames"),
    Family("hunyuandit", ("HunyuanDiTPipeline",), denoisers=("transformer",), tokenizer="bert+t5", schedulers=()),
    Family("kolors", ("KolorsPipeline",), tokenizer="chatglm"),  # SDXL's text_time UNet on ChatGLM states
    Family("wan", ("WanPipeline", "WanImageToVideoPipeline"), denoisers=("transformer", "transformer_2"),
           cfg="separate", prediction="flow",
           tokenizer="t5", schedulers=(),
           branches=(("encoder_hidden_states", "prompt_embeds", "negative_prompt_embeds"),),
           scale_local="current_guidance_scale", video=True, latent_layout="video"),
    Family("flux", ("FluxPipeline",), denoisers=("transformer",), cfg="separate", prediction="flow", attention="joint",
           tokenizer="t5", schedulers=(),
           branches=(("encoder_hidden_states", "prompt_embeds", "negative_prompt_embeds"),
                     ("pooled_projections", "pooled_prompt_embeds", "negative_pooled_prompt_embeds"),
                     ("txt_ids", "text_ids", "negative_text_ids")),
           scale_local="true_cfg_scale", cfg_local="do_true_cfg", scale_arg="true_cfg_scale",
           call_defaults=(("negative_prompt", ""),), latent_layout="packed"),
    Family("qwenimage", ("QwenImagePipeline",), denoisers=("transformer",), cfg="separate", prediction="flow",
           attention="joint", tokenizer="qwen2", schedulers=(),
           branches=(("encoder_hidden_states", "prompt_embeds", "negative_prompt_embeds"),
                     ("encoder_hidden_states_mask", "prompt_embeds_mask", "negative_prompt_embeds_mask")),
           scale_local="true_cfg_scale", cfg_local="do_true_cfg", scale_arg="true_cfg_scale",
           call_defaults=(("negative_prompt", ""),), latent_layout="packed_frame"),
    Family("lumina2", ("Lumina2Pipeline",), denoisers=("transformer",), cfg="separate", prediction="flow",
           attention="joint", tokenizer="gemma", schedulers=(),
           branches=(("encoder_hidden_states", "prompt_embeds", "negative_prompt_embeds"),
                     ("encoder_attention_mask", "prompt_attention_mask", "negative_prompt_attention_mask")),
           cond_only_local="do_classifier_free_truncation", time_reversed=True, negated=True),
    Family("cogview4", ("CogView4Pipeline",), denoisers=("transformer",), cfg="separate", prediction="flow",
           attention="joint", tokenizer="glm", schedulers=(),
           branches=(("encoder_hidden_states", "prompt_embeds", "negative_prompt_embeds"),)),
    Family("chroma", ("ChromaPipeline",), denoisers=("transformer",), cfg="separate", prediction="flow",
           attention="joint", tokenizer="t5", schedulers=(),
           branches=(("encoder_hidden_states", "prompt_embeds", "negative_prompt_embeds"),
                     ("txt_ids", "text_ids", "negative_text_ids"),
                     ("attention_mask", "attention_mask", "negative_attention_mask")), latent_layout="packed"),
    Family("hunyuanvideo", ("HunyuanVideoPipeline",), denoisers=("transformer",), cfg="separate", prediction="flow",
           attention="joint", tokenizer="llama+clip", schedulers=(),
           branches=(("encoder_hidden_states", "prompt_embeds", "negative_prompt_embeds"),
                     ("encoder_attention_mask", "prompt_attention_mask", "negative_prompt_attention_mask"),
                     ("pooled_projections", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")),
           scale_local="true_cfg_scale", cfg_local="do_true_cfg", scale_arg="true_cfg_scale", video=True,
           call_defaults=(("negative_prompt", ""),), latent_layout="video"),
    Family("auraflow", ("AuraFlowPipeline",), denoisers=("transformer",), prediction="flow", attention="joint",
           tokenizer="t5", schedulers=()),
    Family("cogview3plus", ("CogView3PlusPipeline",), denoisers=("transformer",), attention="joint", tokenizer="t5",
           schedulers=()),
    Family("latte", ("LattePipeline",), denoisers=("transformer",), tokenizer="t5", schedulers=(), video=True,
           call_defaults=(("clean_caption", False),), latent_layout="video_per_frame"),
    Family("bria", ("BriaPipeline",), denoisers=("transformer",), prediction="flow", attention="joint", tokenizer="t5",
           schedulers=(), latent_layout="packed"),
    Family("ltx", ("LTXPipeline",), denoisers=("transformer",), prediction="flow", tokenizer="t5", schedulers=(),
           video=True, latent_layout="packed_video"),
    Family("mochi", ("MochiPipeline",), denoisers=("transformer",), prediction="flow", attention="joint",
           tokenizer="t5", schedulers=(), video=True, latent_layout="video"),
    Family("allegro", ("AllegroPipeline",), denoisers=("transformer",), tokenizer="t5", schedulers=(), video=True,
           call_defaults=(("clean_caption", False),), latent_layout="video_frames_out"),
    Family("easyanimate", ("EasyAnimatePipeline",), denoisers=("transformer",), prediction="flow", attention="joint",
           tokenizer="qwen2vl", schedulers=(), video=True, latent_layout="video",
           call_defaults=(("negative_prompt", ""),)),  # it fails without one
)
BY_NAME = {f.name: f for f in DECLARED}
FAMILIES = {f.name: f.pipelines for f in DECLARED}  # family name -> pipeline class names
SUPPORTED = ", ".join(c for f in DECLARED for c in f.pipelines)


def family_of(class_name: str) -> str:
    for fam, names in FAMILIES.items():
        if class_name in names:
            return fam
    raise ShapefirstError(f"pipeline family {class_name!r} is not supported", f"use one of: {SUPPORTED}")


def listed_family(pipe) -> str | None:
    """The family of the pipeline's class, or of the first declared class it derives from (a user's
    subclass of StableDiffusionXLPipeline is "sdxl"); None for other classes."""
    for cls in type(pipe).__mro__:
        for fam, names in FAMILIES.items():
            if cls.__name__ in names:
                return fam
    return None


def family_by_structure(pipe) -> str | None:
    """The family from what the pipeline and its denoiser are, for classes not declared: diffusers' public
    CFG interface (`encode_prompt` and a `do_classifier_free_guidance` property) and a denoiser of a known
    type: UNet2DConditionModel without class labels ("sd" with no added conditioning, "sdxl" with
    text_time), SD3Transformer2DModel ("sd3"). None otherwise. Such a pipeline's CFG batch is verified
    while it runs (shapefirst.run_state.RunState.verify_cfg_batch)."""
    from diffusers import SD3Transformer2DModel, UNet2DConditionModel

    if not callable(getattr(pipe, "encode_prompt", None)) or \
            not isinstance(getattr(type(pipe), "do_classifier_free_guidance", None), property):
        return None
    den = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
    if isinstance(den, UNet2DConditionModel) and den.config.class_embed_type is None:
        return {None: "sd", "text_time": "sdxl"}.get(den.config.addition_embed_type)
    return "sd3" if isinstance(den, SD3Transformer2DModel) else None


def family_of_pipe(pipe) -> str:
    """The family of a pipeline object: listed_family, else family_by_structure. Not-supported error
    (naming what is supported) otherwise."""
    fam = listed_family(pipe) or family_by_structure(pipe)
    return fam if fam is not None else family_of(type(pipe).__name__)


def family(pipe) -> Family:
    """The declaration of the pipeline's family (see family_of_pipe)."""
    return BY_NAME[family_of_pipe(pipe)]
