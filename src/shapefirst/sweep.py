"""Speed/quality sweep of guidance schedules against full guidance, resumable.

For every (scheduler, steps) group, full guidance is the reference: its images (same seeds) are
computed once and cached. Each configuration then runs batch by batch; for the first
`timing_batches` batches, full guidance is rerun right after it on the same batch (A/B adjacent),
and the saved latency is 1 - median(t_config / t_full) (timing_batches=0: no timing, for quality
runs on a busy machine; time them alone in a second, small sweep). Quality against the reference:
L1, PSNR, CLIP image-embedding cosine ("Image-CLIPScore", with its floor: two seeds of the same
prompt, and its ceiling: the same seed rerun), judged accuracy per attribute (the world's judge),
CLIPScore to the prompt, and with `real_images` the distribution distances KID and FD on CLIP
image features against them (the shapes world: exact renders of the prompts' scenes).
A configuration is a guidance schedule (+ a late-stage cache), or any `run` function (a peer
method: diffusers' callbacks, the tgate package) that returns a GenerationResult.
One JSON line per finished configuration in sweep.jsonl; a rerun skips finished ones.
"""
from __future__ import annotations

import json
import statistics
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .cache import LateCache
from .generate import GenerationResult, generate
from .guidance import GuidanceSchedule
from .metrics import judged_accuracy, kernel_distance, frechet_distance, l1, mean_ci, psnr
from .timing import load_now, mark_void
from .results import append_jsonl, atomic_write_bytes, read_jsonl, strict_dumps
from .errors import ShapefirstError
from .generate import count_calls
from .guidance import AdaptiveStop
from .models import scheduler_for
from .noise_levels import run_noise_levels
from .outputs import OutputFolder
from .outputs import differences
from .outputs import model_fingerprint, module_fingerprint, text_digest, version
from .results import atomic_write_text, save_figure


@dataclass
class Config:
    name: str
    schedule: GuidanceSchedule
    scheduler: str = "ddim"
    steps: int = 50
    cache: LateCache | None = None
    run: Callable | None = None  # run(pipe, prompts, seed=, steps=, scheduler=) -> GenerationResult (peers)

    @property
    def key(self) -> str:
        return f"{self.scheduler}/{self.steps}/{self.name}"

    def generate(self, pipe, prompts: list[str], seed: int):
        if self.run is not None:
            return self.run(pipe, prompts, seed=seed, steps=self.steps, scheduler=self.scheduler)
        return generate(pipe, prompts, self.schedule, steps=self.steps, seed=seed, scheduler=self.scheduler,
                        cache=self.cache)


def default_configs(scale: float = 7.5, stops=(0.25, 0.5, 0.75), schedulers=("ddim",), steps=(50,),
                    modes=("uncond", "cond"), adaptive=(), caches=(None,), adaptive_shape=(),
                    stop_sigmas=()) -> list[Config]:
    """full guidance, then every stop x mode x cache, then every stop in noise level (GuidanceSchedule's
    stop_sigma, named 'stop_sigma=S': the same noise level at every scheduler and step count) x mode x cache,
    then every adaptive threshold x mode x cache, then every shape-settling tolerance
    (AdaptiveStop(criterion="shape"), named 'adaptive-shape=TOL') x mode x cache (per scheduler and step count).
    caches: LateCache objects or None (no cache)."""
    import itertools

    rules = [(f"stop={s}", dict(stop=s)) for s in stops]
    rules += [(f"stop_sigma={s:g}", dict(stop_sigma=s)) for s in stop_sigmas]
    stops_ = [AdaptiveStop(t) for t in adaptive] + [AdaptiveStop(criterion="shape", tolerance=t)
                                                    for t in adaptive_shape]
    rules += [(a.label, dict(adaptive=a)) for a in stops_]
    out = []
    for sch, st in itertools.product(schedulers, steps):
        out.append(Config("full", GuidanceSchedule(scale), sch, st))
        for (rule, kw), after, c in itertools.product(rules, modes, caches):
            name = f"{rule} {after}" + (f" +{c.label}" if c is not None else "")
            out.append(Config(name, GuidanceSchedule(scale, after=after, **kw), sch, st, cache=c))
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


