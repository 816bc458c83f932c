"""Token ablations: which token positions of the prompt embedding decide the image?

Variants (conditional branch only; the unconditional branch stays the empty prompt's embedding):
  plain           the prompt's embedding
  keep_eos_<n>    keep the first n positions of the [EOS] block (the first EOS, then the padding),
                  ZERO the rest (tokens.keep_first_eos(fill="zero")); n=0 zeroes the whole block,
                  n="all" keeps it all (the same tensor as plain: plain's images are reused)
  semantic_zero   semantic tokens -> zeros
  semantic_noise  semantic tokens -> Gaussian noise rescaled to each vector's norm
  eos_zero        the [EOS] block (eos, eos_pad, pad) -> zeros
  eos_noise       the [EOS] block -> norm-matched Gaussian noise
  sos_only        every position but [SOS] (position 0) -> zeros (zeros, not the empty prompt's
                  embeddings: the empty prompt's positions 1.. are themselves an [EOS] block)
  eos_only        semantic tokens -> zeros ([SOS] and the [EOS] block kept)
  eos_sub_keys    cross-attention KEYS from the prompt with the [EOS] block of prompt i+1 (cyclic,
                  tokens.swap_eos rule), VALUES from the prompt itself
  eos_sub_values  keys from the prompt, values from the substituted embedding
  eos_sub_both    keys and values from the substituted embedding (= conditioning on the swap)
Noise for prompt i is drawn from torch.Generator("cpu").manual_seed(seed + i); image i uses seed + i
in every variant. A variant whose embeddings equal plain's exactly reuses plain's images.

K/V substitution: `kv_substitution(pipe)` puts a KVSubstituteProcessor on every cross-attention
layer (processor names ending in "attn2.processor") and yields the shared KVState; set
`state.set(alt, mode)` before generating and `state.clear()` after (the context restores the
original processor objects on exit, also after an exception). While no alternative is set the
processor calls the original one. With an alternative it still calls the original processor, and
forward pre-hooks on the layer's key / value projections (`to_k`, `to_v`) feed them the substituted
context: keys from one context and values from the other; only the conditional rows get the
alternative (CFG batch [uncond, cond]: the second half; shapefirst's guidance hook, when it runs
only some rows, is followed through its shared RunState; without CFG every row). Fused QKV
projections are refused with a clear error. A denoiser without diffusers' classic cross-attention layers (Wan's,
Flux's, CogVideoX's and Chroma's attention) runs every other variant: the result's notes give kv_substitution's
one-line reason for leaving the eos_sub_* variants out.
Which pipelines: those whose embeddings shapefirst.pipeline makes (pipeline.EMBEDDING_FAMILIES) and whose text has
one end token (tokens.require_end_token). A video (Wan, CogVideoX): L1 to plain over every frame; judged, CLIP-scored
and stored by its middle frame.
Reduction check: with alternative == original the output is BIT-IDENTICAL to a run with the
original processor (the same processor on the same values), AttnProcessor2_0 included.

KL of attention maps against uniform (per variant, for a few calls, mean over the positions of
[SOS], semantic tokens and the [EOS] block) when `shapefirst.attention.capture_attention` is
importable; not for the eos_sub_* variants (the capture recomputes maps from the pipeline's
encoder states, not from the substituted keys).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import ShapefirstError
from ..families import family
from ..generate import check_prompts, count_calls
from ..guidance import GuidanceSchedule
from ..metrics import l1
from ..results import Result, yerr
from ..interventions import KV_MODES, KVState, KVSubstituteProcessor, keep_first_eos, kv_substitution, replace_class  # noqa: F401 (KV names: public here too)
from ..tokens import EOS, EOS_PAD, PAD, SEMANTIC, SOS, denoiser_token_info, require_end_token
from ..generate import batches, generate_embeds
from ..metrics import ci_dict, default_judge, judged_labels, share, to_uint8
from ..pipeline import attention_context, encode_prompts, require_embeddings
from ..results import image_grid, save_figure
from ..tokens import swapped
from .eos_swap import middle_frames
from .registry import Analysis, Inputs, Settings, Summary, share_text

try:  # written separately; the KL metric is skipped when it is absent
    from ..attention import capture_attention as _capture_attention
except ImportError:  # pragma: no cover - depends on the checkout
    _capture_attention = None

DEFAULT_N_EOS = (0, 1, 2, 4, 8, 16, "all")
EOS_BLOCK = (EOS, EOS_PAD, PAD)
KL_GROUPS = {"sos": (SOS,), "semantic": (SEMANTIC,), "eos_block": EOS_BLOCK}
FIXED_VARIANTS = ("semantic_zero", "semantic_noise", "eos_zero", "eos_noise", "sos_only", "eos_only")
KV_VARIANTS = {"eos_sub_keys": "keys", "eos_sub_values": "values", "eos_sub_both": "both"}


# -- variants -----------------------------------------------------------------------------------
def _n_label(n) -> str:
    return "all" if n == "all" else str(int(n))


def variant_names(n_eos=DEFAULT_N_EOS, n_prompts: int = 2) -> list[str]:
    names = ["plain"] + [f"keep_eos_{_n_label(n)}" for n in n_eos] + list(FIXED_VARIANTS)
    if n_prompts >= 2:
        names += list(KV_VARIANTS)
    return names


def variant_embedding(name: str, emb: torch.Tensor, info, generator: torch.Generator | None = None) -> torch.Tensor:
    """The conditional embedding [1, L, D] of an embedding variant (see the module docstring)."""
    if name == "plain":
        return emb.clone()
    if name.startswith("keep_eos_"):
        n = name[len("keep_eos_"):]
        return keep_first_eos(emb, info, emb.shape[1] if n == "all" else int(n), fill="zero")
    if name == "semantic_zero":
        return replace_class(emb, info, SEMANTIC, "zero")
    if name == "semantic_noise":
        return replace_class(emb, info, SEMANTIC, "noise", generator)
    if name == "eos_zero":
        return replace_class(emb, info, EOS_BLOCK, "zero")
    if name == "eos_noise":
        return replace_class(emb, info, EOS_BLOCK, "noise", generator)
    if name == "sos_only":
        return replace_class(emb, info, (SEMANTIC,) + EOS_BLOCK, "zero")
    if name == "eos_only":
        return replace_class(emb, info, SEMANTIC, "zero")
    raise ShapefirstError(f"unknown ablation variant {name!r}", "use a name from variant_names()")


def _check_n_eos(n_eos) -> list:
    out = []
    for n in n_eos:
        if n == "all" or n is None:
            out.append("all")
        elif isinstance(n, (int, np.integer)) and n >= 0:
            out.append(int(n))
        else:
            raise ShapefirstError(f"n_eos entry {n!r} is not an integer >= 0 or 'all'",
                                  "pass e.g. (0, 1, 2, 4, 'all')")
    return list(dict.fromkeys(out))


def _kl_summary(cap, calls, infos) -> dict:
    out = {}
    for c in calls:
        kl = cap.kl_to_uniform(c)  # [images, tokens]
        row = {}
        for group, classes in KL_GROUPS.items():
            vals = []
            for i, info in enumerate(infos):
                pos = [p for cl in classes for p in info.positions(cl)]
                if pos:
                    vals.append(float(kl[i, pos].double().mean()))
            row[group] = float(np.mean(vals)) if vals else float("nan")
        out[str(c)] = row
    return out


def run_token_ablation(pipe, prompts, targets=None, steps: int = 50, seed: int = 0, n_eos=DEFAULT_N_EOS,
                       batch: int = 8, judge_fn=None, clip=None, schedule: GuidanceSchedule | None = None,
                       attention_kl: bool = True, kl_calls=None, keep_images: int = 4) -> Result:
    """The token ablations of the module docstring -> Result(kind="token_ablation").

    targets: one label dict per prompt (judged accuracy per attribute with Wilson CIs; judge_fn:
    image -> labels, default the world's judge). clip: metrics.Clip (score vs the prompt).
    attention_kl: KL of attention maps vs uniform at kl_calls (default first, middle, last call).
    keep_images: prompts whose images are stored (arrays["images"]: [variants, k, H, W, 3] uint8)."""
    require_end_token(pipe, "token-ablation")
    require_embeddings(pipe, "token-ablation")
    prompts = check_prompts(prompts)
    if targets is not None:
        targets = [dict(t) for t in targets]
        if len(targets) != len(prompts):
            raise ShapefirstError(f"{len(targets)} targets for {len(prompts)} prompts",
                                  "pass one label dict per prompt")
        judge_fn = judge_fn or default_judge()
    n_eos = _check_n_eos(n_eos)
    n = len(prompts)
    n_calls = count_calls(pipe, steps)
    kv_refusal = _kv_refusal(pipe) if n >= 2 else None
    names = [v for v in variant_names(n_eos, n) if kv_refusal is None or v not in KV_VARIANTS]
    notes = []
    if n < 2:
        notes.append("one prompt: no K/V substitution variants (they need another prompt's [EOS] block)")
    if kv_refusal is not None:
        notes.append(f"no K/V substitution variants: {kv_refusal}")
    kl_on = attention_kl and _capture_attention is not None
    if attention_kl and not kl_on:
        notes.append("shapefirst.attention is not available: no attention KL")
    kl_calls = sorted({min(max(int(c), 0), n_calls - 1) for c in (kl_calls if kl_calls is not None
                                                                   else (0, n_calls // 2, n_calls - 1))})

    cond, uncond = encode_prompts(pipe, prompts)
    infos = [denoiser_token_info(pipe, p, max_sequence_length=cond.shape[1]) for p in prompts]
    gen = _Generator(pipe, cond, uncond, infos, steps, seed, schedule, batch, kl_calls if kl_on else None)
    images, identical, kl = gen.embedding_variants(names)
    if n >= 2 and kv_refusal is None:
        images.update(gen.kv_variants())
    scores, judged_all = _scores(names, images, kl, prompts, targets, judge_fn, clip)
    k = min(keep_images, n)
    arrays = {"images": torch.stack([to_uint8(middle_frames(images[v])[:k]) for v in names])}
    data = {"variants": names, "prompts": prompts, "targets": targets, "scores": scores, "judged": judged_all or None,
            "identical_to": identical, "n_eos": [_n_label(x) for x in n_eos],
            "settings": {"steps": steps, "denoiser_calls": n_calls, "seed": seed, "batch": batch,
                         "schedule": (schedule or GuidanceSchedule()).to_dict(),
                         "kl_calls": kl_calls if kl_on else None,
                         "stored_images": k,
                         "seeds": "prompt i uses seed + i in every variant; noise for prompt i: Generator seed + i"},
            "rules": {"keep_eos": "keep the first n positions of the [EOS] block, "
                                  "zero the rest (n=0 zeroes the whole block)",
                      "sos_only": "every position but 0 zeroed",
                      "eos_only": "semantic positions zeroed",
                      "noise": "Gaussian noise rescaled to each replaced vector's L2 norm",
                      "eos_sub": "prompt i's cross-attention keys/values use prompt (i+1) mod N's [EOS] block "
                                 "(tokens.swap_eos rule), conditional rows only",
                      "kv_reduction": "alternative == original is bit-identical to AttnProcessor2_0"},
            "token_info": [{"prompt": p, "n_semantic": i.n_semantic, "eos_index": i.eos_index}
                           for p, i in zip(prompts, infos)],
            "notes": notes}
    if family(pipe).video:
        data["settings"]["video"] = "L1 to plain over every frame; each video's middle frame judged, scored, stored"
    return Result("token_ablation", data, arrays)


def _kv_refusal(pipe) -> str | None:
    """Why K/V substitution cannot run on this pipeline's denoiser (kv_substitution's one line), or None."""
    try:
        with kv_substitution(pipe):
            pass
    except ShapefirstError as e:
        return str(e)
    return None


class _Generator:
    """Images of every variant, batch by batch (prompt i seeded with seed + i in every variant)."""

    def __init__(self, pipe, cond, uncond, infos, steps, seed, schedule, batch, kl_calls):
        self.pipe, self.cond, self.uncond, self.infos = pipe, cond, uncond, infos
        self.steps, self.seed, self.schedule, self.batch, self.kl_calls = steps, seed, schedule, batch, kl_calls
        self.n = cond.shape[0]

    def embedding_variants(self, names):
        """Variants that change the prompt embedding; a variant equal to plain reuses plain's images."""
        images, identical, kl = {}, {}, {}
        for name in names:
            if name in KV_VARIANTS:
                continue
            emb = torch.cat([variant_embedding(name, self.cond[i:i + 1], self.infos[i],
                                               torch.Generator("cpu").manual_seed(self.seed + i))
                             for i in range(self.n)])
            if name != "plain" and torch.equal(emb, self.cond):
                images[name], identical[name] = images["plain"], "plain"
                if "plain" in kl:
                    kl[name] = kl["plain"]
                continue
            images[name], kls = self._generate(emb)
            if kls:
                kl[name] = {c: {g: float(sum(m * r[c][g] for m, r in kls) / self.n) for g in KL_GROUPS}
                            for c in kls[0][1]}
        return images, identical, kl

    def _generate(self, emb):
        out, kls = [], []
        for s, e in batches(self.n, self.batch):
            if self.kl_calls is not None:
                with _capture_attention(self.pipe, keep="mean", calls=self.kl_calls, n_images=e - s) as cap:
                    out.append(generate_embeds(self.pipe, emb[s:e], self.uncond[s:e], self.steps, self.seed + s,
                                               self.schedule, infos=self.infos[s:e]))
                kls.append((e - s, _kl_summary(cap, self.kl_calls, self.infos[s:e])))
            else:
                out.append(generate_embeds(self.pipe, emb[s:e], self.uncond[s:e], self.steps, self.seed + s,
                                           self.schedule, infos=self.infos[s:e]))
        return np.concatenate(out), kls

    def kv_variants(self) -> dict:
        """[EOS] of prompt (i+1) mod N in the cross-attention keys and/or values only."""
        perm = [(i + 1) % self.n for i in range(self.n)]
        alt = attention_context(self.pipe, swapped(self.cond, self.infos,
                                                   self.cond[perm], [self.infos[j] for j in perm]))
        images = {}
        for name, mode in KV_VARIANTS.items():
            out = []
            for s, e in batches(self.n, self.batch):
                with kv_substitution(self.pipe) as st:
                    st.set(alt[s:e], mode)
                    out.append(generate_embeds(self.pipe, self.cond[s:e], self.uncond[s:e], self.steps, self.seed + s,
                                               self.schedule, infos=self.infos[s:e]))
            images[name] = np.concatenate(out)
        return images


