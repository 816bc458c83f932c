"""shapefirst against its peers on one model, one prompt set, one seed per image, several cost levels.

Peers (../shared/PAPER.md): diffusers' SDCFGCutoffCallback (run as diffusers ships it), the `tgate`
package (T-GATE, run as it ships: its own copied pipeline method `pipe.tgate`; it stops CFG itself at
its gate step, conditional branch after, so "T-GATE + a guidance stop" is T-GATE alone, and the stop
with T-GATE's cross-attention reuse is shapefirst's own `+mean` late cache), the `DeepCache` package
(DeepCacheSDHelper as it ships, alone and under shapefirst's fixed stop: see `deepcache`), Adaptive Guidance
(Castillo et al. 2023: stop CFG per sample once cos(cond, uncond) >= threshold, conditional branch
after), Guidance Interval (Kynkaanniemi et al. 2024: guidance only for sigma in (0.28, 5.42], the
paper's SD-XL interval, conditional branch outside) and Step AG ("How Much To Guide" 2025: guidance
for a fixed first fraction of the steps, conditional after). The last three have no package for
diffusers pipelines; they are shapefirst GuidanceSchedules built from their papers' rules.
diffusers' modular `ClassifierFreeGuidance(start, stop)` guider cannot run on the embedded model:
diffusers 0.42 ships modular pipelines for SDXL and SD3 but none for SD 1.x. Its rule (CFG inside
[start, stop), the conditional branch outside) is GuidanceSchedule(start, stop, after="cond"), which
gives its latents on a tiny SDXL pipeline (tests/test_modular_guider.py), so the "Step AG" rows
below are also that guider's.

On a transformer model (`--model FOLDER`, e.g. the shapes world trained with `shapefirst train --arch dit`) the
UNet-only peers (tgate, DeepCache, SD's callback) are left out and `--tcaches faster,pab,fbc,taylorseer,mag` adds
diffusers' transformer caches as diffusers 0.42 ships them (shapefirst.transformer_cache), each alone and, where it
composes, under shapefirst's stop at every level; `--cache-dit` adds the cache-dit package's cache at its defaults
(shapefirst.cache_dit_peer), alone and under the stop.

Needs `pip install tgate==1.0.0` (it pulls DeepCache 0.1.1; both run with diffusers 0.42). Two phases, so that
quality can run on a busy machine and timing alone:
    python benchmarks/peers.py quality --n 1000 --out /work/bench/peers   # no timing (deterministic)
    python benchmarks/peers.py timing --n 40 --out /work/bench/peers      # run ALONE: A/B adjacent timing
    python benchmarks/peers.py timing --n 8 --batch 1 --out /work/bench/peers   # batch 1, alone
    python benchmarks/peers.py merge --out /work/bench/peers --dest benchmarks/results/peers_w3
    python benchmarks/peers.py table --out benchmarks/results/peers_w3    # print, draw pareto.png
    python benchmarks/peers.py ship --out benchmarks/results/peers_w3     # the report's default section
    python benchmarks/peers.py e2e --scheduler dpm++ --steps 20 --n 40 --only "NAME" --dest STUDY  # ALONE: the line
        # a user sees: full guidance at --base ddim:50 (quality from --base-study) against NAME at this solver
    shapefirst report --page-only --out REPORT --peers /work/bench/peers  # the study as a report section
All phases resume (one JSON line per finished configuration). `merge` keeps a run's rows (by name, a rerun
replacing the kept row) and its per-image judgments (judged.safetensors) in the repository's study, so the
paired differences survive the run folder; `table` works on either. The quality phase judges every image
with the shapes world's judge (paired difference to full guidance, same seed), Image-CLIPScore to
the full-guidance image, CLIPScore, and KID / FD on CLIP features against the exact renders.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import shutil
import statistics
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch

from shapefirst.cache import LateCache
from shapefirst.timing import check_alone
from shapefirst.peers import PHASES, batch1_only, merge_study, paired, pareto_plot, read_study, rows_file
from shapefirst.sweep import (
    Config,
    distribution_distances,
    passes,
    per_image,
    run_sweep,
    saving,
)
from shapefirst.generate import GenerationResult
from shapefirst.guidance import (
    AdaptiveStop,
    GuidanceSchedule,
    denoiser_of,
    guidance_schedule,
    latent_input,
)
from shapefirst.models import default_guidance, load_pipeline, scheduler_for, world_clip
from shapefirst.pipeline import call_defaults
from shapefirst.results import read_jsonl
from shapefirst.world.prompts import world_prompts, world_renders


def run_pipe(pipe, prompts, seed, steps, scheduler, scale=7.5, call=None, **kw) -> GenerationResult:
    """Run a pipeline (or a peer's own pipeline method) exactly as shapefirst.generate seeds it
    (image i: generator seed + i), counting denoiser rows with a plain forward pre-hook; the pipeline's own
    scheduler is back after the call."""
    gens = [torch.Generator("cpu").manual_seed(seed + i) for i in range(len(prompts))]
    rows = [0]

    def count(module, args, kwargs):
        rows[0] += latent_input(args, kwargs).shape[0]

    h = denoiser_of(pipe).register_forward_pre_hook(count, with_kwargs=True)
    try:
        with scheduler_for(pipe, scheduler):
            t0 = time.perf_counter()
            images = (call or pipe)(prompt=list(prompts), num_inference_steps=steps, guidance_scale=scale,
                                    generator=gens, output_type="np", **kw, **call_defaults(pipe, kw)).images
            wall = time.perf_counter() - t0
    finally:
        h.remove()
    n = len(prompts)
    return GenerationResult(np.asarray(images), list(prompts), [seed + i for i in range(n)], [rows[0] / n] * n, wall)


def image_by_image(pipe, prompts, seed, steps, scheduler, scale=7.5, **kw) -> GenerationResult:
    """run_pipe one prompt per call (image i keeps seed + i); the time is the sum of the calls."""
    rs = [run_pipe(pipe, [p], seed + i, steps, scheduler, scale, **kw) for i, p in enumerate(prompts)]
    return GenerationResult(np.concatenate([r.images for r in rs]), list(prompts),
                            [seed + i for i in range(len(prompts))],
                            [e for r in rs for e in r.evaluations_per_image], sum(r.wall_seconds for r in rs))


def cutoff_callback(ratio: float, scale: float = 7.5):
    """diffusers' SDCFGCutoffCallback as shipped. It keeps `prompt_embeds[-1:]` (one row) after the
    cutoff, so it only works for one image per pipeline call: with 8 prompts the next UNet call fails
    with a batch mismatch in cross-attention. It therefore runs image by image (same seeds, same
    images as a batch would give if it worked); its time is the sum of those calls."""
    def run(pipe, prompts, seed, steps, scheduler):
        from diffusers.callbacks import SDCFGCutoffCallback

        return image_by_image(pipe, prompts, seed, steps, scheduler, scale,
                              callback_on_step_end=SDCFGCutoffCallback(cutoff_step_ratio=ratio))
    return run


def one_by_one(scale: float = 7.5):
    """Full guidance one image per pipeline call: the time base of the callback (which cannot batch)."""
    def run(pipe, prompts, seed, steps, scheduler):
        return image_by_image(pipe, prompts, seed, steps, scheduler, scale)
    return run


def tgate(gate_step: int, scale: float = 7.5, sp_interval: int = 5, fi_interval: int = 1, warm_up: int = 2):
    """The tgate package's SD pipeline method with its default intervals. It replaces the `forward`
    of every attention module; they are restored after the call so later runs are plain."""
    def run(pipe, prompts, seed, steps, scheduler):
        from diffusers.models.attention_processor import Attention
        from tgate import TgateSDLoader

        TgateSDLoader(pipe)
        try:
            return run_pipe(pipe, prompts, seed, steps, scheduler, scale, call=pipe.tgate, gate_step=gate_step,
                            sp_interval=sp_interval, fi_interval=fi_interval, warm_up=warm_up)
        finally:
            for m in pipe.unet.modules():
                if isinstance(m, Attention):
                    m.__dict__.pop("forward", None)
                    m.__dict__.pop("cache", None)
    return run


def deepcache(interval: int, scale: float = 7.5, schedule: GuidanceSchedule | None = None, branch: int = 0):
    """The DeepCache package (Ma et al., CVPR 2024) as it ships: DeepCacheSDHelper wraps the UNet's
    blocks; the full UNet runs every `interval`-th call, in between only the outer branch `branch`.
    With `schedule` (a fixed stop), shapefirst's guidance hook runs under it: DeepCache wraps the
    hooked forward, so its cached block outputs have the batch the hook passes on. The stop changes
    that batch (2B rows to B), so it must fall on a call DeepCache refreshes (aligned_stop); an
    adaptive per-sample stop changes it at any call and does not compose with the package."""
    @contextmanager
    def deep(pipe, *_):
        from DeepCache import DeepCacheSDHelper

        helper = DeepCacheSDHelper(pipe=pipe)
        helper.set_params(cache_interval=interval, cache_branch_id=branch)
        helper.enable()
        try:
            yield
        finally:
            helper.disable()
    return under_schedule(deep, scale, schedule)


def under_schedule(cache, scale: float, schedule: GuidanceSchedule | None):
    """A sweep run of run_pipe inside `cache(pipe, prompts, seed, steps, scheduler)` (a peer's context manager,
    given the run's arguments), under shapefirst's guidance hook when `schedule` is given; the evaluations
    then come from the hook (the counting pre-hook in run_pipe sees the rows before the hook drops any)."""
    def run(pipe, prompts, seed, steps, scheduler):
        with guidance_schedule(pipe, schedule) if schedule else nullcontext() as hook, \
                cache(pipe, prompts, seed, steps, scheduler):
            r = run_pipe(pipe, prompts, seed, steps, scheduler, scale)
        if hook is not None:
            r.evaluations_per_image = [int(e) for e in hook.evaluations]
        return r
    return run


def tcache(kind: str, scale: float, schedule: GuidanceSchedule | None = None, **options):
    """One of diffusers' transformer caches (shapefirst.transformer_cache: applied with diffusers' own apply_*
    function), alone or under shapefirst's guidance stop. MagCache first measures its mag_ratios with
    diffusers' calibration on one full-guidance call of the same step count (untimed, once per run)."""
    from shapefirst.transformer_cache import TransformerCache, calibrate_mag_ratios, transformer_cache

    ratios: dict[int, list[float]] = {}

    def cache(pipe, prompts, seed, steps, scheduler):
        opts = dict(options)
        if kind == "mag":
            if steps not in ratios:  # one full-guidance call, outside the timed one
                ratios[steps] = calibrate_mag_ratios(
                    pipe, lambda: run_pipe(pipe, prompts[:1], seed, steps, scheduler, scale), steps)
            opts["mag_ratios"] = ratios[steps]
        return transformer_cache(pipe, TransformerCache(kind, **opts))
    return under_schedule(cache, scale, schedule)


def cachedit(scale: float, schedule: GuidanceSchedule | None = None):
    """The `cache-dit` package's cache at its own defaults (shapefirst.cache_dit_peer: enabled per run, restored
    after), alone or under shapefirst's stop (batched CFG composes; a separate-call pipeline is refused there)."""
    @contextmanager
    def cache(pipe, *_):
        from shapefirst.cache_dit_peer import cache_dit_peer

        with cache_dit_peer(pipe):
            yield
    return under_schedule(cache, scale, schedule)


def aligned_stop(f: float, steps: int, interval: int) -> int:
    """The first unguided call nearest f * steps that DeepCache refreshes (a multiple of its interval)."""
    return max(interval, interval * int(math.floor(f * steps / interval + 0.5)))


def interval_steps(pipe, steps: int, scheduler: str, lo: float = 0.28, hi: float = 5.42) -> tuple[int, int]:
    """Guidance Interval: the calls whose noise level sigma = sqrt((1 - abar) / abar) is in (lo, hi]."""
    with scheduler_for(pipe, scheduler) as p:  # the pipeline keeps its own scheduler
        sch = copy.deepcopy(p.scheduler)
    sch.set_timesteps(steps)
    ac = sch.alphas_cumprod[sch.timesteps.long()]
    sigma = ((1 - ac) / ac).sqrt()
    idx = torch.nonzero((sigma > lo) & (sigma <= hi)).flatten()
    return int(idx.min()), int(idx.max()) + 1


def configs(pipe, args) -> list[Config]:
    """Per cost level f (fraction of guided calls): shapefirst's stop (the first of --after, default
    the paper's unconditional branch; from the second level on with the first late cache) and the
    peers at the same level;
    Adaptive Guidance at the given thresholds (tune them to a level's average cost). Then the
    extras: the other cache/no-cache variants, Guidance Interval at its paper's interval, and
    diffusers' callback. Ordered by priority, since a sweep finishes configurations in order."""
    w, n, sch = args.guidance, args.steps, args.scheduler
    unet = getattr(pipe, "unet", None) is not None  # tgate, DeepCache and diffusers' SD callback need a UNet
    gi0, gi1 = interval_steps(pipe, n, sch)
    caches = [LateCache.parse(spec) for spec in args.caches]
    main, extra = [Config("full", GuidanceSchedule(w), sch, n)], []

    def ours(f, cache, after):
        name = f"shapefirst stop={f} {after}" + (f" +{cache.label}" if cache else "")
        return Config(name, GuidanceSchedule(w, stop=f, after=after), sch, n, cache=cache)

    for i, f in enumerate(args.levels):
        k = round(f * n)
        variants = [None] + caches
        first = variants[min(i, len(variants) - 1)]
        main.append(ours(f, first, args.after[0]))
        extra += [ours(f, c, a) for a in args.after for c in variants if (c, a) != (first, args.after[0])]
        main += [Config(f"T-GATE gate_step={k} (tgate)", GuidanceSchedule(w), sch, n, run=tgate(k, w))] if unet else []
        main.append(Config(f"Step AG {f} (stop={f} cond)", GuidanceSchedule(w, stop=f, after="cond"), sch, n))
        if i < len(args.adaptive):
            t = args.adaptive[i]
            main.append(Config(f"Adaptive Guidance cos>={t} (cond)",
                               GuidanceSchedule(w, adaptive=AdaptiveStop(t), after="cond"), sch, n))
        extra += [Config(f"diffusers SDCFGCutoffCallback({f})", GuidanceSchedule(w), sch, n,
                         run=cutoff_callback(f, w))] if unet else []
    for t in args.shape:  # alone and with each late cache (a cache acts once every sample of the batch stopped)
        for a in args.after:
            shape = GuidanceSchedule(w, adaptive=AdaptiveStop(criterion="shape", tolerance=t), after=a)
            main += [Config(f"shapefirst shape-settled tol={t} {a}" + (f" +{c.label}" if c else ""), shape, sch, n,
                            cache=c) for c in [None] + caches]
    main += tcache_configs(args) if args.tcaches else []
    if args.cache_dit:
        main.append(Config("cache-dit DBCache (cache-dit defaults)", GuidanceSchedule(w), sch, n, run=cachedit(w)))
        for f in args.levels:
            for a in args.after:
                stop = GuidanceSchedule(w, stop=f, after=a)
                main.append(Config(f"cache-dit + shapefirst stop={f} {a}", stop, sch, n, run=cachedit(w, stop)))
    # DeepCache alone, and with the stop at every level (aligned to its refreshes)
    for d in args.deepcache if unet else []:
        main.append(Config(f"DeepCache interval={d} (DeepCache)", GuidanceSchedule(w), sch, n, run=deepcache(d, w)))
        stops = [k for i, k in args.deepcache_stops if i == d] if args.deepcache_stops else \
            dict.fromkeys(aligned_stop(f, n, d) for f in args.levels)
        for k in stops:
            for a in args.after:
                both = GuidanceSchedule(w, stop_step=k, after=a)
                main.append(Config(f"shapefirst stop_step={k} {a} + DeepCache interval={d}", both, sch, n,
                                   run=deepcache(d, w, both)))
    for s_min in args.ngms:  # AUTOMATIC1111's Negative Guidance minimum sigma, its default (every other step)
        main.append(Config(f"A1111 NGMS sigma<={s_min:g} every other step (cond)",
                           GuidanceSchedule.a1111_ngms(w, s_min), sch, n))
    extra += [Config("full, image by image", GuidanceSchedule(w), sch, n, run=one_by_one(w))] if unet else []
    main.append(Config(f"Guidance Interval sigma(0.28,5.42] calls [{gi0},{gi1}) (cond)",
                       GuidanceSchedule(w, start_step=gi0, stop_step=gi1, after="cond"), sch, n))
    c = main + extra
    if args.only:
        c = [x for x in c if x.name == "full" or any(s in x.name for s in args.only)]
    return [x for x in c if not any(s in x.name for s in args.skip)]


def tcache_configs(args) -> list[Config]:
    """diffusers' transformer caches (--tcaches) with their documented defaults: each alone, and the ones
    that compose with a stop (not FasterCache, which skips the unconditional branch itself, nor MagCache,
    whose step-indexed rule a stop would misalign: transformer_cache.ONE_BATCH) under shapefirst's stop at
    every level, each branch of --after."""
    from shapefirst.transformer_cache import NAMES, ONE_BATCH

    w, n, sch = args.guidance, args.steps, args.scheduler
    out = []
    for kind in args.tcaches:
        out.append(Config(f"{NAMES[kind]} (diffusers)", GuidanceSchedule(w), sch, n, run=tcache(kind, w)))
        for f in args.levels if kind not in ONE_BATCH else []:
            for a in args.after:
                stop = GuidanceSchedule(w, stop=f, after=a)
                out.append(Config(f"{NAMES[kind]} + shapefirst stop={f} {a}", stop, sch, n, run=tcache(kind, w, stop)))
    return out


def end_to_end(pipe, prompts, cfgs: list[Config], args) -> str:
    """The line a user sees: full guidance at --base (the usual start, e.g. DDIM 50) against each configuration
    at this study's solver. Time: per batch of --n prompts, the configuration, the base and the base again (its
    noise: the base against itself), adjacent; medians of the ratios (a warm-up run of each first, untimed).
    Quality: all five right per prompt, paired (same prompts, image i seed i), from --base-study's full row and
    --dest's row of the configuration."""
    from shapefirst.metrics import mean_ci
    from shapefirst.peers import judged

    sch, steps = args.base.split(":")
    base = Config("full", GuidanceSchedule(args.guidance), sch, int(steps))
    qb, _ = read_study(args.base_study)
    q, _ = read_study(args.dest)
    jb = judged(args.base_study, qb["full"])
    lines = [f"| {sch} {steps} full guidance against | time ratio (median) | saved | base against itself "
             "| all five right | Δ all five vs base [95% CI] (n) |", "|---|---|---|---|---|---|"]
    for cfg in cfgs:  # full guidance at this study's solver too: what the solver alone saves
        cfg.generate(pipe, prompts[:args.batch], 0), base.generate(pipe, prompts[:args.batch], 0)  # warm-up
        ratios, noise = [], []
        for i in range(0, len(prompts), args.batch):
            part = prompts[i:i + args.batch]
            r, f, f2 = (c.generate(pipe, part, i) for c in (cfg, base, base))
            ratios.append(r.wall_seconds / f.wall_seconds)
            noise.append(f2.wall_seconds / f.wall_seconds)
        ja = judged(args.dest, q[cfg.name]) if cfg.name in q else None
        d = mean_ci(ja["all"] - jb["all"]) if ja is not None and jb is not None else None
        lines.append(f"| {cfg.steps} {cfg.scheduler} {cfg.name} | {statistics.median(ratios):.3f} "
                     f"| {1 - statistics.median(ratios):.1%} | {statistics.median(noise):.3f} | "
                     + (f"{ja['all'].mean():.1%} (base {jb['all'].mean():.1%}) | {100 * d[0]:+.1f} "
                        f"[{100 * d[1]:+.1f}, {100 * d[2]:+.1f}] ({len(ja['all'])}) |" if d else "- | - |"))
    return "\n".join(lines)


def machine() -> str:
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, load {os.getloadavg()[0]:.2f}")


def table(out: Path, tolerance: float) -> str:
    """The study's table and head-to-head pairs, from a run folder or a kept study (benchmarks/results/...):
    KID from the per-image CLIP features where the run's files are there (one method for all rows), else as
    stored in the row; paired differences from the per-image judgments (judged.safetensors in a kept study)."""
    q, t = read_study(out)
    t1 = {r["name"]: r for r in read_jsonl(rows_file(out, "timing_b1"))}
    lines = ["| configuration | saved latency (batch 8) | batch 1 | evaluations | all five right "
             "| Δ all vs full [95% CI] "
             "| worst attribute Δ lower bound | Image-CLIP | KID×1000 [≈95% CI] | within tolerance |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    real = None
    for name, r in q.items():
        if (out / "quality" / r["per_image_file"]).is_file():
            if real is None:
                from shapefirst.metrics import Clip
                from shapefirst.models import embedded_model_path

                real = Clip.load(embedded_model_path() / "clip").image_features(world_renders(r["n"], 0)).numpy()
            r.update(distribution_distances(per_image(out / "quality", r)["feat"], real))
        sv, sv1 = (x.get(name, {}).get("saved_latency") for x in (t, t1))
        d = r["accuracy_delta_vs_full"]
        worst = min((v[1], a) for a, v in d.items() if a not in ("all", "one_object"))
        ok, why = passes(r, tolerance)
        kid = r.get("kid_x1000")
        lines.append(f"| {name} | {'-' if sv is None or batch1_only(name) else f'{sv:.1%}'} | "
                     f"{'-' if sv1 is None else f'{sv1:.1%}'} | ×{r['evaluation_ratio']:.3f} | "
                     f"{r['accuracy']['all']:.1%} | "
                     f"{d['all'][0]:+.3f} [{d['all'][1]:+.3f}, {d['all'][2]:+.3f}] | {worst[0]:+.3f} ({worst[1]}) | "
                     f"{r['image_clip'][0]:.1f} | {kid[0]:.2f} [{kid[1]:.2f}, {kid[2]:.2f}] | "
                     f"{'yes' if ok else 'no: ' + why} |")
    lines += ["", "Head to head (paired over the same prompts and seeds: accuracy of shapefirst minus the peer's; "
              "saved latency at batch 8, or at batch 1 for a peer that only runs image by image):", "",
              "| shapefirst | peer | Δ all five right [95% CI] | Δ shape [95% CI] | "
              "saved latency: shapefirst / peer |",
              "|---|---|---|---|---|"]
    lines += [head_to_head(out, a, b, t, t1) for a in q.values() for b in q.values() if near(a, b, t)]
    r0 = q["full"]
    lines.append(f"\nn = {r0['n']} prompts (quality), Image-CLIP floor {r0['image_clip_floor'][0]:.1f} "
                 f"(n={r0.get('image_clip_floor_n')}), ceiling {r0['image_clip_ceiling'][0]:.1f}; timing: "
                 f"{next(iter(t.values()))['n'] if t else 0} prompts at batch 8 and "
                 f"{next(iter(t1.values()))['n'] if t1 else 0} at batch 1, A/B adjacent per batch, median of ratios.")
    if any("| - | - |" in line for line in lines):
        lines.append("A '-' in the head-to-head: the per-image judgments of one side are not in this study "
                     "(kept rows of a run whose folder is gone); rerun its quality phase and merge to pair it.")
    return "\n".join(lines)


def near(a: dict, b: dict, t: dict) -> bool:
    """shapefirst row a against peer row b at (about) equal cost: evaluations or batch-8 saved latency
    within 8 points; the stop on DeepCache against DeepCache at every interval."""
    if not a["name"].startswith("shapefirst") or b["name"].startswith("shapefirst") or b["name"] == "full":
        return False
    sa, sb = (t.get(x["name"], {}).get("saved_latency") for x in (a, b))
    return (abs(a["evaluation_ratio"] - b["evaluation_ratio"]) <= 0.08
            or (sa is not None and sb is not None and abs(sa - sb) <= 0.08)
            or ("DeepCache" in a["name"] and "DeepCache" in b["name"]))


def head_to_head(out: Path, a: dict, b: dict, t: dict, t1: dict) -> str:
    da, ds = (paired(out, a, b, at) for at in ("all", "shape"))
    def ci(d):
        return "-" if d is None else f"{d[0]:+.3f} [{d[1]:+.3f}, {d[2]:+.3f}]"
    tt = t1 if batch1_only(b["name"]) else t
    sa, sb = (tt.get(x["name"], {}).get("saved_latency") for x in (a, b))
    lat = f"{sa:.1%} / {sb:.1%}" + (" (batch 1)" if tt is t1 else "") if sa is not None and sb is not None else "-"
    return f"| {a['name']} | {b['name']} | {ci(da)} | {ci(ds)} | {lat} |"


def keep_machines(run: Path, dest: Path) -> None:
    """dest/machine.json: the machine line of each phase the run has (the timing phases must name theirs)."""
    f = dest / "machine.json"
    kept = json.loads(f.read_text()) if f.exists() else {}
    for phase in ("quality", "timing", "timing_b1"):
        if (run / phase / "machine.json").exists():
            kept[phase] = json.loads((run / phase / "machine.json").read_text())["machine"]
    f.write_text(json.dumps(kept, indent=1) + "\n")


def ship(out: Path, guidance: float) -> Path:
    """Copy a finished study into the package (the report's default peers section for the embedded model),
    with study.json: the model's fingerprint, the scale and the timing machine."""
    from shapefirst.peers import SHIPPED_STUDY
    from shapefirst.outputs import model_fingerprint

    read_study(out)
    SHIPPED_STUDY.mkdir(parents=True, exist_ok=True)
    for phase in PHASES:
        if rows_file(out, phase).exists():
            shutil.copyfile(rows_file(out, phase), SHIPPED_STUDY / f"{phase}.jsonl")
    machine_ = json.loads((out / "machine.json").read_text())["timing"]
    info = {"model": model_fingerprint(load_pipeline("embedded")), "guidance": guidance, "machine": machine_}
    (SHIPPED_STUDY / "study.json").write_text(json.dumps(info, indent=1) + "\n")
    return SHIPPED_STUDY


def deepcache_stops(spec: str) -> list[tuple[int, int]]:
    """'3:12,5:10' -> [(3, 12), (5, 10)]; each stop a call DeepCache refreshes (a multiple of its interval)."""
    try:
        pairs = [tuple(int(v) for v in x.split(":")) for x in spec.split(",") if x]
    except ValueError:
        pairs = [()]
    bad = [p for p in pairs if len(p) != 2 or p[0] < 1 or p[1] % p[0]]
    if bad:
        raise argparse.ArgumentTypeError(f"{spec!r}: give INTERVAL:STOP pairs with each stop a multiple of its "
                                         f"interval (DeepCache refreshes there), e.g. 3:12,5:10")
    return pairs


def kinds(spec: str) -> list[str]:
    from shapefirst.transformer_cache import KINDS

    got = [x for x in spec.split(",") if x]
    bad = [x for x in got if x not in KINDS]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown transformer cache {bad}: use some of {','.join(KINDS)}")
    return got


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("phase", choices=["quality", "timing", "merge", "table", "ship", "e2e"])
    ap.add_argument("--out", type=Path, default=Path("peers-out"))
    ap.add_argument("--dest", type=Path, default=Path("benchmarks/results/peers_w3"),
                    help="merge: the kept study (in the repository) that a run's rows and judgments go into")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--scheduler", default="ddim")
    ap.add_argument("--guidance", type=float, default=None,
                    help="default: the model's recommended scale (recipe.json), else 7.5")
    ap.add_argument("--levels", type=lambda s: [float(x) for x in s.split(",")], default=[0.5, 0.3])
    ap.add_argument("--adaptive", type=lambda s: [float(x) for x in s.split(",") if x], default=[])
    ap.add_argument("--caches", type=lambda s: [x for x in s.split(",") if x], default=[])
    ap.add_argument("--after", type=lambda s: [x for x in s.split(",") if x], default=["uncond"],
                    help="branches shapefirst keeps after its stops (uncond: the paper's; cond), each with its rows")
    ap.add_argument("--shape", type=lambda s: [float(x) for x in s.split(",") if x], default=[],
                    help="tolerances of shapefirst's shape-settled adaptive stop "
                         "(each branch of --after kept after it)")
    ap.add_argument("--deepcache", type=lambda s: [int(x) for x in s.split(",") if x], default=[],
                    help="cache intervals of the DeepCache package; the i-th also with shapefirst's stop at level i")
    ap.add_argument("--deepcache-stops", type=deepcache_stops, default=[],
                    help="INTERVAL:STOP_CALL pairs (e.g. 3:12,3:15,5:10): shapefirst's stops under DeepCache "
                         "(default: each interval with the stops of --levels, aligned to its refreshes)")
    ap.add_argument("--ngms", type=lambda s: [float(x) for x in s.split(",") if x], default=[],
                    help="AUTOMATIC1111's Negative Guidance minimum sigma values (its every-other-step default); "
                         "its 'all steps' option is the stop at that sigma with the conditional branch (Step AG)")
    ap.add_argument("--tcaches", type=kinds, default=[],
                    help="diffusers' transformer caches (faster,pab,fbc,taylorseer,mag; PixArt/SD3 models): each "
                         "alone and, where it composes, under shapefirst's stop at every level")
    ap.add_argument("--cache-dit", action="store_true",
                    help="the cache-dit package's cache at its defaults (transformer models), alone and under "
                         "shapefirst's stop at every level")
    ap.add_argument("--model", default="embedded",
                    help="embedded, or a shapes-world model folder (`shapefirst train`, also --arch dit)")
    ap.add_argument("--only", type=lambda s: [x for x in s.split(";") if x], default=[],
                    help="keep configurations whose name contains one of these (';'-separated)")
    ap.add_argument("--skip", type=lambda s: [x for x in s.split(";") if x], default=[],
                    help="drop configurations whose name contains one of these")
    ap.add_argument("--floor", type=int, default=200, help="prompts for the Image-CLIP seed floor")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--allow-busy", action="store_true", help="time even beside other work (flagged)")
    ap.add_argument("--tolerance", type=float, default=0.01)
    ap.add_argument("--base", default="ddim:50",
                    help="e2e: the solver:steps a user starts from, with full guidance (timed against each row)")
    ap.add_argument("--base-study", type=Path, default=Path("benchmarks/results/peers_w3"),
                    help="e2e: the kept study whose 'full' row is --base (its per-image judgments pair the quality)")
    args = ap.parse_args()
    args.guidance = default_guidance(args.model) if args.guidance is None else args.guidance
    torch.set_num_threads(args.threads or os.cpu_count())  # pinned: a timing does not depend on torch's guess
    if args.phase == "merge":
        for name, check in merge_study(args.out, args.dest).items():
            print(f"rerun of {name!r}: {check}")
        keep_machines(args.out, args.dest)
        print(f"merged {args.out} into {args.dest}")
        return
    if args.phase == "table":
        print(table(args.out, args.tolerance))
        q, t = read_study(args.out)
        png = pareto_plot(q, t, args.out / "pareto.png")
        print(f"\nPareto plot: {png}" if png else "\nPareto plot: no configuration has both quality and timing yet")
        return
    if args.phase == "ship":
        if args.model != "embedded":
            raise SystemExit("ship: only the embedded model's study ships with the package; keep others with merge")
        print(f"shipped: {ship(args.out, args.guidance)}")
        return
    from shapefirst.metrics import Clip
    pipe = load_pipeline(args.model)
    prompts, targets = world_prompts(args.n, 0)
    timing = args.phase in ("timing", "e2e")
    busy = check_alone(args.allow_busy) if timing else None
    if args.phase == "e2e":
        print(f"# end to end: {machine()}" + (f"; FLAGGED, NOT A MEASUREMENT: {busy}" if busy else ""), flush=True)
        print(end_to_end(pipe, prompts, configs(pipe, args), args))
        return
    if busy:
        print(f"# FLAGGED, NOT A MEASUREMENT: {busy}", flush=True)
    # batch 8: the plot's axis
    out = args.out / (args.phase if not timing or args.batch == 8 else f"timing_b{args.batch}")
    print(f"# {args.phase}: {machine()}", flush=True)
    rows = run_sweep(pipe, prompts, out, targets=targets, configs=configs(pipe, args), batch=args.batch,
                     timing_batches=10**9 if timing else 0, clip=Clip.load(world_clip(args.model)),
                     real_images=None if timing else world_renders(args.n, 0), floor_prompts=args.floor,
                     progress=lambda k: print(f"done {k}  ({machine()})", flush=True))
    for r in rows:
        sv, what = saving(r)
        print(f"{r['name']:<58} saved {sv:6.1%} {what:<11} all-right {r['accuracy']['all']:.1%}")
    (out / "machine.json").write_text(json.dumps({"machine": machine()}))


if __name__ == "__main__":
    main()