def is_main_process() -> bool:
    """True unless this is a secondary process of an `accelerate launch` run."""
    st = _distributed()
    return st is None or st.is_main_process


def sweep_key(pipe, prompts, targets, seed, batch, clip, real_images) -> dict:
    """What every row of a sweep folder shares; a folder made with another key is not reused."""

    return {"model": model_fingerprint(pipe), "prompts": text_digest(prompts), "targets": text_digest(targets),
            "n": len(prompts), "seed": seed, "batch": batch, "version": version(),
            "clip": None if clip is None else module_fingerprint(clip.model),
            "real_images": None if real_images is None
                           else text_digest(np.asarray(real_images).sum(axis=(1, 2, 3)).round(4).tolist())}


def _config_of(cfg: Config) -> dict:
    return json.loads(strict_dumps({"schedule": cfg.schedule.to_dict(),
                                    "cache": cfg.cache.to_dict() if cfg.cache else None,
                                    "scheduler": cfg.scheduler, "steps": cfg.steps, "peer": cfg.run is not None}))


def _reusable(out: Path, owner, configs: list[Config], overwrite: bool) -> dict:
    """The finished rows that may be reused: same folder key (checked by owner) and same configuration."""

    done = {r["key"]: r for r in read_jsonl(out / "sweep.jsonl")} if owner.reused else {}
    for cfg in configs:
        old = done.get(cfg.key)
        new = _config_of(cfg)
        if old is not None and {k: old.get(k) for k in new} != new:
            if not overwrite:
                raise ShapefirstError(f"{out} holds row {cfg.key!r} made with another configuration "
                                      f"(other {differences({k: old.get(k) for k in new}, new)})",
                                      "pass --overwrite to recompute the sweep, or a fresh --out folder")
            owner.remove_own()
            return {}
    return done


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


def _per_image(imgs, ref, targets, clip, memo: dict) -> dict:
    out = {"l1": l1(imgs, ref), "psnr": np.minimum(psnr(imgs, ref), 100.0)}
    if clip is not None:
        f = clip.image_features(imgs)
        out["feat"] = f.numpy()
        out["image_clip"] = (100 * (f * memo["feat"]).sum(-1)).numpy()
        out["clip_score"] = (100 * (f * memo["text"]).sum(-1).clamp(min=0)).numpy()
    if targets is not None:
        acc, acc_ref = judged_accuracy(imgs, targets), memo["acc"]
        for a in acc:
            out[f"acc/{a}"] = acc[a].astype(float)
            out[f"delta/{a}"] = acc[a].astype(float) - acc_ref[a].astype(float)
    return out


KID_MIN_N = 4  # per side: KID's unbiased estimate needs 2, its interval half-size subsets of at least 2
FLOOR_MIN_N = 2  # images for the Image-CLIP seed floor and ceiling: a mean with an interval
FID_MIN_N = 2  # per side (shapefirst.fid)


def distribution_distances(feats: np.ndarray, real: np.ndarray, subsets: int = 50, seed: int = 0) -> dict:
    """KID (x1000) and FD between two CLIP feature sets. KID's interval: the spread of KID over random
    half-size subsets (drawn without replacement, as torch-fidelity does), scaled by sqrt(m / n) to the
    full sample size, +-1.96 of that: an approximate 95% interval. A distance the sample is too small
    for is left out and named in "skipped" ({name: why}); fd_clip is then None with its fd_clip_reason."""
    x, y = torch.from_numpy(feats), torch.from_numpy(real)
    out = {"distance_n": [len(x), len(y)], "skipped": {}}
    if min(len(x), len(y)) >= KID_MIN_N:
        out["kid_x1000"] = _kid_x1000(x, y, subsets, seed)
    else:
        out["skipped"]["kid_x1000"] = (f"KID needs n >= {KID_MIN_N} images per side (got {len(x)} generated, "
                                       f"{len(y)} real); pass --n {KID_MIN_N} or more")
    if len(x) > x.shape[1] and len(y) > y.shape[1]:
        out["fd_clip"] = frechet_distance(x, y)
    else:  # a covariance of d features needs more than d images
        out["fd_clip"] = None
        out["fd_clip_reason"] = f"needs more images than the {x.shape[1]} feature dimensions (n={len(x)}, {len(y)})"
        out["skipped"]["fd_clip"] = f"FD {out['fd_clip_reason']}; pass --n {x.shape[1] + 1} or more"
    return out


