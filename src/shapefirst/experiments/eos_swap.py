"""[EOS] swap: does the object follow the prompt's words or its [EOS] block?

For a pair (A, B) four images are generated with the same seed (seed + pair index):
  a        A's full prompt
  b        B's full prompt
  swap     A's [SOS] + semantic tokens, B's [EOS] block   ("A words + B EOS")
  reverse  B's [SOS] + semantic tokens, A's [EOS] block   ("B words + A EOS")
The conditional branch gets the (swapped) embedding; the unconditional branch is always the
normal empty-prompt embedding. Every condition is generated in its own pipeline call over the same
chunk of pairs (`batch` pairs at a time), so the four images of a pair share seed AND batch
makeup: with A == B, "swap" is bit-identical to "a".

Different token counts: the rule of `tokens.swap_eos(mode="block")` (TOKEN_RULE): the output keeps
A's positions 0..eos_A-1 and fills positions eos_A..L-1 with B's positions eos_B, eos_B+1, ...,
i.e. B's [EOS] block shifted to start at A's [EOS]; if B's block is too short (B has more semantic
tokens than A) its last position is repeated.

Switch experiment (direction "[EOS] from B only from call a on"): the denoiser sees A's full
prompt for calls 0..a-1 and A words + B EOS from call a on. a = 0 is the full swap, a = number
of calls is plain A. For batched CFG it is a forward pre-hook on the denoiser (`eos_switch`) that
counts calls and replaces the conditional rows of `encoder_hidden_states` (with CFG the batch is
[uncond, cond]: the second half; without CFG every row). The pre-hook runs before shapefirst's
guidance hook, so it always sees the full batch. For guidance as separate calls (Wan, Flux) a call
is a step, and the switch is the pipeline's step-end callback (interventions.eos_switch).

Which prompts: those whose text encoder ends each prompt with one end token that can carry it
(tokens.require_end_token: CLIP's [EOS], T5's </s>); the token positions are the denoiser's
(tokens.denoiser_token_info: Flux's T5 `tokenizer_2`, Wan's cleaned prompt, PixArt's lower-cased one).
Which pipelines: those whose embeddings shapefirst.pipeline makes (pipeline.EMBEDDING_FAMILIES: SD, SDXL, PixArt,
Wan, CogVideoX, Flux, Chroma; SD3 is refused by its two end tokens). Where the swap moves less than B's whole [EOS]
block, or not all of the text, the result says what it moves (data["eos_block"], pipeline.EOS_BLOCK_NOTES): Wan
zeroes its T5 states after </s> (the block is </s> alone), Chroma masks all but </s> and one padding state, and
Flux's pooled CLIP vector stays A's. A video (Wan, CogVideoX) is judged, scored and stored by its middle frame.

Scores (world pairs, i.e. pairs with labels): per attribute, only over pairs whose A and B differ
in it, the share of images judged with A's value and with B's value (Wilson 95% CIs); an image
whose judge finds no object, or another value, counts as neither. The judge's labels of several
objects are taken as it gives them. CLIP (when given): score of every image against caption A and
caption B, and the paired difference B - A with a 95% interval.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import ShapefirstError
from ..families import family
from ..interventions import EosSwitch, eos_switch  # noqa: F401 (EosSwitch: public here too)
from ..generate import batches, count_calls, generate, generate_embeds
from ..guidance import GuidanceSchedule
from ..metrics import ci_dict, default_judge, judged_labels, share, to_uint8
from ..pipeline import call_default, embeds_call, encode_prompts, eos_block_note, require_embeddings
from ..results import Result, image_grid, save_figure, yerr
from ..tokens import denoiser_token_info, require_end_token, swapped
from .registry import Analysis, Inputs, Settings, Summary, share_text
from ..prompts import world_pairs

DEFAULT_SWITCH_CALLS = (0, 1, 2, 3, 5, 8, 12, 20, 30, 50)
CONDITIONS = ("a", "b", "swap", "reverse")
CONDITION_TITLES = {"a": "A", "b": "B", "swap": "A words + B EOS", "reverse": "B words + A EOS"}
TOKEN_RULE = ("tokens.swap_eos(mode='block'): keep the words' prompt positions 0..eos_w-1, fill eos_w..L-1 with the "
              "EOS prompt's positions eos_e, eos_e+1, ... (its [EOS] block shifted to start at the words' [EOS]); "
              "if that block runs out (the EOS prompt has more semantic tokens), its last position is repeated")
SWITCH_DIRECTION = ("calls < a: A's full prompt; calls >= a: A words + B EOS (cond rows only). "
                    "a = 0 is the full swap, a = number of calls is plain A")


def middle_frames(images: np.ndarray) -> np.ndarray:
    """Images [N, H, W, 3] as they are; videos [N, frames, H, W, 3]: each video's middle frame."""
    return images[:, images.shape[1] // 2] if images.ndim == 5 else images


# -- pairs and embeddings -------------------------------------------------------------------
def normalize_pairs(pairs) -> list[dict]:
    """Pairs as dicts {"a", "b", "labels_a", "labels_b", "kind"} from dicts (world_pairs) or (A, B) tuples."""
    out = []
    for i, p in enumerate(list(pairs or [])):
        if isinstance(p, dict):
            d = {"a": p.get("a"), "b": p.get("b"), "labels_a": p.get("labels_a"), "labels_b": p.get("labels_b"),
                 "kind": p.get("kind")}
        elif isinstance(p, (tuple, list)) and len(p) == 2:
            d = {"a": p[0], "b": p[1], "labels_a": None, "labels_b": None, "kind": None}
        else:
            raise ShapefirstError(f"pair {i} ({p!r}) is not (A, B) or a dict with 'a' and 'b'",
                                  "pass pairs from prompts.read_pairs or prompts.world_pairs")
        if not isinstance(d["a"], str) or not isinstance(d["b"], str) or not d["a"].strip() or not d["b"].strip():
            raise ShapefirstError(f"pair {i} has an empty or non-text prompt", "give two non-empty prompts per pair")
        out.append(d)
    if not out:
        raise ShapefirstError("no prompt pairs were given", "pass at least one (A, B) pair")
    return out


def _chunk_embeds(pipe, pairs: list[dict], s: int, e: int):
    a_txt, b_txt = [p["a"] for p in pairs[s:e]], [p["b"] for p in pairs[s:e]]
    ca, u = encode_prompts(pipe, a_txt)
    cb, _ = encode_prompts(pipe, b_txt)
    n = ca.shape[1]
    ia = [denoiser_token_info(pipe, t, max_sequence_length=n) for t in a_txt]
    ib = [denoiser_token_info(pipe, t, max_sequence_length=n) for t in b_txt]
    return ca, cb, u, ia, ib


def generate_swaps(pipe, pairs, steps: int = 50, seed: int = 0, schedule: GuidanceSchedule | None = None,
                   batch: int = 8) -> dict[str, np.ndarray]:
    """{"a", "b", "swap", "reverse"}: images [N, H, W, 3]; pair i uses seed + i in every condition."""
    pairs = normalize_pairs(pairs)
    out = {c: [] for c in CONDITIONS}
    for s, e in batches(len(pairs), batch):
        ca, cb, u, ia, ib = _chunk_embeds(pipe, pairs, s, e)
        conds = {"a": (ca, ia), "b": (cb, ib), "swap": (swapped(ca, ia, cb, ib), ia),
                 "reverse": (swapped(cb, ib, ca, ia), ib)}
        for c in CONDITIONS:  # a swapped embedding keeps the positions (and PixArt mask) of the prompt it edits
            out[c].append(generate_embeds(pipe, conds[c][0], u, steps, seed + s, schedule, infos=conds[c][1]))
    return {c: np.concatenate(v) for c, v in out.items()}


def generate_switch(pipe, pairs, from_call: int, steps: int = 50, seed: int = 0,
                    schedule: GuidanceSchedule | None = None, batch: int = 8) -> np.ndarray:
    """Images of A's prompt whose [EOS] block becomes B's from denoiser call `from_call` on."""
    pairs = normalize_pairs(pairs)
    out = []
    for s, e in batches(len(pairs), batch):
        ca, cb, u, ia, ib = _chunk_embeds(pipe, pairs, s, e)
        with eos_switch(pipe, swapped(ca, ia, cb, ib), from_call) as sw:
            kw = {**embeds_call(pipe, ca, u, ia), **sw.call_kwargs}  # separate calls: the step-end callback
            out.append(generate(pipe, None, schedule, steps=steps, seed=seed + s, **kw).images)
    return np.concatenate(out)


def switch_calls_for(n_calls: int, switch_calls=None) -> list[int]:
    """The default (or given) switch calls, clipped to [0, n_calls], sorted, without repeats."""
    calls = DEFAULT_SWITCH_CALLS if switch_calls is None else switch_calls
    out = sorted({min(max(int(a), 0), n_calls) for a in calls})
    if not out:
        raise ShapefirstError("no switch calls were given", f"pass call indices between 0 and {n_calls}")
    return out


def _ab_shares(judged: list[dict], pairs: list[dict]) -> dict:
    """Per attribute where A and B differ: images judged with A's value, with B's value."""
    attrs = sorted({k for p in pairs for k in (p["labels_a"] or {})})
    out = {}
    for attr in attrs:
        idx = [i for i, p in enumerate(pairs) if p["labels_a"].get(attr) != p["labels_b"].get(attr)]
        if not idx:
            continue
        ka = sum(judged[i].get(attr) == pairs[i]["labels_a"][attr] for i in idx)
        kb = sum(judged[i].get(attr) == pairs[i]["labels_b"][attr] for i in idx)
        out[attr] = {"n": len(idx), "a": share(ka, len(idx)), "b": share(kb, len(idx))}
    return out


def _accuracy(judged: list[dict], targets: list[dict]) -> dict:
    attrs = sorted({k for t in targets for k in t})
    out = {a: share(sum(j.get(a) == t[a] for j, t in zip(judged, targets)), len(targets)) for a in attrs}
    out["all"] = share(sum(all(j.get(a) == t[a] for a in t) for j, t in zip(judged, targets)), len(targets))
    return out


def run_eos_swap(pipe, pairs, steps: int = 50, seed: int = 0, schedule: GuidanceSchedule | None = None,
                 batch: int = 8, switch_calls=None, judge_fn=None, clip=None, keep_images: int = 8) -> Result:
    """The [EOS]-swap experiment (module docstring) -> Result(kind="eos_swap").

    pairs: (A, B) tuples or world_pairs dicts (labels enable judged scores). switch_calls: the
    calls a of the switch sweep (default DEFAULT_SWITCH_CALLS clipped to the number of calls;
    pass [] to skip it). judge_fn: image -> labels (default: the world's judge when pairs carry
    labels). clip: a metrics.Clip for CLIP scores. keep_images: pairs whose images are stored."""
    require_end_token(pipe, "eos-swap")
    require_embeddings(pipe, "eos-swap")
    pairs = normalize_pairs(pairs)
    labelled = all(p["labels_a"] and p["labels_b"] for p in pairs)
    if judge_fn is None and labelled:
        judge_fn = default_judge()
    n_calls = count_calls(pipe, steps)
    calls = ([] if switch_calls is not None and len(list(switch_calls)) == 0
             else switch_calls_for(n_calls, switch_calls))

    images = {c: middle_frames(v) for c, v in generate_swaps(pipe, pairs, steps, seed, schedule, batch).items()}
    per_pair = _per_pair(pipe, pairs, seed)
    k = min(keep_images, len(pairs))
    arrays = {f"images_{c}": to_uint8(images[c][:k]) for c in CONDITIONS}
    scores, notes = {}, []
    if judge_fn is not None and labelled:
        scores = _judged_scores(judge_fn, images, pairs, per_pair)
    elif not labelled:
        notes.append("pairs carry no labels: no judged scores")
    if eos_block_note(pipe):
        notes.append(eos_block_note(pipe))
    clip_scores = _clip_scores(clip, images, pairs, per_pair) if clip is not None else None
    switch = None
    if calls:
        switch, arrays["switch_images"] = _switch(pipe, pairs, calls, n_calls, steps, seed, schedule, batch,
                                                  judge_fn if labelled else None, clip, k)
    data = {"rule": TOKEN_RULE, "conditions": {c: CONDITION_TITLES[c] for c in CONDITIONS},
            "settings": {"steps": steps, "denoiser_calls": n_calls, "seed": seed, "batch": batch,
                         "schedule": (schedule or GuidanceSchedule()).to_dict(), "n_pairs": len(pairs),
                         "seeds": "pair i uses seed + i in every condition and every switch call",
                         "stored_images": k, "unconditional": "the empty prompt's embedding (unchanged)"},
            "pairs": per_pair, "scores": scores, "clip": clip_scores, "switch": switch, "notes": notes,
            "eos_block": eos_block_note(pipe)}
    if family(pipe).video:
        data["settings"]["video"] = "each video's middle frame is judged, scored and stored"
    return Result("eos_swap", data, arrays)


def _per_pair(pipe, pairs, seed) -> list[dict]:
    out = []
    for i, p in enumerate(pairs):
        n = call_default(pipe, "max_sequence_length")  # the positions encode_prompts makes
        ia, ib = (denoiser_token_info(pipe, p[k], max_sequence_length=n) for k in ("a", "b"))
        out.append({**p, "seed": seed + i, "n_semantic_a": ia.n_semantic, "n_semantic_b": ib.n_semantic,
                    "eos_index_a": ia.eos_index, "eos_index_b": ib.eos_index,
                    "equal_token_counts": ia.n_semantic == ib.n_semantic})
    return out


def _judged_scores(judge_fn, images, pairs, per_pair) -> dict:
    """Plain accuracies, A-vs-B shares of the swapped images, and both directions pooled ("follows")."""
    judged = {c: judged_labels(judge_fn, images[c]) for c in CONDITIONS}
    for i, rec in enumerate(per_pair):
        rec["judged"] = {c: judged[c][i] for c in CONDITIONS}
    scores = {"plain_a_accuracy": _accuracy(judged["a"], [p["labels_a"] for p in pairs]),
              "plain_b_accuracy": _accuracy(judged["b"], [p["labels_b"] for p in pairs]),
              "swap": _ab_shares(judged["swap"], pairs), "reverse": _ab_shares(judged["reverse"], pairs)}
    follows = {}  # pooled over both directions: does the attribute follow the words or the [EOS] block?
    for attr in sorted(set(scores["swap"]) | set(scores["reverse"])):
        sw, rv = scores["swap"].get(attr), scores["reverse"].get(attr)
        n = (sw["n"] if sw else 0) + (rv["n"] if rv else 0)
        kw = (sw["a"]["k"] if sw else 0) + (rv["b"]["k"] if rv else 0)
        ke = (sw["b"]["k"] if sw else 0) + (rv["a"]["k"] if rv else 0)
        follows[attr] = {"n": n, "words": share(kw, n), "eos": share(ke, n)}
    scores["follows"] = follows
    return scores


def _clip_scores(clip, images, pairs, per_pair) -> dict:
    ta, tb = [p["a"] for p in pairs], [p["b"] for p in pairs]
    out = {}
    for c in CONDITIONS:
        va = clip.clip_score(images[c], ta).double().numpy()
        vb = clip.clip_score(images[c], tb).double().numpy()
        out[c] = {"vs_a": ci_dict(va), "vs_b": ci_dict(vb), "b_minus_a": ci_dict(vb - va)}
        for i, rec in enumerate(per_pair):
            rec.setdefault("clip", {})[c] = {"vs_a": float(va[i]), "vs_b": float(vb[i])}
    return out


def _switch(pipe, pairs, calls, n_calls, steps, seed, schedule, batch, judge_fn, clip, k):
    """The switch sweep: B's [EOS] only from call a on, for every a in calls -> (summary, stored images)."""
    per_call, switch_imgs = [], []
    for a in calls:
        imgs = middle_frames(generate_switch(pipe, pairs, a, steps, seed, schedule, batch))
        entry = {"from_call": a}
        if judge_fn is not None:
            entry["shares"] = _ab_shares(judged_labels(judge_fn, imgs), pairs)
        if clip is not None:
            va = clip.clip_score(imgs, [p["a"] for p in pairs]).double().numpy()
            vb = clip.clip_score(imgs, [p["b"] for p in pairs]).double().numpy()
            entry["clip_b_minus_a"] = ci_dict(vb - va)
        per_call.append(entry)
        switch_imgs.append(to_uint8(imgs[:k]))
    return ({"direction": SWITCH_DIRECTION, "calls": calls, "n_calls": n_calls, "per_call": per_call},
            torch.stack(switch_imgs))


def plot_eos_swap(result: Result, folder: str | Path, max_pairs: int = 6) -> list[Path]:
    """Bar chart of A-vs-B shares per attribute, the switch curve, and an image grid -> PNG paths."""
    folder = Path(folder)
    d = result.data
    scores = d.get("scores") or {}
    figs = [_plot_shares(scores, folder) if scores.get("swap") or scores.get("reverse")
            else _plot_clip(d["clip"], folder) if d.get("clip") else None,
            _plot_switch(d["switch"], folder) if (d.get("switch") or {}).get("per_call") else None,
            _plot_grid(result, folder, max_pairs)]
    return [p for p in figs if p is not None]


def _plot_shares(scores: dict, folder: Path) -> Path:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 3.4))
    axes = fig.subplots(1, 2, sharey=True)
    for ax, cond in zip(axes, ("swap", "reverse")):
        sc = scores.get(cond) or {}
        attrs = list(sc)
        x = np.arange(len(attrs))
        for off, side, label in ((-0.2, "a", "A's value"), (0.2, "b", "B's value")):
            rates = [sc[a][side]["rate"] for a in attrs]
            err = yerr(rates, [sc[a][side]["ci"][0] for a in attrs], [sc[a][side]["ci"][1] for a in attrs])
            ax.bar(x + off, rates, 0.4, yerr=err if len(attrs) else None, capsize=3, label=label)
        ax.set_xticks(x, attrs, fontsize=8)
        ax.set_title(CONDITION_TITLES[cond], fontsize=9)
        ax.set_ylim(0, 1)
    axes[0].set_ylabel("share of images judged with")
    axes[0].legend(fontsize=7)
    return save_figure(fig, folder / "eos_swap_shares.png")