def _scores(names, images, kl, prompts, targets, judge_fn, clip):
    scores, judged_all = {}, {}
    for name in names:
        sc = {"l1_to_plain": ci_dict(l1(images[name], images["plain"]))}
        if targets is not None:
            judged = judged_all[name] = judged_labels(judge_fn, middle_frames(images[name]))
            attrs = sorted({a for t in targets for a in t})
            sc["judged"] = {a: share(sum(j.get(a) == t.get(a) for j, t in zip(judged, targets) if a in t),
                                     sum(a in t for t in targets)) for a in attrs}
            sc["judged"]["all"] = share(sum(all(j.get(a) == v for a, v in t.items()) for j, t in zip(judged, targets)),
                                        len(prompts))
        if clip is not None:
            sc["clip"] = ci_dict(clip.clip_score(middle_frames(images[name]), prompts).double().numpy())
        if name in kl:
            sc["kl_to_uniform"] = kl[name]
        scores[name] = sc
    return scores, judged_all


def _metric(sc: dict) -> tuple[str, float, list]:
    if "judged" in sc:
        return "judged accuracy (all attributes)", sc["judged"]["all"]["rate"], sc["judged"]["all"]["ci"]
    if "clip" in sc:
        return "CLIP score vs prompt", sc["clip"]["mean"], sc["clip"]["ci"]
    return "mean L1 to plain", sc["l1_to_plain"]["mean"], sc["l1_to_plain"]["ci"]