def _kid_x1000(x: torch.Tensor, y: torch.Tensor, subsets: int, seed: int) -> list[float]:
    """[KID, low, high] x1000 (n >= KID_MIN_N per side)."""
    rng = np.random.default_rng(seed)
    kid = kernel_distance(x, y)
    m = max(2, min(len(x), len(y)) // 2)
    sub = [kernel_distance(x[rng.choice(len(x), m, replace=False)], y[rng.choice(len(y), m, replace=False)])
           for _ in range(subsets)]
    half = 1.96 * float(np.std(sub, ddof=1)) * (m / min(len(x), len(y))) ** 0.5
    return [1000 * kid, 1000 * (kid - half), 1000 * (kid + half)]


def skipped_reasons(rows: list[dict]) -> list[str]:
    """Every distinct 'METRIC skipped: why' of the rows, in order."""
    out = []
    for r in rows:
        for name, why in (r.get("skipped") or {}).items():
            line = f"{name} skipped: {why}"
            if line not in out:
                out.append(line)
    return out


def run_sweep(pipe, prompts: list[str], out: str | Path, targets: list[dict] | None = None,
              configs: list[Config] | None = None, seed: int = 0, batch: int = 8, timing_batches: int = 3,
              clip=None, progress=None, real_images: np.ndarray | None = None,
              floor_prompts: int | None = None, fid=None, overwrite: bool = False,
              warn_void: bool = True) -> list[dict]:
    """Run (or resume) the sweep (`warn_void`: a warning per void timing, shapefirst.timing; the report says so
    on its page instead). Under `accelerate launch` the batches (same makeup as a single
    process, so the same numbers) are split across processes and the main process writes.
    real_images: one image per prompt (KID/FD on CLIP features against them; needs clip).
    floor_prompts: compute the Image-CLIPScore seed floor on the first N prompts only (default all).
    fid: a shapefirst.fid.Fid holding the real images' features (real models): FID per configuration.
    out is keyed (sweep_key, and each row by its configuration): a folder made with other settings
    is refused unless overwrite=True, which replaces only the sweep's own files."""

    out = Path(out)
    configs = configs or default_configs()
    st = _distributed()
    if st is not None and fid is not None:

        raise ShapefirstError("FID is computed in one process only", "run the sweep without accelerate launch for FID")
    main = st is None or st.is_main_process
    owner = OutputFolder(out, "sweep", sweep_key(pipe, prompts, targets, seed, batch, clip, real_images),
                         overwrite=overwrite)
    done = _claim(out, owner, configs, overwrite, st, main)
    sw = _Sweep(pipe, prompts, out, targets, seed, batch, clip, st, real_images, fid)
    try:
        rows = _run_configs(sw, configs, done, timing_batches, floor_prompts, owner, progress)
        if main:
            write_summary(rows, out)
            for line in skipped_reasons(rows) + (mark_void(rows) if warn_void else []):
                warnings.warn(line, stacklevel=2)
    finally:  # also after a failure: the marker lists every file written (an --overwrite removes them all)
        if main:
            owner.claim(_own_entries(out))
    if st is not None:
        st.wait_for_everyone()
    return rows


def _run_configs(sw, configs: list[Config], done: dict, timing_batches: int, floor_prompts, owner,
                 progress) -> list[dict]:
    """Every configuration's row: reused from `done`, else computed and saved (per-image values, then the line)."""
    main = sw.st is None or sw.st.is_main_process
    bounds = sw.bounds(configs[0], floor_prompts) if sw.clip is not None and configs else {}
    rows = []
    for cfg in configs:
        if cfg.key in done:
            rows.append(done[cfg.key])
            continue
        row = sw.row(cfg, sw.records(cfg, timing_batches), bounds)
        if main:  # raw per-image values first (paired comparisons between any two rows), then the line
            _save_per_image(sw.out / row["per_image_file"], sw.per)
            append_jsonl(sw.out / "sweep.jsonl", row)
            owner.claim(_own_entries(sw.out))
        if sw.st is not None:
            sw.st.wait_for_everyone()
        rows.append(row)
        if progress and main:
            progress(cfg.key)
    return rows


OWN_PATTERNS = ("sweep.jsonl", "sweep.csv", "pareto.png", "per_image", "ref_*.safetensors", "floor_*.safetensors",
                "rerun_*.safetensors")


def _own_entries(out: Path) -> list[str]:
    """The files a sweep writes (never a user's file that happens to sit in the folder)."""
    import fnmatch

    return [p.name for p in out.iterdir() if any(fnmatch.fnmatch(p.name, pat) for pat in OWN_PATTERNS)]


def _claim(out: Path, owner, configs, overwrite: bool, st, main: bool) -> dict:
    """The main process checks and claims the folder; the others follow it. Returns the reusable rows."""
    done = {}
    if main:
        owner.check()
        done = _reusable(out, owner, configs, overwrite)
        out.mkdir(parents=True, exist_ok=True)
        owner.claim()
    if st is not None:
        st.wait_for_everyone()
        done = done if main else {r["key"]: r for r in read_jsonl(out / "sweep.jsonl")}
    return done


class _Sweep:
    """One sweep's shared inputs, its cached reference images and the per-batch records of a configuration."""

    def __init__(self, pipe, prompts, out, targets, seed, batch, clip, st, real_images, fid):
        (self.pipe, self.prompts, self.out, self.targets,
         self.seed, self.batch) = pipe, prompts, out, targets, seed, batch
        self.clip, self.st, self.real_images, self.fid = clip, st, real_images, fid
        self.starts = list(range(0, len(prompts), batch))
        self.memo, self.per = {}, {}

    def ref_of(self, cfg, i, offset=0):
        """Full guidance's images of batch i (seed offset: the floor's other seeds), cached on disk."""
        part = self.prompts[i:i + self.batch]
        name = f"{'floor' if offset else 'ref'}_{cfg.scheduler}_{cfg.steps}_w{cfg.schedule.scale:g}_{i}"
        return _cache(self.out, name, lambda: generate(self.pipe, part, GuidanceSchedule(cfg.schedule.scale),
                                                       steps=cfg.steps, seed=self.seed + offset + i,
                                                       scheduler=cfg.scheduler).images)

    def memo_of(self, cfg, i):
        """What every configuration compares against, computed once per reference batch."""
        k = (cfg.scheduler, cfg.steps, cfg.schedule.scale, i)
        if k not in self.memo:
            ref, m = self.ref_of(cfg, i), {}
            if self.clip is not None:
                m["feat"], m["text"] = (self.clip.image_features(ref),
                                        self.clip.text_features(self.prompts[i:i + self.batch]))
            if self.targets is not None:
                m["acc"] = judged_accuracy(ref, self.targets[i:i + self.batch])
            self.memo[k] = (ref, m)
        return self.memo[k]

    def bounds(self, c0, floor_prompts) -> dict:
        """Image-CLIPScore floor (the same prompts with other seeds) and ceiling (the same seed rerun); each
        needs FLOOR_MIN_N images, else it is named in "skipped" ({name: why})."""
        fstarts = [i for i in self.starts if floor_prompts is None or i < floor_prompts]
        floor_n = sum(len(self.prompts[i:i + self.batch]) for i in fstarts)
        ceiling_n = len(self.prompts[:self.batch])
        out, skipped = {}, {}
        if floor_n >= FLOOR_MIN_N:
            out.update(self._floor(c0, fstarts, floor_n))
        else:
            skipped["image_clip_floor"] = (f"the Image-CLIP seed floor needs n >= {FLOOR_MIN_N} prompts for its "
                                           f"interval (got {floor_n}); pass --n {FLOOR_MIN_N} or more")
        if ceiling_n >= FLOOR_MIN_N:
            out.update(self._ceiling(c0, ceiling_n))
        else:
            skipped["image_clip_ceiling"] = (f"the Image-CLIP rerun ceiling needs >= {FLOOR_MIN_N} images in the "
                                             f"first batch for its interval (got {ceiling_n}); pass --batch "
                                             f"{FLOOR_MIN_N} or more and --n {FLOOR_MIN_N} or more")
        return {**out, "skipped": skipped}

    def _floor(self, c0, fstarts: list[int], floor_n: int) -> dict:
        recs = [(i, self.clip.image_similarity(self.ref_of(c0, i, 10**6), self.ref_of(c0, i)).numpy())
                for i in _mine(self.st, fstarts)]
        return {"image_clip_floor": list(mean_ci(np.concatenate([r[1] for r in _gather(self.st, recs)]))),
                "image_clip_floor_n": floor_n}

    def _ceiling(self, c0, ceiling_n: int) -> dict:
        rerun = _cache(self.out, f"rerun_{c0.scheduler}_{c0.steps}_w{c0.schedule.scale:g}_0", lambda: generate(
            self.pipe, self.prompts[:self.batch], GuidanceSchedule(c0.schedule.scale), steps=c0.steps, seed=self.seed,
            scheduler=c0.scheduler).images)
        return {"image_clip_ceiling": list(mean_ci(self.clip.image_similarity(rerun, self.ref_of(c0, 0)).numpy())),
                "image_clip_ceiling_n": ceiling_n}

    def records(self, cfg, timing_batches: int) -> list:
        """(batch start, per-image values, time ratio to full guidance or None, evaluations) per batch."""
        n_calls, records = _calls(self.pipe, cfg), []
        if self.fid is not None:
            self.fid.reset_fake()
        for i in _mine(self.st, self.starts):
            part = self.prompts[i:i + self.batch]
            ref, m = self.memo_of(cfg, i)
            timed = i // self.batch < timing_batches
            if cfg.run is None and cfg.cache is None and not cfg.schedule.stops and not timed:
                # full guidance untimed: its images ARE the cached reference (same seeds, same computation)
                r = GenerationResult(ref, part, [], [2 * n_calls] * len(part), 0.0)
            else:
                r = cfg.generate(self.pipe, part, self.seed + i)
            ratio = None
            if timed:
                f = generate(self.pipe, part, GuidanceSchedule(cfg.schedule.scale),
                             steps=cfg.steps, seed=self.seed + i, scheduler=cfg.scheduler)
                ratio = r.wall_seconds / f.wall_seconds
            per = _per_image(r.images, ref, self.targets[i:i + self.batch] if self.targets else None, self.clip, m)
            if self.fid is not None:
                self.fid.update(r.images, real=False)
            records.append((i, per, ratio, r.evaluations_per_image))
        return _gather(self.st, records)

    def row(self, cfg, records, bounds) -> dict:
        """The JSON line of one configuration (self.per: its per-image values, saved beside it)."""
        per = self.per = {k: np.concatenate([rec[1][k] for rec in records]) for k in records[0][1]}
        ratios = [rec[2] for rec in records if rec[2] is not None]
        evals = [e for rec in records for e in rec[3]]
        row = {"key": cfg.key, "name": cfg.name, "scheduler": cfg.scheduler, "steps": cfg.steps,
               "schedule": cfg.schedule.to_dict(), "cache": cfg.cache.to_dict() if cfg.cache else None,
               "peer": cfg.run is not None, "n": len(self.prompts), "batch": self.batch,
               "time_ratio_median": statistics.median(ratios) if ratios else None, "time_ratios": ratios,
               "saved_latency": 1 - statistics.median(ratios) if ratios else None,
               "load": load_now() if ratios else None,
               "evaluations_per_image": float(np.mean(evals)),
               "l1": mean_ci(per["l1"]), "psnr": mean_ci(per["psnr"])}
        row["evaluation_ratio"] = row["evaluations_per_image"] / (2.0 * _calls(self.pipe, cfg))
        row["skipped"] = {}
        if self.clip is not None:
            row["image_clip"] = mean_ci(per["image_clip"])
            row["clip_score"] = mean_ci(per["clip_score"])
            _merge(row, bounds)
            if self.real_images is not None:
                real = np.concatenate([_real_feats(self.clip, self.real_images, i, self.batch, self.memo)
                                       for i in self.starts])
                _merge(row, distribution_distances(per["feat"], real))
        if self.fid is not None:
            _merge(row, _fid_of(self.fid))
        if self.targets is not None:
            attrs = [k[4:] for k in per if k.startswith("acc/")]
            row["accuracy"] = {a: float(per[f"acc/{a}"].mean()) for a in attrs}
            row["accuracy_delta_vs_full"] = {a: mean_ci(per[f"delta/{a}"]) for a in attrs}
        row["per_image_file"] = f"per_image/{_slug(cfg.key)}.safetensors"
        return json.loads(strict_dumps(row))  # the same values a resumed run reads back


def _merge(row: dict, part: dict) -> None:
    """row.update(part), its "skipped" entries added to the row's."""
    part = dict(part)
    row["skipped"].update(part.pop("skipped", {}))
    row.update(part)


def _fid_of(fid) -> dict:
    """FID of the configuration's images against the real ones, or why it is skipped."""
    if min(fid.n_real, fid.n_fake) < FID_MIN_N:
        return {"skipped": {"fid": f"FID needs n >= {FID_MIN_N} images per side (got {fid.n_real} real, "
                                   f"{fid.n_fake} generated); pass --n {FID_MIN_N} or more"}}
    return {"fid": fid.compute(), "fid_n": [fid.n_real, fid.n_fake]}


def _slug(key: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9_.=+-]+", "_", key)


def _save_per_image(path: Path, per: dict) -> None:
    from safetensors.torch import save

    tensors = {k.replace("/", "."): torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32))
               for k, v in per.items()}
    atomic_write_bytes(path, save(tensors))


