"""Pipeline helpers every family shares: the denoiser, its latent input, whether a call runs
classifier-free guidance, and prompt encoding through each pipeline's public encode_prompt.

Prompt embeddings (encode_prompts, embeds_call) are made for EMBEDDING_FAMILIES, the one list the embedding analyses
(eos-swap, token-ablation), interventions and the report read: SD, SDXL, PixArt, SD3, and the T5 families Wan and
CogVideoX (prompt_embeds alone; Wan's zero-padded), Flux (T5 prompt_embeds and the pooled CLIP vector; its true CFG's
empty negative prompt encoded the same way) and Chroma (T5 with its attention masks). Each is the pipeline's own
output bit for bit, so a call given them makes the pipeline's own image (tests/test_family_embeddings.py)."""
from __future__ import annotations


import torch

from .errors import ShapefirstError
from .families import family, family_of_pipe
from .pipeline_call import PipelineCall, call_default, cfg_of_call, per_prompt_argument, running_call  # noqa: F401 (call_default: public here too)
from .tokens import PAD, denoiser_token_info


EMBEDDING_FAMILIES = ("sd", "sdxl", "pixart", "sd3", "wan", "cogvideox", "flux", "chroma")
"""The families whose prompt embeddings encode_prompts makes and embeds_call passes back to the pipeline, edited or
not: the embedding analyses (eos-swap, token-ablation; interventions.require_embeddings, the report's sections) run
on these (where tokens.require_end_token lets them)."""
T5_LENGTH = ("pixart", "sd3", "wan", "cogvideox", "flux", "chroma")  # encode_prompt takes max_sequence_length
EOS_BLOCK_NOTES = {
    "wan": "Wan's pipeline zeroes its umT5 states after </s>, so a prompt's [EOS] block is its </s> alone: the swap "
           "moves B's </s> (the zeros after it are A's and B's alike)",
    "chroma": "Chroma masks every T5 position after </s> but the first padding one out of the attention, so the "
              "[EOS] block the transformer sees is </s> and one padding state: the swap moves those two of B's (the "
              "mask stays A's, which has them at the same positions)",
    "flux": "Flux's pooled CLIP vector (pooled_projections) stays the words prompt's: the swap moves the T5 [EOS] "
            "block only, and the pooled vector still carries the whole of A's prompt",
}
"""What the [EOS] swap moves on a family where that is not the whole T5 [EOS] block (or not all of the text)."""


def require_embeddings(pipe, analysis: str) -> None:
    """One line for a pipeline whose prompt embeddings encode_prompts does not make (tokens.swapped and
    interventions.eos_switch still work on the pipeline's own prompt_embeds)."""
    fam = family_of_pipe(pipe)
    if fam not in EMBEDDING_FAMILIES:
        raise ShapefirstError(f"{analysis} makes its prompt embeddings with shapefirst.pipeline.encode_prompts, which "
                              f"makes them for {', '.join(EMBEDDING_FAMILIES)}, not for {fam}",
                              "edit the pipeline's own prompt_embeds with tokens.swapped / interventions.eos_switch")


def eos_block_note(pipe) -> str | None:
    """What an [EOS] swap moves on this family where that is not simply B's whole [EOS] block (EOS_BLOCK_NOTES)."""
    return EOS_BLOCK_NOTES.get(family_of_pipe(pipe))


def encode_prompts(pipe, prompts: list[str], batch: int = 64,
                   max_sequence_length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(cond, uncond) embeddings [N, L, D] as the pipeline makes them (uncond: the empty prompt). T5 families:
    max_sequence_length positions, default the pipeline call's own (call_default)."""
    require_embeddings(pipe, "encode_prompts")
    conds, unconds = [], []
    for s in range(0, len(prompts), batch):
        out = _encode(pipe, list(prompts[s:s + batch]), max_sequence_length)
        conds.append(out["prompt_embeds"])
        unconds.append(out["negative_prompt_embeds"])
    return torch.cat(conds), torch.cat(unconds)


@torch.no_grad()
def _encode(pipe, prompts: list[str], max_sequence_length: int | None = None) -> dict:
    """The pipeline's public encode_prompt with the empty negative prompt, as {call argument: tensor} (the names
    the pipeline's call takes them by), without autograd as in the pipeline's call (a text encoder's attention may
    take another kernel with autograd on: T5's differs in the last bits). SD3: prompt_2/3 = the prompt. Flux's
    encode_prompt makes one prompt's embeddings: the empty prompt is encoded as its true CFG encodes its
    negative_prompt=""."""
    fam = family_of_pipe(pipe)
    n = max_sequence_length or call_default(pipe, "max_sequence_length")
    length = {"max_sequence_length": int(n)} if fam in T5_LENGTH and n else {}
    dev = {"device": pipe.device}
    if fam == "flux":
        c, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None, num_images_per_prompt=1, **dev, **length)
        u, upooled, _ = pipe.encode_prompt(prompt=[""] * len(prompts), prompt_2=None, num_images_per_prompt=1,
                                           **dev, **length)
        return {"prompt_embeds": c, "negative_prompt_embeds": u, "pooled_prompt_embeds": pooled,
                "negative_pooled_prompt_embeds": upooled}
    per = {per_prompt_argument(pipe, "encode_prompt"): 1}
    more = {"prompt_2": None, "prompt_3": None} if fam == "sd3" else {}
    out = pipe.encode_prompt(prompt=prompts, do_classifier_free_guidance=True, **dev, **per, **length, **more,
                             **_empty_negative(pipe))
    names = ENCODE_OUTPUTS.get(fam, ("prompt_embeds", "negative_prompt_embeds"))
    return {k: v for k, v in zip(names, out) if k is not None}


