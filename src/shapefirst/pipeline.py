"""Pipeline helpers every family shares: the denoiser, its latent input, whether a call runs
classifier-free guidance, and prompt encoding through each pipeline's public encode_prompt."""
from __future__ import annotations

import torch

from .errors import ShapefirstError
from .models import family_of_pipe


def encode_prompts(pipe, prompts: list[str], batch: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """(cond, uncond) embeddings [N, L, D] as the pipeline makes them (uncond: the empty prompt)."""
    conds, unconds = [], []
    for s in range(0, len(prompts), batch):
        out = pipe.encode_prompt(prompt=list(prompts[s:s + batch]), device=pipe.device, num_images_per_prompt=1,
                                 do_classifier_free_guidance=True, negative_prompt=None)
        c, u = _cond_uncond(pipe, out)
        conds.append(c)
        unconds.append(u)
    return torch.cat(conds), torch.cat(unconds)


def _cond_uncond(pipe, out) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt_embeds, negative_prompt_embeds) from a family's encode_prompt output: SD, SDXL and SD3
    return them first; PixArt returns (embeds, mask, negative embeds, negative mask)."""
    return (out[0], out[2]) if family_of_pipe(pipe) == "pixart" else (out[0], out[1])


PIXART_BINS = {"PixArtAlphaPipeline": (32, 64, 128), "PixArtSigmaPipeline": (32, 64, 128, 256)}


def call_defaults(pipe, given: dict | None = None) -> dict:
    """Call arguments a family's pipeline needs from shapefirst (a caller's own `given` ones win): PixArt
    rewrites captions with bs4/ftfy unless clean_caption=False (not installed here; diffusers would warn
    at every call), and its resolution binning accepts only its trained sample sizes (a shapes-world
    transformer's 16 is none of them: use_resolution_binning=False)."""
    given = given or {}
    if family_of_pipe(pipe) != "pixart":
        return {}
    out = {"clean_caption": False}
    bins = PIXART_BINS.get(type(pipe).__name__, (32, 64, 128))
    if denoiser_of(pipe).config.sample_size not in bins:
        out["use_resolution_binning"] = False
    return {k: v for k, v in out.items() if k not in given}


def timestep_input(args, kwargs):
    """The denoiser's timestep argument: positional second (UNet, PixArt) or `timestep=` (SD3)."""
    return args[1] if len(args) > 1 else kwargs.get("timestep")


def timestep_value(t) -> float:
    """A timestep argument on the host (every row has the same one; a device tensor is read once)."""
    return float(t.flatten()[0]) if isinstance(t, torch.Tensor) else float(t)


def latent_input(args, kwargs):
    """The denoiser's latent input: positional first argument (UNet, PixArt) or `sample=` /
    `hidden_states=` (SD3 passes every argument by keyword)."""
    if args:
        return args[0]
    return kwargs["sample"] if "sample" in kwargs else kwargs.get("hidden_states")


def cfg_active(pipe, sample: torch.Tensor) -> bool:
    """Does this denoiser call run classifier-free guidance (rows = [uncond..., cond...])?
    See the module docstring for the rule per family (PixArt's rule reads the latents: one host sync)."""
    rows = sample.shape[0]
    if rows % 2:
        return False
    flag = getattr(pipe, "do_classifier_free_guidance", None)
    if flag is None and hasattr(pipe, "guidance_scale") and not callable(pipe.guidance_scale):
        try:
            flag = float(pipe.guidance_scale) > 1.0
        except (TypeError, ValueError):
            flag = None
    if flag is None:  # PixArt: read the call itself
        half = rows // 2
        return bool(torch.equal(sample[:half], sample[half:]))
    return bool(flag)


def denoiser_of(pipe) -> torch.nn.Module:
    for name in ("unet", "transformer"):
        mod = getattr(pipe, name, None)
        if isinstance(mod, torch.nn.Module):
            return mod
    raise ShapefirstError(f"{type(pipe).__name__} has no `unet` or `transformer` denoiser",
                          "pass a diffusers text-to-image pipeline")