def _plot_clip(clip: dict, folder: Path) -> Path:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 3.2))
    ax = fig.subplots()
    conds = list(clip)
    x = np.arange(len(conds))
    for off, key, label in ((-0.2, "vs_a", "CLIP vs caption A"), (0.2, "vs_b", "CLIP vs caption B")):
        ax.bar(x + off, [clip[c][key]["mean"] for c in conds], 0.4, label=label)
    ax.set_xticks(x, [CONDITION_TITLES.get(c, c) for c in conds], fontsize=7)
    ax.legend(fontsize=7)
    return save_figure(fig, folder / "eos_swap_clip.png")


def _plot_switch(sw: dict, folder: Path) -> Path | None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 3.2))
    ax = fig.subplots()
    xs = [e["from_call"] for e in sw["per_call"]]
    attrs = sorted({a for e in sw["per_call"] for a in (e.get("shares") or {})})
    for attr in attrs:
        got = [e["shares"][attr]["b"] if attr in e.get("shares", {}) else None for e in sw["per_call"]]
        ys = [g["rate"] if g else np.nan for g in got]
        lo = np.fmin([g["ci"][0] if g else np.nan for g in got], ys)  # the band never excludes its estimate
        hi = np.fmax([g["ci"][1] if g else np.nan for g in got], ys)
        ax.plot(xs, ys, marker="o", label=attr)
        ax.fill_between(xs, lo, hi, alpha=0.15)
    if attrs:
        ax.set_ylabel("share judged as B's value")
        ax.set_ylim(0, 1)
    elif any("clip_b_minus_a" in e for e in sw["per_call"]):
        ax.plot(xs, [e["clip_b_minus_a"]["mean"] for e in sw["per_call"]], marker="o", label="CLIP(B) - CLIP(A)")
        ax.set_ylabel("CLIP score difference")
    else:
        return None
    ax.set_xlabel("denoiser call a from which B's [EOS] is used")
    ax.set_title("when does [EOS] stop mattering?", fontsize=9)
    ax.legend(fontsize=7)
    return save_figure(fig, folder / "eos_swap_switch.png")


