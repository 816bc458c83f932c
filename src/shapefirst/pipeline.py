"""Pipeline helpers every family shares: prompt encoding through each pipeline's public encode_prompt."""
from __future__ import annotations

import torch


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
    from .models import family_of_pipe

    return (out[0], out[2]) if family_of_pipe(pipe) == "pixart" else (out[0], out[1])