def per_image(out: str | Path, row: dict) -> dict[str, np.ndarray]:
    """The per-image values behind a sweep row (l1, psnr, image_clip, clip_score, feat, acc/A, delta/A)."""
    from safetensors.torch import load_file

    return {k.replace(".", "/", 1) if k.startswith(("acc.", "delta.")) else k: v.numpy()
            for k, v in load_file(str(Path(out) / row["per_image_file"])).items()}


def paired_difference(out: str | Path, a: dict, b: dict, attribute: str = "all") -> tuple[float, float, float]:
    """Mean and 95% CI of (accuracy of row a - accuracy of row b) over the same prompts and seeds."""
    pa, pb = per_image(out, a), per_image(out, b)
    return mean_ci(pa[f"acc/{attribute}"] - pb[f"acc/{attribute}"])


def _real_feats(clip, real_images, i, batch, memo) -> np.ndarray:
    if ("real", i) not in memo:
        memo[("real", i)] = clip.image_features(real_images[i:i + batch]).numpy()
    return memo[("real", i)]


def _calls(pipe, cfg: Config) -> int:
    with scheduler_for(pipe, cfg.scheduler):
        return count_calls(pipe, cfg.steps)


def saving(row: dict) -> tuple[float, str]:
    """(saved fraction, what it is): the measured saved latency, or the saved denoiser evaluations when the row
    was not timed (timing_batches=0) or its timing is void (shapefirst.timing.mark_void)."""
    if row.get("saved_latency") is not None and not row.get("timing_void"):
        return row["saved_latency"], "latency"
    return 1 - row["evaluation_ratio"], "evaluations"