def _plot_grid(result: Result, folder: Path, max_pairs: int) -> Path | None:
    if not all(f"images_{c}" in result.arrays for c in CONDITIONS):
        return None
    k = min(max_pairs, result.arrays["images_a"].shape[0])
    if not k:
        return None
    grid = np.stack([np.stack([result.arrays[f"images_{c}"][i].numpy() for c in CONDITIONS]) for i in range(k)])
    titles = [f"{p['a']}\n{p['b']}" if len(p["a"]) < 40 else f"pair {i}"
              for i, p in enumerate(result.data["pairs"][:k])]
    return image_grid(grid, titles, [CONDITION_TITLES[c] for c in CONDITIONS], folder / "eos_swap_grid.png")


# -- the analysis: settings, run, summary (report + CLI) --------------------------------------
def findings(data: dict) -> list[str]:
    """Which prompt the swapped image follows, per judged attribute (the paper: B's [EOS])."""
    swap = (data.get("scores") or {}).get("swap") or {}
    parts, follows_b, judged = [], 0, 0
    for attr, d in swap.items():
        if not (isinstance(d, dict) and "a" in d and "b" in d):
            continue
        a, b = d["a"]["rate"], d["b"]["rate"]
        judged += 1
        follows_b += b > a
        parts.append(f"{attr} follows B {b:.0%} / A {a:.0%}")
    if not judged:
        return []
    if follows_b == judged:
        head = ("With A's words and B's [EOS], the image follows B's [EOS] in every judged attribute, "
                "as the paper reports")
    elif follows_b == 0:
        head = "With A's words and B's [EOS], the image follows A's words in every judged attribute, against the paper"
    else:
        head = (f"With A's words and B's [EOS], the image follows B's [EOS] in {follows_b} of {judged} "
                "judged attributes")
    return [f"{head} ({'; '.join(parts)})."]


