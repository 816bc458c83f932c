"""Speed/quality sweep of guidance schedules against full guidance, resumable.

For every (scheduler, steps) group, full guidance is the reference: its images (same seeds) are
computed once and cached. Each configuration then runs batch by batch; for the first
`timing_batches` batches, full guidance is rerun right after it on the same batch (A/B adjacent),
and the saved latency is 1 - median(t_config / t_full). Quality against the reference: L1, PSNR,
CLIP image-embedding cosine ("Image-CLIPScore", with its floor: two seeds of the same prompt),
judged accuracy per attribute (the world's judge) and CLIPScore to the prompt.
One JSON line per finished configuration in sweep.jsonl; a rerun skips finished ones.
"""
from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..generate import generate
from ..guidance import GuidanceSchedule
from ..metrics import judged_accuracy, l1, mean_ci, psnr
from ..results import append_jsonl, atomic_write_bytes, read_jsonl


@dataclass
class Config:
    name: str
    schedule: GuidanceSchedule
    scheduler: str = "ddim"
    steps: int = 50

    @property
    def key(self) -> str:
        return f"{self.scheduler}/{self.steps}/{self.name}"


def default_configs(scale: float = 7.5, stops=(0.25, 0.5, 0.75), schedulers=("ddim",), steps=(50,)) -> list[Config]:
    out = []
    for sch in schedulers:
        for st in steps:
            out.append(Config("full", GuidanceSchedule(scale), sch, st))
            for s in stops:
                for after in ("uncond", "cond"):
                    out.append(Config(f"stop={s} {after}", GuidanceSchedule(scale, stop=s, after=after), sch, st))
    return out


def _gen_all(pipe, prompts, sched, cfg, seed, batch):
    imgs, times, evals = [], [], []
    for i in range(0, len(prompts), batch):
        r = generate(pipe, prompts[i:i + batch], sched, steps=cfg.steps, seed=seed + i, scheduler=cfg.scheduler)
        imgs.append(r.images)
        times.append(r.wall_seconds)
        evals += r.evaluations_per_image
    return np.concatenate(imgs), times, evals


def _cache(folder: Path, name: str, compute):
    from safetensors.torch import load_file, save

    path = folder / f"{name}.safetensors"
    if path.exists():
        return load_file(str(path))["images"].numpy()
    imgs = compute()
    atomic_write_bytes(path, save({"images": torch.from_numpy(np.ascontiguousarray(imgs))}))
    return imgs


def run_sweep(pipe, prompts: list[str], out: str | Path, targets: list[dict] | None = None,
              configs: list[Config] | None = None, seed: int = 0, batch: int = 8, timing_batches: int = 3,
              clip=None, progress=None) -> list[dict]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    configs = configs or default_configs()
    done = {r["key"]: r for r in read_jsonl(out / "sweep.jsonl")}
    rows = []
    for cfg in configs:
        if cfg.key in done:
            rows.append(done[cfg.key])
            continue
        group = f"{cfg.scheduler}_{cfg.steps}"
        full_s = GuidanceSchedule(cfg.schedule.scale)
        ref = _cache(out, f"ref_{group}", lambda: _gen_all(pipe, prompts, full_s, cfg, seed, batch)[0])
        ratios, evals, imgs = [], [], []
        for bi, i in enumerate(range(0, len(prompts), batch)):
            part = prompts[i:i + batch]
            r = generate(pipe, part, cfg.schedule, steps=cfg.steps, seed=seed + i, scheduler=cfg.scheduler)
            imgs.append(r.images)
            evals += r.evaluations_per_image
            if bi < timing_batches:
                f = generate(pipe, part, full_s, steps=cfg.steps, seed=seed + i, scheduler=cfg.scheduler)
                ratios.append(r.wall_seconds / f.wall_seconds)
        imgs = np.concatenate(imgs)
        row = {"key": cfg.key, "name": cfg.name, "scheduler": cfg.scheduler, "steps": cfg.steps,
               "schedule": cfg.schedule.to_dict(), "n": len(prompts), "batch": batch,
               "time_ratio_median": statistics.median(ratios), "time_ratios": ratios,
               "saved_latency": 1 - statistics.median(ratios),
               "evaluations_per_image": float(np.mean(evals))}
        row["evaluation_ratio"] = row["evaluations_per_image"] / (2.0 * _calls(pipe, cfg))
        row["l1"] = mean_ci(l1(imgs, ref))
        row["psnr"] = mean_ci(np.minimum(psnr(imgs, ref), 100.0))
        if clip is not None:
            row["image_clip"] = mean_ci(clip.image_similarity(imgs, ref).numpy())
            row["clip_score"] = mean_ci(clip.clip_score(imgs, prompts).numpy())
        if targets is not None:
            acc = judged_accuracy(imgs, targets)
            acc_ref = judged_accuracy(ref, targets)
            row["accuracy"] = {a: float(v.mean()) for a, v in acc.items()}
            row["accuracy_delta_vs_full"] = {a: mean_ci(acc[a].astype(float) - acc_ref[a].astype(float))
                                             for a in acc}
        row = json.loads(json.dumps(row))  # the same values a resumed run reads back
        append_jsonl(out / "sweep.jsonl", row)
        rows.append(row)
        if progress:
            progress(cfg.key)
    if clip is not None:  # Image-CLIPScore floor: the same prompts with other seeds, against the reference
        c0 = configs[0]
        full0 = GuidanceSchedule(c0.schedule.scale)
        ref0 = _cache(out, f"ref_{c0.scheduler}_{c0.steps}", lambda: _gen_all(pipe, prompts, full0, c0, seed, batch)[0])
        floor = _cache(out, "floor", lambda: _gen_all(pipe, prompts, full0, c0, seed + 10**6, batch)[0])
        fl = mean_ci(clip.image_similarity(floor, ref0).numpy())
        for r in rows:
            r["image_clip_floor"] = fl
    write_summary(rows, out)
    return rows