ENCODE_OUTPUTS = {  # what a family's encode_prompt returns, by the names its call takes them (None: not passed)
    "sdxl": ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds"),
    "sd3": ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds"),
    "pixart": ("prompt_embeds", "prompt_attention_mask", "negative_prompt_embeds", "negative_prompt_attention_mask"),
    "chroma": ("prompt_embeds", None, "prompt_attention_mask", "negative_prompt_embeds", None,
               "negative_prompt_attention_mask"),
}


def _empty_negative(pipe) -> dict:
    """encode_prompt arguments for the empty negative prompt the pipeline's own call uses: PixArt's
    default is negative_prompt="" (None fails in its caption preprocessing; clean_caption=False as in
    call_defaults); the others take None (SDXL then zeroes it when force_zeros_for_empty_prompt; Wan, CogVideoX
    and Chroma encode "")."""
    if family_of_pipe(pipe) == "pixart":
        return {"negative_prompt": "", "clean_caption": False}
    return {"negative_prompt": None}


def embeds_call(pipe, cond: torch.Tensor, uncond: torch.Tensor, infos: list | None = None) -> dict:
    """Pipeline call arguments for given (cond, uncond) embeddings [N, L, D], edited or not, with what
    else the family needs from the prompts they were made from (their token infos, tokens.denoiser_token_info;
    an edited embedding keeps its prompt's): SDXL, SD3 and Flux their pooled text embeddings (an edit of the
    token sequence leaves the pooled vector alone), PixArt and Chroma the attention masks their encode_prompt
    makes (PixArt: 1 on every position that is not padding; Chroma: also on the first padding position; the empty
    prompt's for uncond). SD, Wan and CogVideoX need nothing else."""
    out = {"prompt_embeds": cond, "negative_prompt_embeds": uncond}
    fam = family_of_pipe(pipe)
    if fam in ("sd", "wan", "cogvideox"):
        return out
    if infos is None or len(infos) != cond.shape[0]:
        raise ShapefirstError(f"{fam} embeddings need their prompts' token infos (pooled embeddings or mask)",
                              "pass infos=[tokens.denoiser_token_info(pipe, p) for p in prompts]")
    if fam in ("sdxl", "sd3", "flux"):
        enc = _encode(pipe, [i.prompt for i in infos], cond.shape[1] if fam == "flux" else None)
        return {**out, "pooled_prompt_embeds": enc["pooled_prompt_embeds"],
                "negative_pooled_prompt_embeds": enc["negative_pooled_prompt_embeds"]}
    empty = denoiser_token_info(pipe, "", max_sequence_length=cond.shape[1])
    mask = _chroma_mask if fam == "chroma" else _pixart_mask
    dt = {"dtype": cond.dtype} if fam == "chroma" else {}  # Chroma's mask is in the text encoder's dtype
    return {**out, "prompt_attention_mask": torch.tensor([mask(i) for i in infos], device=cond.device, **dt),
            "negative_prompt_attention_mask": torch.tensor([mask(empty)] * cond.shape[0], device=cond.device, **dt)}


def _pixart_mask(info) -> list[int]:
    """PixArt's text mask: the tokenizer's (1 on every position that is not padding)."""
    return [int(c != PAD) for c in info.classes]


def _chroma_mask(info) -> list[int]:
    """Chroma's text mask (ChromaPipeline._get_t5_prompt_embeds): 1 on the tokenizer's positions and on the first
    padding position after them."""
    n = sum(c != PAD for c in info.classes)
    return [int(i <= n) for i in range(len(info.classes))]


def attention_context(pipe, emb: torch.Tensor) -> torch.Tensor:
    """What the cross-attention layers see for text embeddings `emb`: PixArt's transformer projects
    the T5 states with its caption_projection first; a UNet takes them as they are."""
    proj = getattr(denoiser_of(pipe), "caption_projection", None)
    if proj is None:
        return emb
    with torch.no_grad():
        return proj(emb.to(device=pipe.device, dtype=denoiser_of(pipe).dtype))


PIXART_BINS = {"PixArtAlphaPipeline": (32, 64, 128), "PixArtSigmaPipeline": (32, 64, 128, 256)}


def call_defaults(pipe, given: dict | None = None) -> dict:
    """Call arguments a family's pipeline needs from shapefirst (a caller's own `given` ones win): PixArt
    rewrites captions with bs4/ftfy unless clean_caption=False (not installed here; diffusers would warn
    at every call), and its resolution binning accepts only its trained sample sizes (a shapes-world
    transformer's 16 is none of them: use_resolution_binning=False); with negative_prompt_embeds its
    default negative_prompt "" clashes (negative_prompt=None). A family's declared negative_prompt (Flux, Qwen-Image:
    their true CFG runs only with one) is left out when negative_prompt_embeds are given: the pipeline refuses both,
    and the embeddings are the negative branch."""
    given = given or {}
    declared = {k: v for k, v in family(pipe).call_defaults  # families.Family.call_defaults
                if k not in given and not (k == "negative_prompt" and "negative_prompt_embeds" in given)}
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