def title(data: dict) -> str:
    swap = (data.get("scores") or {}).get("swap") or {}
    obj = [d for a, d in swap.items() if a in ("shape", "color") and isinstance(d, dict) and "a" in d]
    if obj and all(d["b"]["rate"] > d["a"]["rate"] for d in obj):
        return "[EOS] decides the object"
    if obj and all(d["b"]["rate"] < d["a"]["rate"] for d in obj):
        return "The words, not [EOS], decide the object here"
    return "[EOS] swap: which prompt the object follows"


def _run(pipe, settings: Settings, inputs: Inputs) -> Result:
    pairs = inputs.pairs
    if pairs is None:
        if not inputs.world:
            raise ShapefirstError("eos-swap on a model other than the shapes world needs prompt pairs",
                                  "pass --pairs FILE (lines 'prompt A || prompt B')")
        pairs = world_pairs(settings.n, settings.seed)
    return run_eos_swap(pipe, pairs, steps=settings.steps, seed=settings.seed,
                        schedule=GuidanceSchedule(settings.guidance), batch=settings.batch, clip=inputs.clip)


def summary(result: Result) -> Summary:
    rows = [["attribute", "swapped image follows A's words", "follows B's [EOS]"]]
    for attr, d in (result.data.get("scores") or {}).get("swap", {}).items():
        if isinstance(d, dict) and "a" in d:
            rows.append([attr, share_text(d["a"]), share_text(d["b"])])
    found = findings(result.data)
    return Summary(title(result.data),
                   "Prompt A's word embeddings ([SOS] too, where the tokenizer has one) with prompt B's [EOS] block. "
                   + " ".join(found)
                   + " Switching the [EOS] block only from call a on shows when it stops mattering. "
                   + result.data["rule"] + (f". On this model: {result.data['eos_block']}."
                                            if result.data.get("eos_block") else ""),
                   rows, found, ("eos_swap_*.png",))


ANALYSIS = Analysis("eos-swap", _run, summary, plot_eos_swap, order=40, needs=("pairs",))