def _timing_note(r: dict) -> str:
    if r.get("saved_latency") is None:
        return "untimed"
    noise = r.get("timing_noise")
    noise_txt = "not timed: noise unknown" if noise is None else f"{noise:.1%}"
    void = "VOID " if r.get("timing_void") else ""
    return f"{void}(full vs itself {noise_txt}, load {_fmt(r.get('load'), '.2f')})"


def _fmt(x, spec: str) -> str:
    return "" if x is None or (isinstance(x, float) and np.isnan(x)) else format(x, spec)


def write_summary(rows: list[dict], out: Path) -> None:
    """sweep.csv and pareto.png (saved latency, or saved evaluations when untimed, vs quality)."""
    import csv
    import io

    from matplotlib.figure import Figure


    mark_void(rows)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["key", "saved_latency", "evaluation_ratio", "l1", "psnr", "image_clip", "clip_score", "accuracy_all",
                "kid_x1000", "fd_clip", "n", "skipped", "timing"])
    for r in rows:
        w.writerow([r["key"], _fmt(r["saved_latency"], ".4f"), f"{r['evaluation_ratio']:.4f}", f"{r['l1'][0]:.5f}",
                    f"{r['psnr'][0]:.2f}", _fmt(r.get("image_clip", [None])[0], ".3f"),
                    _fmt(r.get("clip_score", [None])[0], ".3f"), _fmt(r.get("accuracy", {}).get("all"), ".4f"),
                    _fmt(r.get("kid_x1000", [None])[0], ".3f"), _fmt(r.get("fd_clip"), ".4f"), r["n"],
                    "; ".join(f"{k}: {v}" for k, v in (r.get("skipped") or {}).items()),
                    _timing_note(r)])
    atomic_write_text(out / "sweep.csv", buf.getvalue())
    fig = Figure(figsize=(6.4, 4.2), layout="constrained")
    ax = fig.add_subplot(111)
    qual = "accuracy" if rows and "accuracy" in rows[0] else "psnr"
    what = "latency"
    for r in rows:
        y = r["accuracy"]["all"] if qual == "accuracy" else r["psnr"][0]
        x, kind = saving(r)
        what = kind if kind == "evaluations" else what
        color = "C2" if r.get("peer") else ("C0" if "uncond" in r["name"] else ("C1" if "cond" in r["name"] else "k"))
        ax.scatter(x * 100, y, c=color)
        ax.annotate(r["name"], (x * 100, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel(f"saved {what} vs full guidance (%)")
    ax.set_ylabel("all attributes right (share)" if qual == "accuracy" else "PSNR to full guidance (dB)")
    void = any(r.get("timing_void") for r in rows)
    ax.set_title("Speed / quality" + (" (timings void on a busy machine: x is saved evaluations)" if void else ""),
                 fontsize=10 if void else None)
    save_figure(fig, out / "pareto.png")


def passes(row: dict, tolerance: float = 0.01) -> tuple[bool, str]:
    """The calibrate rule: for every judged attribute, the paired 95% CI of (accuracy - full accuracy)
    lies above -tolerance (non-inferiority), and the mean Image-CLIPScore to full guidance is not
    below the seed-to-seed floor. Rows without judged accuracy use only the Image-CLIP rule (or,
    with no CLIP either, PSNR >= 30 dB)."""
    why = []
    deltas = {a: d for a, d in (row.get("accuracy_delta_vs_full") or {}).items() if a != "one_object"}
    if any(lo is None for _, lo, _ in deltas.values()):  # n = 1: a mean without an interval shows nothing
        why.append(f"the accuracy differences have no confidence interval at n={row.get('n')} (needs n >= 2 prompts)")
    for a, (m, lo, hi) in deltas.items():
        if lo is not None and lo < -tolerance:
            why.append(f"{a} accuracy CI lower bound {lo:+.3f} < -{tolerance}")
    if "image_clip" in row and "image_clip_floor" in row:
        if row["image_clip"][0] < row["image_clip_floor"][0]:
            why.append(f"Image-CLIP {row['image_clip'][0]:.1f} below the seed floor {row['image_clip_floor'][0]:.1f}")
    elif "accuracy_delta_vs_full" not in row and row["psnr"][0] < 30:
        why.append(f"PSNR {row['psnr'][0]:.1f} dB < 30 dB")
    return (not why), "; ".join(why) or "within tolerance"


def calibrate(rows: list[dict], tolerance: float = 0.01) -> tuple[dict | None, list[tuple[dict, bool, str]]]:
    """The fastest configuration that passes `passes` (None if none does), and every row's verdict. A void
    timing (shapefirst.timing) is not ranked by: such rows count by their saved evaluations."""
    mark_void(rows)
    verdicts = [(r, *passes(r, tolerance)) for r in rows if r["name"] != "full"]
    ok = [r for r, p, _ in verdicts if p]
    best = max(ok, key=lambda r: saving(r)[0]) if ok else None
    return best, verdicts


def noise_level_window(pipe, row: dict) -> dict | None:
    """Where a row's fixed guidance window falls in noise level at the row's own scheduler and step count:
    {"stop_sigma": the noise level of its first unguided call, "start_sigma": that of its first guided call (None
    from the start), "calls": [first guided, first unguided], "n_calls"}. GuidanceSchedule(stop_sigma=...,
    start_sigma=...) then guides exactly the same calls there, and the same noise levels at any other scheduler
    (shapefirst.noise_levels). None for full guidance, adaptive stops and peers."""
    sched = GuidanceSchedule.from_dict(row["schedule"])
    if row.get("peer") or sched.adaptive is not None or not sched.stops:
        return None
    with scheduler_for(pipe, row["scheduler"]):
        sch = type(pipe.scheduler).from_config(pipe.scheduler.config)
    sch.set_timesteps(row["steps"])
    levels = run_noise_levels(sch, len(sch.timesteps))
    first, stop = sched.first_guided_call(len(levels), levels), sched.first_unguided_call(len(levels), levels)
    return {"stop_sigma": levels[stop] if stop < len(levels) else None,
            "start_sigma": levels[first] if first > 0 else None, "calls": [first, stop], "n_calls": len(levels)}


def in_noise_level(row: dict, window: dict) -> dict:
    """The row with its fixed window restated in noise level (noise_level_window): its schedule guides the same
    calls at the row's scheduler and step count, and the same noise levels at any other."""
    s = dict(row["schedule"])
    for k in ("stop", "stop_step", "start", "start_step"):
        s[k] = None
    s["stop_sigma"], s["start_sigma"] = window["stop_sigma"], window["start_sigma"]
    return {**row, "schedule": s}


def snippet(row: dict) -> str:
    s = dict(row["schedule"])
    ad = s.pop("adaptive", None)
    args = ", ".join(f"{k}={v!r}" for k, v in s.items() if v is not None)
    if ad:
        args += ", adaptive=AdaptiveStop(" + ", ".join(f"{k}={v!r}" for k, v in ad.items()) + ")"
    imports = "AdaptiveStop, GuidanceSchedule, guidance_schedule" if ad else "GuidanceSchedule, guidance_schedule"
    c = row.get("cache")
    if c:
        cargs = ", ".join(f"{k}={v!r}" for k, v in c.items())
        return (f"from shapefirst import {imports}, LateCache, late_cache\n"
                f"with guidance_schedule(pipe, GuidanceSchedule({args})), late_cache(pipe, LateCache({cargs})):\n"
                f"    images = pipe(prompts, num_inference_steps={row['steps']}, guidance_scale={s['scale']}).images")
    return (f"from shapefirst import {imports}\n"
            f"with guidance_schedule(pipe, GuidanceSchedule({args})):\n"
            f"    images = pipe(prompts, num_inference_steps={row['steps']}, guidance_scale={s['scale']}).images")