def plot_token_ablation(result: Result, folder: str | Path, max_prompts: int = 4) -> list[Path]:
    """Bars of the main metric per variant, the keep-first-n [EOS] curve, an image grid -> PNG paths."""
    from matplotlib.figure import Figure

    folder = Path(folder)
    d, paths = result.data, []
    names = d["variants"]
    label = _metric(d["scores"][names[0]])[0]

    fig = Figure(figsize=(max(5, 0.6 * len(names) + 1), 3.4))
    ax = fig.subplots()
    x = np.arange(len(names))
    sc0 = d["scores"][names[0]]
    series = ([(a, [d["scores"][v]["judged"][a] for v in names]) for a in sc0["judged"]] if "judged" in sc0
              else [(label, [dict(zip(("name", "rate", "ci"), _metric(d["scores"][v]))) for v in names])])
    width = 0.8 / len(series)
    for j, (lab, rows) in enumerate(series):
        ys = np.array([r["rate"] for r in rows], dtype=float)
        err = np.nan_to_num(yerr(ys, [r["ci"][0] for r in rows], [r["ci"][1] for r in rows]))
        ax.bar(x - 0.4 + width * (j + 0.5), ys, width, yerr=err, capsize=1.5, label=lab)
    ax.set_xticks(x, names, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("judged accuracy" if "judged" in sc0 else label, fontsize=8)
    if len(series) > 1:
        ax.legend(fontsize=6, ncol=3)
    ax.set_title("token ablations", fontsize=9)
    paths.append(save_figure(fig, folder / "token_ablation_bars.png"))

    keep = [v for v in names if v.startswith("keep_eos_")]
    if keep:
        fig = Figure(figsize=(5, 3.2))
        ax = fig.subplots()
        xs = np.arange(len(keep))
        sc0 = d["scores"][keep[0]]
        if "judged" in sc0:
            for attr in [a for a in sc0["judged"] if a != "all"] + ["all"]:
                ax.plot(xs, [d["scores"][v]["judged"][attr]["rate"] for v in keep], marker="o", label=attr)
            ax.legend(fontsize=7)
        else:
            ax.plot(xs, [_metric(d["scores"][v])[1] for v in keep], marker="o")
        ax.set_xticks(xs, [v[len("keep_eos_"):] for v in keep])
        ax.set_xlabel("[EOS] positions kept (rest zeroed)")
        ax.set_ylabel(label, fontsize=8)
        paths.append(save_figure(fig, folder / "token_ablation_keep_eos.png"))

    imgs = result.arrays.get("images")
    if imgs is not None and imgs.shape[1]:
        k = min(max_prompts, imgs.shape[1])
        grid = imgs[:, :k].numpy().transpose(1, 0, 2, 3, 4)  # [prompts, variants, H, W, 3]
        rows = [p if len(p) < 40 else p[:37] + "..." for p in d["prompts"][:k]]
        paths.append(image_grid(grid, rows, names, folder / "token_ablation_grid.png", size=1.1))
    return paths


# -- the analysis: settings, run, summary (report + CLI) --------------------------------------
def _run(pipe, settings: Settings, inputs: Inputs) -> Result:
    ps, targets = inputs.prompts_and_targets(settings.n, settings.seed)
    return run_token_ablation(pipe, ps, targets, steps=settings.steps, seed=settings.seed, batch=settings.batch,
                              clip=inputs.clip, schedule=GuidanceSchedule(settings.guidance))


def summary(result: Result) -> Summary:
    rows = [["variant", "all attributes right", "L1 to plain"]]
    for v in result.data["variants"]:
        sc = result.data["scores"][v]
        acc = share_text(sc["judged"]["all"]) if "judged" in sc else "-"
        rows.append([v, acc, f"{sc['l1_to_plain']['mean']:.4f}"])
    return Summary("Token ablations",
                   "Keeping only the first n [EOS] tokens, zeroing or noising words or the [EOS] block, [SOS]-only "
                   "and [EOS]-only prompts, and [EOS] swapped only in the attention keys or values. "
                   + "; ".join(f"{k}: {v}" for k, v in result.data["rules"].items()), rows)


ANALYSIS = Analysis("token-ablation", _run, summary, plot_token_ablation, order=50)
