"""Pipeline helpers every family shares: the denoiser, its latent input, whether a call runs
classifier-free guidance, and prompt encoding through each pipeline's public encode_prompt."""
from __future__ import annotations

import torch

from .errors import ShapefirstError
from .families import family, family_of_pipe
from .pipeline_call import PipelineCall, cfg_of_call, running_call
from .tokens import PAD, analyze_prompt


def encode_prompts(pipe, prompts: list[str], batch: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """(cond, uncond) embeddings [N, L, D] as the pipeline makes them (uncond: the empty prompt)."""
    conds, unconds = [], []
    for s in range(0, len(prompts), batch):
        out = _encode(pipe, list(prompts[s:s + batch]))
        c, u = _cond_uncond(pipe, out)
        conds.append(c)
        unconds.append(u)
    return torch.cat(conds), torch.cat(unconds)


def _encode(pipe, prompts: list[str]) -> tuple:
    """The pipeline's encode_prompt with the empty negative prompt (SD3's prompt_2/3 = the prompt)."""
    more = {"prompt_2": None, "prompt_3": None} if family_of_pipe(pipe) == "sd3" else {}
    return pipe.encode_prompt(prompt=prompts, device=pipe.device, num_images_per_prompt=1,
                              do_classifier_free_guidance=True, **more, **_empty_negative(pipe))


def _empty_negative(pipe) -> dict:
    """encode_prompt arguments for the empty negative prompt the pipeline's own call uses: PixArt's
    default is negative_prompt="" (None fails in its caption preprocessing; clean_caption=False as in
    call_defaults); the others take None (SDXL then zeroes it when force_zeros_for_empty_prompt)."""
    if family_of_pipe(pipe) == "pixart":
        return {"negative_prompt": "", "clean_caption": False}
    return {"negative_prompt": None}


def embeds_call(pipe, cond: torch.Tensor, uncond: torch.Tensor, infos: list | None = None) -> dict:
    """Pipeline call arguments for given (cond, uncond) embeddings [N, L, D], edited or not, with what
    else the family needs from the prompts they were made from (their token infos, tokens.analyze_prompt;
    an edited embedding keeps its prompt's): SDXL and SD3 their pooled text embeddings (an edit of the
    token sequence leaves the pooled vector alone), PixArt the attention masks its encode_prompt makes
    (1 on every position that is not padding; the empty prompt's for uncond)."""
    out = {"prompt_embeds": cond, "negative_prompt_embeds": uncond}
    fam = family_of_pipe(pipe)
    if fam == "sd":
        return out
    if infos is None or len(infos) != cond.shape[0]:
        raise ShapefirstError(f"{fam} embeddings need their prompts' token infos (pooled embeddings or mask)",
                              "pass infos=[tokens.analyze_prompt(pipe.tokenizer, p) for p in prompts]")
    if fam in ("sdxl", "sd3"):
        enc = _encode(pipe, [i.prompt for i in infos])
        return {**out, "pooled_prompt_embeds": enc[2], "negative_pooled_prompt_embeds": enc[3]}

    def mask(inf) -> list[int]:
        return [int(c != PAD) for c in inf.classes]
    empty = mask(analyze_prompt(pipe.tokenizer, "", max_length=cond.shape[1]))
    dev = cond.device
    return {**out, "prompt_attention_mask": torch.tensor([mask(i) for i in infos], device=dev),
            "negative_prompt_attention_mask": torch.tensor([empty] * cond.shape[0], device=dev)}


def check_token_edits(pipe, analysis: str) -> None:
    """The embedding interventions edit one text encoder's token sequence ([SOS], words, [EOS] block);
    SD3 conditions on the CLIP and T5 sequences concatenated, which have no single [EOS] block."""
    if family_of_pipe(pipe) == "sd3":
        raise ShapefirstError(f"{analysis} edits one text encoder's [EOS] block, and SD3 attends to its CLIP and T5 "
                              "sequences concatenated", "run it on SD 1.x/2.x, SDXL or PixArt; on SD3 run stages "
                              "and attention")


def attention_context(pipe, emb: torch.Tensor) -> torch.Tensor:
    """What the cross-attention layers see for text embeddings `emb`: PixArt's transformer projects
    the T5 states with its caption_projection first; a UNet takes them as they are."""
    proj = getattr(denoiser_of(pipe), "caption_projection", None)
    if proj is None:
        return emb
    with torch.no_grad():
        return proj(emb.to(device=pipe.device, dtype=denoiser_of(pipe).dtype))


def _cond_uncond(pipe, out) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt_embeds, negative_prompt_embeds) from a family's encode_prompt output: SD, SDXL and SD3
    return them first; PixArt returns (embeds, mask, negative embeds, negative mask)."""
    return (out[0], out[2]) if family_of_pipe(pipe) == "pixart" else (out[0], out[1])


PIXART_BINS = {"PixArtAlphaPipeline": (32, 64, 128), "PixArtSigmaPipeline": (32, 64, 128, 256)}


def call_defaults(pipe, given: dict | None = None) -> dict:
    """Call arguments a family's pipeline needs from shapefirst (a caller's own `given` ones win): PixArt
    rewrites captions with bs4/ftfy unless clean_caption=False (not installed here; diffusers would warn
    at every call), and its resolution binning accepts only its trained sample sizes (a shapes-world
    transformer's 16 is none of them: use_resolution_binning=False); with negative_prompt_embeds its
    default negative_prompt "" clashes (negative_prompt=None)."""
    given = given or {}
    declared = {k: v for k, v in family(pipe).call_defaults if k not in given}  # families.Family.call_defaults
    if family_of_pipe(pipe) != "pixart":
        return declared
    out = {"clean_caption": False}
    if "negative_prompt_embeds" in given:
        out["negative_prompt"] = None
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
    """Does this denoiser call run classifier-free guidance (rows = [uncond..., cond...])? The one rule of
    pipeline_call.cfg_of_call, on `pipe`'s call in progress if there is one (else on the pipeline alone)."""
    call = running_call()
    return cfg_of_call(call if call is not None and call.pipe is pipe else PipelineCall(pipe, None), sample)


def denoiser_of(pipe) -> torch.nn.Module:
    for name in ("unet", "transformer"):
        mod = getattr(pipe, name, None)
        if isinstance(mod, torch.nn.Module):
            return mod
    raise ShapefirstError(f"{type(pipe).__name__} has no `unet` or `transformer` denoiser",
                          "pass a diffusers text-to-image pipeline")
