"""The peers study's summary: one Pareto curve per method and a table, from a study folder.

`benchmarks/peers.py` runs the study (shapefirst's stops and caches against T-GATE, DeepCache, Step AG,
Adaptive Guidance, Guidance Interval, diffusers' callback) into STUDY/quality/sweep.jsonl (every image
judged, no timing) and STUDY/timing/sweep.jsonl (A/B adjacent timing, run alone). This module reads
those rows, draws the Pareto plot (saved latency at batch 8 against all-five accuracy) and, for
`shapefirst report --peers STUDY`, keeps a copy of both files under the report's results/peers/, so the
page redraws from them without the study folder.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import ShapefirstError
from .results import read_jsonl
from .transformer_cache import NAMES as TCACHE_NAMES
from .metrics import mean_ci
from .metrics import wilson
from .outputs import model_fingerprint
from .results import atomic_write_bytes
from .results import atomic_write_text, strict_dumps
from .results import save_figure
from .sweep import calibrate
from .sweep import passes
from .sweep import per_image

# method of a configuration name, for the Pareto plot: one curve per method (first match wins)
# diffusers' transformer caches: "NAME + shapefirst stop=..." (the stop under the cache) and "NAME ..." (alone)
_TCACHES = tuple(TCACHE_NAMES.values())
METHODS = (tuple((f"{c} + shapefirst", f"shapefirst stop + {c}") for c in _TCACHES) + tuple((c, c) for c in _TCACHES)
           + (("shapefirst stop_step", "shapefirst stop + DeepCache"),
              ("shapefirst shape-settled", "shapefirst shape-settled stop"),
              ("shapefirst stop", "shapefirst stop (+ late caches)"), ("T-GATE", "T-GATE (tgate)"),
              ("Step AG", "Step AG"), ("Adaptive Guidance", "Adaptive Guidance"),
              ("Guidance Interval", "Guidance Interval"), ("DeepCache", "DeepCache"),
              ("diffusers SDCFGCutoffCallback", "SDCFGCutoffCallback"), ("full", "full guidance"),
              ("A1111 NGMS", "A1111 NGMS (every other call below its sigma)"),
              ("cache-dit + shapefirst", "shapefirst stop + cache-dit"), ("cache-dit", "cache-dit")))
QUALITY_FIELDS = ("name", "n", "accuracy", "accuracy_delta_vs_full", "evaluation_ratio", "image_clip")
PHASES = ("quality", "timing", "timing_b1")  # a study's row files: judged images, batch-8 and batch-1 timing


def method_of(name: str) -> str:
    label = next((lab for prefix, lab in METHODS if name.startswith(prefix)), name)
    if label.startswith("shapefirst"):  # one curve per branch kept after the stop: they differ most at w=3
        branch = next((b for b in ("uncond", "cond") if f" {b}" in name), None)
        label += f", {branch} after" if branch else ""
    return label


def batch1_only(name: str) -> bool:
    """Rows timed image by image (diffusers' callback crashes at batch > 1): not on the batch-8 axis."""
    return "image by image" in name or "SDCFGCutoffCallback" in name


def pareto_points(q: dict, t: dict) -> dict[str, list[tuple[float, float, float, float, str]]]:
    """method -> [(saved latency, all-five accuracy, CI low, CI high, configuration)] sorted by saving;
    configurations without a batch-8 timing are left out (the title names them, or says how many)."""

    pts: dict[str, list] = {}
    for name, r in q.items():
        sv = t.get(name, {}).get("saved_latency")
        if sv is None or batch1_only(name):
            continue
        a = r["accuracy"]["all"]  # a share of r["n"] judged images
        lo, hi = wilson(round(a * r["n"]), r["n"])
        pts.setdefault(method_of(name), []).append((sv, a, lo, hi, name))
    return {m: sorted(v) for m, v in pts.items()}


def pareto_plot(q: dict, t: dict, path: Path) -> Path | None:
    """Saved latency (batch 8, against full guidance) vs all-five accuracy, one curve per method,
    Wilson 95% CIs as error bars. None when no configuration has both a timing and a quality row."""
    from matplotlib.figure import Figure


    pts = pareto_points(q, t)
    if not pts:
        return None
    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    n = next(iter(q.values()))["n"]
    left = [name for name in q if name not in {p[4] for v in pts.values() for p in v}]
    left = ", ".join(left) if len(left) <= 2 else f"{len(left)} configurations"
    # its saving is 0 by definition; timed against itself = noise
    for sv, a, lo, hi, _ in pts.pop("full guidance", []):
        ax.axhspan(100 * lo, 100 * hi, color="0.85", alpha=0.5)
        ax.axhline(100 * a, color="0.4", ls="--", lw=1,
                   label=f"full guidance (95% CI band; timed against itself {sv:+.1%})")
    for m, v in pts.items():
        x, y, lo, hi = (np.array(c) for c in zip(*[p[:4] for p in v]))
        ax.errorbar(100 * x, 100 * y, yerr=100 * np.stack([y - lo, hi - y]), marker="o", capsize=3, label=m)
    ax.set(xlabel="saved latency vs full guidance, batch 8 (%)", ylabel="all five attributes right (%)",
           title=f"shapefirst and its peers (n={n} prompts)" + (f"; no batch-8 timing: {left}" if left else ""))
    ax.title.set_fontsize(9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    return save_figure(fig, path)


SHIPPED_STUDY = Path(__file__).resolve().parent / "data" / "peers_w3"  # the shipped model's study at w=3


def default_study(pipe, guidance: float) -> Path | None:
    """The study the report shows when none is given: the shipped one (rows measured by benchmarks/peers.py
    on the embedded model at its recommended scale), only for that model (same weights) at that scale."""

    info = study_info(SHIPPED_STUDY)
    if not info or guidance != info["guidance"] or model_fingerprint(pipe) != info["model"]:
        return None
    return SHIPPED_STUDY


def study_info(folder: str | Path) -> dict:
    """A study's study.json (model fingerprint, scale, timing machine), {} when it has none."""
    import json

    f = Path(folder) / "study.json"
    return json.loads(f.read_text()) if f.exists() else {}


def rows_file(folder: str | Path, phase: str) -> Path:
    """STUDY/phase/sweep.jsonl in a benchmarks/peers.py folder, phase.jsonl in a kept or shipped copy
    (phase: quality, timing, or timing_b1 for the batch-1 timing)."""
    folder = Path(folder)
    return (folder / phase / "sweep.jsonl") if (folder / phase).is_dir() else (folder / f"{phase}.jsonl")


def read_study(folder: str | Path) -> tuple[dict, dict]:
    """(quality rows, timing rows) by configuration name, from a study folder or a report's results/peers."""
    folder = Path(folder)
    q_path, t_path = (rows_file(folder, p) for p in ("quality", "timing"))
    if not q_path.exists():
        raise ShapefirstError(f"{folder} holds no peers study (no quality/sweep.jsonl in it)",
                              "pass the --out folder of `python benchmarks/peers.py quality`")
    q = {r["name"]: r for r in read_jsonl(q_path)}
    bad = [f for r in q.values() for f in QUALITY_FIELDS if f not in r]
    if not q or "full" not in q or bad:
        what = "no full-guidance row" if q and not bad else f"rows without {sorted(set(bad))}" if bad else "no rows"
        raise ShapefirstError(f"{q_path} is not a finished peers quality run ({what})",
                              "rerun `python benchmarks/peers.py quality` on that folder: it resumes")
    return q, {r["name"]: r for r in read_jsonl(t_path)}


def read_batch1(folder: str | Path) -> dict:
    """A study's batch-1 timing rows by configuration name ({} when it has none)."""
    return {r["name"]: r for r in read_jsonl(rows_file(folder, "timing_b1"))}


def keep_study(study: str | Path, dest: Path) -> Path:
    """Copy a study's row files and its study.json into dest (quality.jsonl, timing.jsonl, timing_b1.jsonl,
    each written atomically; a timing file or study.json the study lacks is removed) and draw dest/pareto.png
    (removed when nothing is timed)."""

    study = Path(study)
    q, t = read_study(study)  # refuses a folder that is not a study before anything is written
    dest.mkdir(parents=True, exist_ok=True)
    for src, kept in [(rows_file(study, p), dest / f"{p}.jsonl") for p in PHASES] + [
            (study / "study.json", dest / "study.json")]:
        if src.exists():
            atomic_write_bytes(kept, src.read_bytes())
        else:
            kept.unlink(missing_ok=True)
    if pareto_plot(q, t, dest / "pareto.png") is None:
        (dest / "pareto.png").unlink(missing_ok=True)
    return dest


def fastest_within_tolerance(q: dict, t: dict, tolerance: float = 0.01) -> tuple[str, float] | None:
    """(name, saved latency) of the fastest timed batch-8 configuration that passes the calibrate rule
    (sweep.calibrate on the quality rows that have a batch-8 timing, with that timing merged in)."""

    timed = [{**r, "saved_latency": t[n]["saved_latency"]} for n, r in q.items()
             if not batch1_only(n) and t.get(n, {}).get("saved_latency") is not None]
    best, _ = calibrate(timed, tolerance)
    return (best["name"], best["saved_latency"]) if best else None


def table_rows(q: dict, t: dict, t1: dict | None = None) -> list[list[str]]:
    """The report's table: one row per configuration, Wilson 95% CI of the all-five share; the batch-1
    saved latency (t1) beside the batch-8 one."""

    t1 = t1 or {}
    rows = [["configuration", "saved latency (batch 8)", "saved latency (batch 1)", "denoiser evaluations",
             "all five right [95% CI]", "Δ all five vs full [95% CI]", "Image-CLIP", "within tolerance"]]
    for name, r in q.items():
        sv, sv1 = (x.get(name, {}).get("saved_latency") for x in (t, t1))
        a, n = r["accuracy"]["all"], r["n"]
        lo, hi = wilson(round(a * n), n)
        d = r["accuracy_delta_vs_full"]["all"]
        ok, why = passes(r)
        rows.append([name, "-" if sv is None or batch1_only(name) else f"{sv:.1%}",
                     "-" if sv1 is None else f"{sv1:.1%}",
                     f"x{r['evaluation_ratio']:.3f}",
                     f"{a:.1%} [{lo:.1%}, {hi:.1%}]", f"{d[0]:+.3f} [{d[1]:+.3f}, {d[2]:+.3f}]",
                     f"{r['image_clip'][0]:.1f}", "yes" if ok else f"no: {why}"])
    return rows


JUDGED = "judged.safetensors"  # per-image judged accuracy of every row: what a kept study keeps of the per-image files


def judged(folder: str | Path, row: dict) -> dict[str, np.ndarray] | None:
    """A study row's per-image judged accuracy (attribute -> 1.0 or 0.0 per image, in prompt order): from
    the run's per-image file, else from the folder's judged.safetensors, else None. The per-image files
    (CLIP features, 2 MB a row) stay with the run; judged.safetensors (7 kB a row) is kept with the results,
    so paired differences can be recomputed after the run folder is gone."""
    from safetensors.numpy import load_file


    folder = Path(folder)
    if (folder / "quality" / row.get("per_image_file", "-")).is_file():
        p = per_image(folder / "quality", row)
        return {k[4:]: p[k].astype(float) for k in p if k.startswith("acc/")}
    if not (folder / JUDGED).is_file():
        return None
    prefix = f"{row['name']}|"
    got = {k[len(prefix):]: v.astype(float)
           for k, v in load_file(str(folder / JUDGED)).items() if k.startswith(prefix)}
    return got or None


def paired(folder: str | Path, a: dict, b: dict, attribute: str = "all") -> tuple[float, float, float] | None:
    """Mean and 95% CI of (accuracy of row a - row b) over the same prompts and seeds; None without the
    per-image judgments of both."""

    ja, jb = judged(folder, a), judged(folder, b)
    if ja is None or jb is None or len(ja[attribute]) != len(jb[attribute]):
        return None
    return mean_ci(ja[attribute] - jb[attribute])


def merge_study(run: str | Path, dest: str | Path) -> dict[str, str]:
    """Merge a benchmarks/peers.py run folder into a kept study (dest/quality.jsonl, timing.jsonl,
    timing_b1.jsonl, judged.safetensors): rows by configuration name, the run's replacing dest's, and the
    run's per-image judgments. Returns, for each quality row in both, whether the rerun reproduced the
    kept accuracies ("same" or what differs): the quality phase is deterministic."""
    from safetensors.numpy import load_file, save


    run, dest = Path(run), Path(dest)
    q_new, _ = read_study(run)  # refuses a folder that is not a study before anything is written
    dest.mkdir(parents=True, exist_ok=True)
    checks = {}
    for phase in PHASES:
        new = {r["name"]: r for r in read_jsonl(rows_file(run, phase))}
        if not new:
            continue
        old = {r["name"]: r for r in read_jsonl(rows_file(dest, phase))}
        if phase == "quality":
            checks = {n: "same" if old[n]["accuracy"] == r["accuracy"] else
                      f"accuracy {old[n]['accuracy']} -> {r['accuracy']}" for n, r in new.items() if n in old}
        atomic_write_text(dest / f"{phase}.jsonl",
                          "".join(strict_dumps(r, sort_keys=True) + "\n" for r in {**old, **new}.values()))
    kept = load_file(str(dest / JUDGED)) if (dest / JUDGED).is_file() else {}
    for name, r in q_new.items():
        j = judged(run, r)
        if j is not None:
            kept.update({f"{name}|{a}": v.astype(np.uint8) for a, v in j.items()})
    atomic_write_bytes(dest / JUDGED, save(dict(sorted(kept.items()))))
    return checks