def _calls(pipe, cfg: Config) -> int:
    from ..generate import count_calls
    from ..models import set_scheduler

    old = pipe.scheduler
    set_scheduler(pipe, cfg.scheduler)
    n = count_calls(pipe, cfg.steps)
    pipe.scheduler = old
    return n


def write_summary(rows: list[dict], out: Path) -> None:
    """sweep.csv and pareto.png (saved latency vs quality)."""
    import csv
    import io

    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["key", "saved_latency", "evaluation_ratio", "l1", "psnr", "image_clip", "clip_score", "accuracy_all"])
    for r in rows:
        w.writerow([r["key"], f"{r['saved_latency']:.4f}", f"{r['evaluation_ratio']:.4f}", f"{r['l1'][0]:.5f}",
                    f"{r['psnr'][0]:.2f}", f"{r.get('image_clip', [float('nan')])[0]:.3f}",
                    f"{r.get('clip_score', [float('nan')])[0]:.3f}", f"{r.get('accuracy', {}).get('all', float('nan')):.4f}"])
    from ..results import atomic_write_text

    atomic_write_text(out / "sweep.csv", buf.getvalue())
    from matplotlib.figure import Figure

    from .stages import save_figure

    fig = Figure(figsize=(6.4, 4.2), layout="constrained")
    ax = fig.add_subplot(111)
    qual = "accuracy" if rows and "accuracy" in rows[0] else "psnr"
    for r in rows:
        y = r["accuracy"]["all"] if qual == "accuracy" else r["psnr"][0]
        ax.scatter(r["saved_latency"] * 100, y, c="C0" if "uncond" in r["name"] else ("C1" if "cond" in r["name"] else "k"))
        ax.annotate(r["name"], (r["saved_latency"] * 100, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("saved latency vs full guidance (%)")
    ax.set_ylabel("all attributes right (share)" if qual == "accuracy" else "PSNR to full guidance (dB)")
    ax.set_title("Speed / quality")
    save_figure(fig, out / "pareto.png")


def passes(row: dict, tolerance: float = 0.01) -> tuple[bool, str]:
    """The calibrate rule: for every judged attribute, the paired 95% CI of (accuracy - full accuracy)
    lies above -tolerance (non-inferiority), and the mean Image-CLIPScore to full guidance is not
    below the seed-to-seed floor. Rows without judged accuracy use only the Image-CLIP rule (or,
    with no CLIP either, PSNR >= 30 dB)."""
    why = []
    for a, (m, lo, hi) in (row.get("accuracy_delta_vs_full") or {}).items():
        if a in ("one_object",):
            continue
        if lo < -tolerance:
            why.append(f"{a} accuracy CI lower bound {lo:+.3f} < -{tolerance}")
    if "image_clip" in row and "image_clip_floor" in row:
        if row["image_clip"][0] < row["image_clip_floor"][0]:
            why.append(f"Image-CLIP {row['image_clip'][0]:.1f} below the seed floor {row['image_clip_floor'][0]:.1f}")
    elif "accuracy_delta_vs_full" not in row and row["psnr"][0] < 30:
        why.append(f"PSNR {row['psnr'][0]:.1f} dB < 30 dB")
    return (not why), "; ".join(why) or "within tolerance"


def calibrate(rows: list[dict], tolerance: float = 0.01) -> tuple[dict | None, list[tuple[dict, bool, str]]]:
    """The fastest configuration that passes `passes` (None if none does), and every row's verdict."""
    verdicts = [(r, *passes(r, tolerance)) for r in rows if r["name"] != "full"]
    ok = [r for r, p, _ in verdicts if p]
    best = max(ok, key=lambda r: r["saved_latency"]) if ok else None
    return best, verdicts


def snippet(row: dict) -> str:
    s = row["schedule"]
    args = ", ".join(f"{k}={v!r}" for k, v in s.items() if v is not None and k != "adaptive")
    return ("from shapefirst import GuidanceSchedule, guidance_schedule\n"
            f"with guidance_schedule(pipe, GuidanceSchedule({args})):\n"
            f"    images = pipe(prompts, num_inference_steps={row['steps']}, guidance_scale={s['scale']}).images")
