"""The attention analysis: how much attention each token class receives per denoiser call, per-word
heat maps, and how early each word's map converges (relative F1 against the final map).

Captures the conditional branch with shapefirst.attention.capture_attention (outputs unchanged): cross-attention or,
for joint-attention families (SD3, Flux, CogVideoX), the image queries' attention on the text tokens renormalised
over them. A call is a denoising step (Wan and Flux guide in two denoiser calls per step: one capture call). For
a video the maps are the mean over its latent frames and the stored image is each video's middle frame.
Memory stays bounded: per-pixel maps are kept (head-mean) only for `map_calls` (default: every
call for fewer than 17 prompts, else 10 evenly spaced calls + the last); the per-token mass of
every call is always kept.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..attention import capture_attention
from ..generate import generate
from ..guidance import GuidanceSchedule
from ..results import Result, save_figure, spaced
from ..settling import settled_from
from .registry import Analysis, Inputs, Settings, Summary
from ..tokens import EOS, EOS_PAD, PAD, SEMANTIC, SOS, TOKEN_CLASSES, denoiser_token_infos
from ..generate import count_calls


def run_attention(pipe, prompts: list[str], steps: int = 50, seed: int = 0, schedule: GuidanceSchedule | None = None,
                  batch: int = 8, map_calls: list[int] | None = None, heatmap_prompts: int = 4) -> Result:
    """Class mass per call, word heat maps (first `heatmap_prompts` prompts) and convergence curves."""
    schedule = schedule or GuidanceSchedule()

    n_calls = count_calls(pipe, steps)
    if map_calls is None:
        map_calls = list(range(n_calls)) if len(prompts) <= 16 else spaced(n_calls, 11)
    infos = []
    class_mass = {c: [] for c in TOKEN_CLASSES}
    conv_sem, conv_eos = [], []
    heat = {}
    images = []
    for s in range(0, len(prompts), batch):
        part = prompts[s:s + batch]
        with capture_attention(pipe, keep="mean", calls=map_calls, n_images=len(part)) as cap:
            res = generate(pipe, part, schedule, steps=steps, seed=seed + s)
        frames = res.images
        images.append(frames[:, frames.shape[1] // 2] if frames.ndim == 5 else frames)  # a video: its middle frame
        infos += _token_infos(pipe, part, cap.mass.shape[-1])
        cm = cap.class_mass(infos[s:s + batch])
        for c in TOKEN_CLASSES:
            class_mass[c].append(cm[c])
        sem = [infos[i].positions(SEMANTIC) or [0] for i in range(s, s + len(part))]
        eos = [infos[i].positions(EOS) or [0] for i in range(s, s + len(part))]
        no_eos = torch.tensor([infos[i].eos_index is None for i in range(s, s + len(part))])
        conv_sem.append(cap.convergence(sem))
        conv_eos.append(cap.convergence(eos).masked_fill(no_eos, float("nan")))  # Gemma: no end token
        heat.update(_heatmaps(cap, infos, s, len(part), map_calls, heatmap_prompts))
    arrays = {f"mass/{c}": torch.cat(v, 1) for c, v in class_mass.items()}
    arrays["convergence/semantic"] = torch.cat(conv_sem, 1)
    arrays["convergence/eos"] = torch.cat(conv_eos, 1)
    arrays["images"] = torch.from_numpy((np.concatenate(images)[:heatmap_prompts] * 255).round().astype(np.uint8))
    arrays.update(heat)
    m = {c: float(arrays[f"mass/{c}"].nanmean()) for c in TOKEN_CLASSES}
    kept = torch.tensor(map_calls)
    conv = arrays["convergence/semantic"][kept].nanmean(1)
    k = int(settled_from(conv >= 0.9))
    first90 = int(map_calls[k]) if k < len(map_calls) else None
    data = {"settings": {"steps": steps, "seed": seed, "n": len(prompts), "schedule": schedule.to_dict(),
                         "map_calls": map_calls, "n_calls": n_calls, "binarise": "map > its mean over pixels",
                         "prompts": prompts},
            "summary": {"mean_mass_per_class": m,
                        "sos_mass_min_over_calls": float(arrays[f"mass/{SOS}"].nanmean(1).min()),
                        "semantic_f1_ge_0.9_from_call": first90,
                        "eos_block_mass": m[EOS] + m[EOS_PAD] + m[PAD]},
            "words": {str(i): infos[i].words for i in range(min(heatmap_prompts, len(prompts)))}}
    return Result("attention", data, arrays)


def _token_infos(pipe, prompts: list[str], n_tok: int) -> list:
    """The token classes of one pipeline call's prompts at the positions the capture saw (tokens.denoiser_token_infos:
    padded as that call pads its batch): the pipeline call's own max_sequence_length, else (a call given another one,
    e.g. through a pipeline whose calls default to it) the captured length."""
    infos = denoiser_token_infos(pipe, prompts)
    if infos and len(infos[0].ids) != n_tok:
        infos = denoiser_token_infos(pipe, prompts, max_sequence_length=n_tok)
    return infos


def _heatmaps(cap, infos, s: int, n: int, map_calls: list[int], heatmap_prompts: int) -> dict:
    """Per-word (and [EOS]-block mean) maps of the batch's first prompts at the first, middle and last call."""
    heat = {}
    for j in range(min(n, max(0, heatmap_prompts - s))):
        i = s + j
        for c in (map_calls[0], map_calls[len(map_calls) // 2], map_calls[-1]):
            for w, m in cap.word_maps(c, j, infos[i]).items():
                heat[f"heat/{i}/{c}/{w}"] = m
            if infos[i].eos_index is not None:  # a tokenizer without an end token (Gemma) has no [EOS] map
                heat[f"heat/{i}/{c}/[EOS]"] = cap.token_maps(c)[j, infos[i].positions(EOS)].mean(0)
    return heat


def plot_attention(result: Result, folder: str | Path) -> list[Path]:
    from matplotlib.figure import Figure

    folder = Path(folder)
    a = result.arrays
    paths = []
    fig = Figure(figsize=(6.4, 4.0), layout="constrained")
    ax = fig.add_subplot(111)
    for c in TOKEN_CLASSES:
        v = a[f"mass/{c}"].nanmean(1).numpy()
        if np.nanmax(v) > 0:
            ax.plot(v, label=c)
    ax.set_xlabel("denoiser call")
    ax.set_ylabel("attention mass (mean over layers, heads, pixels)")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title("Attention mass per token class")
    paths.append(save_figure(fig, folder / "attention_class_mass.png"))

    fig = Figure(figsize=(6.4, 4.0), layout="constrained")
    ax = fig.add_subplot(111)
    calls = result.data["settings"]["map_calls"]
    for key, label in (("semantic", "semantic tokens"), ("eos", "first [EOS]")):
        v = a[f"convergence/{key}"][torch.tensor(calls)].nanmean(1).numpy()
        ax.plot(calls, v, marker="o", label=label)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("denoiser call")
    ax.set_ylabel("relative F1 vs final map")
    ax.legend()
    ax.set_title(convergence_title(result.data["summary"]["semantic_f1_ge_0.9_from_call"],
                                   result.data["settings"]["n_calls"]))
    paths.append(save_figure(fig, folder / "attention_convergence.png"))

    heat = {}
    for k in a:
        if k.startswith("heat/"):
            _, i, c, w = k.split("/", 3)
            heat.setdefault(int(i), {}).setdefault(int(c), {})[w] = a[k]
    for i, by_call in sorted(heat.items()):
        calls_i = sorted(by_call)
        words = list(by_call[calls_i[0]])
        fig = Figure(figsize=(1.6 * (len(words) + 1), 1.7 * len(calls_i)), layout="constrained")
        for r, c in enumerate(calls_i):
            ax = fig.add_subplot(len(calls_i), len(words) + 1, r * (len(words) + 1) + 1)
            if "images" in a and i < len(a["images"]):
                ax.imshow(a["images"][i].numpy())
            ax.set_axis_off()
            ax.set_title(f"call {c}", fontsize=8)
            for j, w in enumerate(words):
                ax = fig.add_subplot(len(calls_i), len(words) + 1, r * (len(words) + 1) + 2 + j)
                ax.imshow(by_call[c][w].numpy(), cmap="inferno")
                ax.set_axis_off()
                ax.set_title(w, fontsize=8)
        paths.append(save_figure(fig, folder / f"attention_words_{i}.png"))
    return paths


# -- the analysis: settings, run, summary (report + CLI) --------------------------------------
CLASS_NAMES = {"sos": "[SOS]", "semantic": "word", "eos": "[EOS] (first)",
               "eos_pad": "[EOS] padding", "pad": "padding", "template": "template"}


def findings(data: dict) -> list[str]:
    """Which token class is the attention sink (the paper: [SOS])."""
    mass = {c: v for c, v in (data.get("summary", {}).get("mean_mass_per_class") or {}).items() if v is not None}
    if not mass:
        return []
    top = max(mass, key=mass.get)
    name = CLASS_NAMES.get(top, top)
    if top == "sos":
        return [f"[SOS] is the attention sink here ({mass[top]:.2f} of the cross-attention mass), "
                "as the paper reports."]
    sos = mass.get("sos")
    # softmax mass is > 0 on any position that exists: exactly 0 means no [SOS] position (T5)
    tail = "" if sos is None else "; this tokenizer has no [SOS]" if sos == 0 else f"; [SOS] gets {sos:.3f}"
    return [f"The {name} tokens are the attention sink here ({mass[top]:.2f} of the cross-attention mass{tail}); "
            "the paper reports [SOS]."]


def _run(pipe, settings: Settings, inputs: Inputs) -> Result:
    ps, _ = inputs.prompts_and_targets(settings.n, settings.seed)
    return run_attention(pipe, ps, steps=settings.steps, seed=settings.seed,
                         schedule=GuidanceSchedule(settings.guidance), batch=settings.batch)


def convergence_title(first90: int | None, n_calls: int) -> str:
    """The convergence plot's title, from the measured call where the words' maps reach relative F1 >= 0.9
    (none of the paper's "early" unless the data says so: before the middle call)."""
    if first90 is None:
        return "Word maps never reach relative F1 0.9 of their final map"
    when = "early" if first90 < n_calls / 2 else "late"
    return f"Word maps converge {when}: relative F1 >= 0.9 from call {first90} of {n_calls}"


def summary(result: Result) -> Summary:
    s = result.data["summary"]
    rows = [["token class", "mean attention mass"]] + [[c, f"{v:.3f}"] for c, v in s["mean_mass_per_class"].items()]
    rows.append(["semantic maps: relative F1 >= 0.9 from call", str(s["semantic_f1_ge_0.9_from_call"])])
    found = findings(result.data)
    return Summary("Which tokens the image attends to",
                   "Text-attention mass per token class per call, how early each word's map converges (relative F1 "
                   "against the final map; maps binarised at their mean), and per-word heat maps at the first, middle "
                   "and last captured call. " + " ".join(found), rows, found, ("attention_*.png",))


ANALYSIS = Analysis("attention", _run, summary, plot_attention, order=30)
