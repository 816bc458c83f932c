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


def _cache(folder: Path, name: str, compute):
    from safetensors.torch import load_file, save

    path = folder / f"{name}.safetensors"
    if path.exists():
        return load_file(str(path))["images"].numpy()
    imgs = compute()
    atomic_write_bytes(path, save({"images": torch.from_numpy(np.ascontiguousarray(imgs))}))
    return imgs


def _distributed():
    """accelerate's PartialState when launched with several processes (`accelerate launch`), else None."""
    try:
        from accelerate import PartialState
    except ImportError:  # pragma: no cover
        return None
    st = PartialState()
    return st if st.num_processes > 1 else None


def _mine(st, items: list) -> list:
    if st is None:
        return items
    with st.split_between_processes(items) as part:
        return list(part)


def _gather(st, records: list) -> list:
    if st is None:
        return records
    from accelerate.utils import gather_object

    return sorted(gather_object(records), key=lambda r: r[0])


def _per_image(imgs, ref, prompts, targets, clip) -> dict:
    out = {"l1": l1(imgs, ref), "psnr": np.minimum(psnr(imgs, ref), 100.0)}
    if clip is not None:
        out["image_clip"] = clip.image_similarity(imgs, ref).numpy()
        out["clip_score"] = clip.clip_score(imgs, prompts).numpy()
    if targets is not None:
        acc, acc_ref = judged_accuracy(imgs, targets), judged_accuracy(ref, targets)
        for a in acc:
            out[f"acc/{a}"] = acc[a].astype(float)
            out[f"delta/{a}"] = acc[a].astype(float) - acc_ref[a].astype(float)
    return out


def run_sweep(pipe, prompts: list[str], out: str | Path, targets: list[dict] | None = None,
              configs: list[Config] | None = None, seed: int = 0, batch: int = 8, timing_batches: int = 3,
              clip=None, progress=None) -> list[dict]:
    """Run (or resume) the sweep. Under `accelerate launch` the batches (same makeup as a single
    process, so the same numbers) are split across processes and the main process writes."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    configs = configs or default_configs()
    st = _distributed()
    main = st is None or st.is_main_process
    done = {r["key"]: r for r in read_jsonl(out / "sweep.jsonl")}
    starts = list(range(0, len(prompts), batch))
    rows = []

    def ref_of(cfg, i, offset=0):
        part = prompts[i:i + batch]
        name = f"{'floor' if offset else 'ref'}_{cfg.scheduler}_{cfg.steps}_{i}"
        return _cache(out, name, lambda: generate(pipe, part, GuidanceSchedule(cfg.schedule.scale), steps=cfg.steps,
                                                  seed=seed + offset + i, scheduler=cfg.scheduler).images)

    for cfg in configs:
        if cfg.key in done:
            rows.append(done[cfg.key])
            continue
        full_s = GuidanceSchedule(cfg.schedule.scale)
        records = []
        for i in _mine(st, starts):
            part = prompts[i:i + batch]
            ref = ref_of(cfg, i)
            r = generate(pipe, part, cfg.schedule, steps=cfg.steps, seed=seed + i, scheduler=cfg.scheduler)
            ratio = None
            if i // batch < timing_batches:
                f = generate(pipe, part, full_s, steps=cfg.steps, seed=seed + i, scheduler=cfg.scheduler)
                ratio = r.wall_seconds / f.wall_seconds
            per = _per_image(r.images, ref, part, targets[i:i + batch] if targets else None, clip)
            records.append((i, per, ratio, r.evaluations_per_image))
        records = _gather(st, records)
        per = {k: np.concatenate([rec[1][k] for rec in records]) for k in records[0][1]}
        ratios = [rec[2] for rec in records if rec[2] is not None]
        evals = [e for rec in records for e in rec[3]]
        row = {"key": cfg.key, "name": cfg.name, "scheduler": cfg.scheduler, "steps": cfg.steps,
               "schedule": cfg.schedule.to_dict(), "n": len(prompts), "batch": batch,
               "time_ratio_median": statistics.median(ratios), "time_ratios": ratios,
               "saved_latency": 1 - statistics.median(ratios),
               "evaluations_per_image": float(np.mean(evals)),
               "l1": mean_ci(per["l1"]), "psnr": mean_ci(per["psnr"])}
        row["evaluation_ratio"] = row["evaluations_per_image"] / (2.0 * _calls(pipe, cfg))
        if clip is not None:
            row["image_clip"] = mean_ci(per["image_clip"])
            row["clip_score"] = mean_ci(per["clip_score"])
        if targets is not None:
            attrs = [k[4:] for k in per if k.startswith("acc/")]
            row["accuracy"] = {a: float(per[f"acc/{a}"].mean()) for a in attrs}
            row["accuracy_delta_vs_full"] = {a: mean_ci(per[f"delta/{a}"]) for a in attrs}
        row = json.loads(json.dumps(row))  # the same values a resumed run reads back
        if main:
            append_jsonl(out / "sweep.jsonl", row)
        if st is not None:
            st.wait_for_everyone()
        rows.append(row)
        if progress and main:
            progress(cfg.key)
    if clip is not None:  # Image-CLIPScore floor: the same prompts with other seeds, against the reference
        c0 = configs[0]
        recs = [(i, clip.image_similarity(ref_of(c0, i, 10**6), ref_of(c0, i)).numpy()) for i in _mine(st, starts)]
        fl = mean_ci(np.concatenate([r[1] for r in _gather(st, recs)]))
        for r in rows:
            r["image_clip_floor"] = list(fl)
    if main:
        write_summary(rows, out)
    if st is not None:
        st.wait_for_everyone()
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

    from ..results import save_figure

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
