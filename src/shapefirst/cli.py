"""The `shapefirst` command line: parses arguments and calls the library; nothing else."""
from __future__ import annotations

import sys
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import List, Optional

import typer

from . import checks
from .errors import ShapefirstError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Explain and accelerate text-to-image diffusion: shape first, details later.")

MODEL_HELP = "'embedded' (the shipped shapes world), a local diffusers folder, or a hub id"
GUIDANCE_HELP = "classifier-free guidance scale w (default: the embedded model's recommended scale, else 7.5)"
HEIGHT = typer.Option(None, help="image or video height of every pipeline call (default: the pipeline's)")
WIDTH = typer.Option(None, help="image or video width of every pipeline call (default: the pipeline's)")
NUM_FRAMES = typer.Option(None, help="frames of a video pipeline (Wan, CogVideoX, HunyuanVideo; default: the "
                                     "pipeline's)")
MAX_SEQUENCE_LENGTH = typer.Option(None, help="text tokens of a T5/LLM pipeline (default: the pipeline's)")
STOP_SIGMAS_HELP = ("guidance stops in noise level (sigma; the flow time for flow matching), comma list: rows "
                    "'stop_sigma=S', the same noise level at every scheduler and step count")
ADAPTIVE_SHAPE_HELP = ("per-image stop once its x0-hat's low band changes by less than TOL per call "
                       "(2 calls in a row), "
                       "or 'auto' (the embedded model's calibrated tolerance, else 0.02)")


def _shape_tolerance(text: Optional[str], model: str) -> Optional[float]:
    """generate's --adaptive-shape: one tolerance (a number > 0 or 'auto'), None when not given."""
    if text is None:
        return None
    vals = checks.shape_tolerances(text, model)
    if len(vals) != 1:
        raise ShapefirstError(f"--adaptive-shape {text!r} is not one tolerance",
                              "pass e.g. --adaptive-shape 0.02 or auto")
    return vals[0]


def _schedule(guidance: float, stop: Optional[float], stop_step: Optional[int], after: str,
              adaptive: Optional[float] = None, adaptive_min_call: int = 0, start: Optional[float] = None,
              start_step: Optional[int] = None, adaptive_shape: Optional[float] = None,
              stop_sigma: Optional[float] = None, start_sigma: Optional[float] = None, ngms: Optional[str] = None):
    from .guidance import AdaptiveStop, GuidanceSchedule

    checks.count(adaptive_min_call, "--adaptive-min-call")
    if adaptive is not None and adaptive_shape is not None:
        raise ShapefirstError("--adaptive and --adaptive-shape were both given", "pass only one adaptive criterion")
    ad = AdaptiveStop(threshold=adaptive, min_call=adaptive_min_call) if adaptive is not None else None
    if adaptive_shape is not None:
        ad = AdaptiveStop(criterion="shape", tolerance=adaptive_shape, min_call=adaptive_min_call)
    if ngms is not None:  # AUTOMATIC1111's Negative Guidance minimum sigma: "SIGMA" or "SIGMA:all"
        return _ngms(guidance, ngms, [stop, stop_step, stop_sigma, adaptive, adaptive_shape])
    return GuidanceSchedule(scale=guidance, stop=stop, stop_step=stop_step, after=after, adaptive=ad, start=start,
                            start_step=start_step, stop_sigma=stop_sigma, start_sigma=start_sigma)


def _ngms(guidance: float, spec: str, others: list):
    from .guidance import GuidanceSchedule

    if any(o is not None for o in others):
        raise ShapefirstError("--ngms was given with another stop", "pass --ngms alone (it is the stop)")
    sigma, _, mode = spec.partition(":")
    try:
        value = float(sigma)
    except ValueError:
        raise ShapefirstError(f"--ngms {spec!r} is not a noise level",
                              "pass e.g. --ngms 0.5 or --ngms 0.5:all") from None
    if mode not in ("", "all"):
        raise ShapefirstError(f"--ngms {spec!r}: {mode!r} is not 'all'", "pass e.g. --ngms 0.5 or --ngms 0.5:all")
    return GuidanceSchedule.a1111_ngms(guidance, value, all_steps=mode == "all")


@app.command()
def generate(
    prompts: List[str] = typer.Argument(None, help="one or more prompts"),
    model: str = typer.Option("embedded", help=MODEL_HELP),
    steps: int = typer.Option(50, help="denoising steps"),
    guidance: Optional[float] = typer.Option(None, help=GUIDANCE_HELP),
    guidance_stop: Optional[float] = typer.Option(None, help="fraction of denoiser calls that stay guided, in [0, 1]"),
    guidance_stop_step: Optional[int] = typer.Option(None, help="index of the first unguided denoiser call"),
    after: str = typer.Option("uncond", help="branch kept after the stop: uncond (the paper) or cond"),
    adaptive: Optional[float] = typer.Option(None, help="per-image stop once cos(cond, uncond) >= this, in (0, 1)"),
    adaptive_min_call: int = typer.Option(0, help="no adaptive stop before this call"),
    adaptive_shape: Optional[str] = typer.Option(None, help=ADAPTIVE_SHAPE_HELP),
    guidance_start: Optional[float] = typer.Option(None, help="fraction of calls before guidance starts "
                                                              "(an interval)"),
    guidance_start_step: Optional[int] = typer.Option(None, help="index of the first guided denoiser call"),
    guidance_stop_sigma: Optional[float] = typer.Option(None, help="noise level below which guidance stops (sigma; "
                                                                   "the flow time for flow matching)"),
    guidance_start_sigma: Optional[float] = typer.Option(None, help="noise level at or below which guidance starts"),
    ngms: Optional[str] = typer.Option(None, help="AUTOMATIC1111's Negative Guidance minimum sigma: SIGMA (odd steps "
                                                  "below it unguided) or SIGMA:all (every step below it)"),
    cache: str = typer.Option("none", help="late-stage reuse after the stop: none, mean, kept, deepN, mean+deep3"),
    negative_prompt: Optional[str] = typer.Option(None, help="negative prompt"),
    scheduler: Optional[str] = typer.Option(None, help="ddim, pndm, euler, euler-a, dpm++ or unipc (default: ddim "
                                                       "where the model's family takes it, else its own)"),
    seed: int = typer.Option(0, help="image i uses torch.Generator('cpu').manual_seed(seed + i)"),
    images_per_prompt: int = typer.Option(1, help="images per prompt"),
    height: Optional[int] = HEIGHT,
    width: Optional[int] = WIDTH,
    num_frames: Optional[int] = NUM_FRAMES,
    max_sequence_length: Optional[int] = MAX_SEQUENCE_LENGTH,
    batch: int = typer.Option(8, help="images per pipeline call (more images run batch after batch)"),
    out: str = typer.Option("shapefirst-out", help="output folder"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an earlier generate output in --out "
                                                              "(only its files)"),
    trace: bool = typer.Option(False, "--trace", help="record every denoiser call (x_t, predictions, x0-hat)"),
    device: Optional[str] = typer.Option(None, help="cpu, cuda, cuda:N, mps (default: best available)"),
    dtype: Optional[str] = typer.Option(None, help="float32, float16, bfloat16 (default: fp16 on cuda, else fp32)"),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="allow pickle (.bin/.ckpt) weights: "
                                                                    "only for trusted files"),
):
    """Generate images with a guidance schedule; writes PNGs and run.json (and the trajectory with --trace)."""
    out = checks.out_path(out)
    from .cache import LateCache
    from .generate import check_prompts, count_calls, generate as run_generate
    from .models import SCHEDULERS, load_pipeline, pick_dtype
    from .outputs import OutputFolder

    prompts = check_prompts(prompts)
    checks.steps(steps, model)
    checks.positive(images_per_prompt, "--images-per-prompt", 1)
    checks.batch_size(batch)
    checks.seed(seed, len(prompts) * images_per_prompt)
    guidance = _guidance(guidance, model)
    schedule = _schedule(guidance, guidance_stop, guidance_stop_step, after, adaptive, adaptive_min_call,
                         guidance_start, guidance_start_step, _shape_tolerance(adaptive_shape, model),
                         guidance_stop_sigma, guidance_start_sigma, ngms)
    late = LateCache.parse(cache)  # one spec (a sweep takes a comma list: --caches)
    if scheduler is not None and scheduler not in SCHEDULERS:
        raise ShapefirstError(f"unknown scheduler {scheduler!r}", f"use one of: {', '.join(SCHEDULERS)}")
    size = _size(height, width, num_frames, max_sequence_length)
    dev = checks.device(device)
    pick_dtype(dtype, dev or "cpu")
    OutputFolder(out, "generate", overwrite=overwrite, reuse=False).check(dry=True)
    t0 = time.perf_counter()
    pipe = load_pipeline(model, device=dev, dtype=dtype, allow_pickle=allow_pickle)
    load_s = time.perf_counter() - t0
    with _warnings_to_stderr():
        from .models import schedulers_for, set_scheduler

        if scheduler is None and "ddim" in schedulers_for(pipe):
            scheduler = "ddim"  # the default where the family takes it; else the pipeline's own scheduler
        set_scheduler(pipe, scheduler)
        for w in checks.noop_warnings(schedule, late, count_calls(pipe, steps)):
            warnings.warn(w)
        res = run_generate(pipe, prompts, schedule, steps=steps, seed=seed, images_per_prompt=images_per_prompt,
                           negative_prompt=negative_prompt, scheduler=scheduler, trace=trace, progress=True,
                           cache=late, batch=batch, **_exact_size(pipe, size))
    res.save(out, vae=pipe.vae if trace and res.images.ndim == 4 else None,
             extra={"model": model, "load_seconds": load_s}, overwrite=overwrite)
    what = "videos" if res.images.ndim == 5 else "images"
    typer.echo(f"{len(res.images)} {what} -> {out}  ({res.wall_seconds:.2f} s, guidance {schedule.scale:g}, "
               f"{res.evaluations_per_image[0]} denoiser evaluations per image)", err=True)


def _size(height, width, num_frames, max_sequence_length) -> dict:
    """The size options given (HEIGHT, WIDTH, NUM_FRAMES, MAX_SEQUENCE_LENGTH), each checked to be a positive
    integer."""
    return {k: checks.positive(v, f"--{k.replace('_', '-')}", 1) for k, v in
            (("height", height), ("width", width), ("num_frames", num_frames),
             ("max_sequence_length", max_sequence_length)) if v is not None}


def _exact_size(pipe, size: dict) -> dict:
    """The size options as the pipeline takes them: `--num-frames` under its own name (Latte: video_length), and a
    size given is the size made: pipelines that would snap it to their trained aspect-ratio bins (PixArt,
    HunyuanDiT, Sana: `use_resolution_binning`) are told not to."""
    import inspect

    from .pipeline_call import frames_argument

    out = {frames_argument(pipe) if k == "num_frames" else k: v for k, v in size.items()}
    if ("height" in size or "width" in size) and \
            "use_resolution_binning" in inspect.signature(type(pipe).__call__).parameters:
        out["use_resolution_binning"] = False
    return out


@app.command()
def analyze(
    name: str = typer.Argument(..., help="stages, frequency, attention, eos-swap or token-ablation"),
    model: str = typer.Option("embedded", help=MODEL_HELP),
    out: str = typer.Option("shapefirst-analysis", help="output folder (the result goes to OUT/NAME)"),
    n: int = typer.Option(8, help="number of prompts (or pairs): 8 is a first look on a laptop CPU, 64+ for numbers"),
    steps: int = typer.Option(50, help="denoising steps"),
    guidance: Optional[float] = typer.Option(None, help=GUIDANCE_HELP),
    seed: int = typer.Option(0, help="seed of the first image"),
    batch: int = typer.Option(8, help="images per pipeline call"),
    prompts: Optional[Path] = typer.Option(None, help="prompt file: one prompt per line, # comments"),
    pairs: Optional[Path] = typer.Option(None, help="pair file for eos-swap: 'prompt A || prompt B' per line"),
    clip: Optional[Path] = typer.Option(None, help="a local CLIP model folder (scores for real models)"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace a result of this analysis "
                                                              "made with other settings"),
    device: Optional[str] = typer.Option(None, help="cpu, cuda, cuda:N, mps"),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="allow pickle weights (trusted files only)"),
    height: Optional[int] = HEIGHT,
    width: Optional[int] = WIDTH,
    num_frames: Optional[int] = NUM_FRAMES,
    max_sequence_length: Optional[int] = MAX_SEQUENCE_LENGTH,
):
    """Run one of the paper's analyses; writes results.json, arrays.safetensors and figures."""
    out = checks.out_path(out)
    from .experiments import Inputs, get, run_analysis
    from .models import load_pipeline
    from .report import check_call, with_call_defaults
    from .outputs import OutputFolder
    from .prompts import read_pairs, read_prompts

    analysis = get(name)
    checks.count(n, "--n", 1)
    checks.steps(steps, model)
    checks.batch_size(batch)
    checks.seed(seed, n)
    guidance = _guidance(guidance, model)
    call = check_call(_size(height, width, num_frames, max_sequence_length))
    dev = checks.device(device)
    prompt_list = read_prompts(prompts) if prompts else None
    pair_list = read_pairs(pairs) if pairs else None
    world = _is_world(model)
    analysis.check_inputs(Inputs(prompts=prompt_list, pairs=pair_list, clip=clip, world=world))
    parent = OutputFolder(out, "analyze").check()
    scorer = _scorer(clip, model)
    pipe = load_pipeline(model, device=dev, allow_pickle=allow_pickle)
    pipe = with_call_defaults(pipe, call) if call else pipe  # the size every call of the analysis makes
    with _warnings_to_stderr(), parent.claimed([name]):
        res = run_analysis(name, pipe, out, n=n, steps=steps, seed=seed, guidance=guidance, prompts=prompt_list,
                           pairs=pair_list, clip=scorer, world=world, batch=batch, overwrite=overwrite)
    _print_summary(analysis.summary(res))
    typer.echo(f"{name} -> {out / name}", err=True)


def _print_summary(sm) -> None:
    """An analysis's summary on stdout: its table (rich) and one `finding:` line per finding."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=sm.title, title_justify="left")
    for head in sm.table[0] if sm.table else []:
        table.add_column(str(head))
    for row in sm.table[1:]:
        table.add_row(*[str(c) for c in row])
    Console(width=120).print(table)
    for line in sm.findings:
        typer.echo(f"finding: {line}")


@app.command()
def report(
    model: str = typer.Option("embedded", help=MODEL_HELP),
    out: str = typer.Option("shapefirst-report", help="output folder (index.html + results/)"),
    budget: str = typer.Option("quick", help="quick (minutes on a laptop CPU) or full"),
    guidance: Optional[float] = typer.Option(None, help=GUIDANCE_HELP),
    prompts: Optional[Path] = typer.Option(None, help="prompt file (needed for models other than the shapes world)"),
    pairs: Optional[Path] = typer.Option(None, help="pair file for the eos-swap section ('A || B' per line)"),
    clip: Optional[Path] = typer.Option(None, help="a local CLIP model folder (scores for real models)"),
    overwrite: bool = typer.Option(False, "--overwrite", help="recompute sections saved with other settings"),
    device: Optional[str] = typer.Option(None, help="cpu, cuda, cuda:N, mps"),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="allow pickle weights (trusted files only)"),
    page_only: bool = typer.Option(False, "--page-only", help="rebuild index.html from saved results, run nothing"),
    height: Optional[int] = HEIGHT,
    width: Optional[int] = WIDTH,
    num_frames: Optional[int] = NUM_FRAMES,
    max_sequence_length: Optional[int] = MAX_SEQUENCE_LENGTH,
    peers: Optional[Path] = typer.Option(None, help="a `benchmarks/peers.py` study folder to show as its own "
                                                     "section (kept under OUT/results/peers); default: the study "
                                                     "shipped for the embedded model at its recommended scale"),
):
    """Run every analysis and a small sweep on one model, and write one offline HTML page."""
    out = checks.out_path(out)
    from rich.console import Console

    from .models import load_pipeline
    from .outputs import OutputFolder
    from .prompts import read_pairs, read_prompts
    from .experiments import check_inputs
    from .experiments.registry import Inputs
    from .report import BUDGETS, build_page, check_call, keep_peers, run_report

    if budget not in BUDGETS:
        raise ShapefirstError(f"unknown budget {budget!r}", f"use one of: {', '.join(BUDGETS)}")
    owner = OutputFolder(out, "report").check()
    if page_only:
        if peers is not None:
            with owner.claimed():
                keep_peers(peers, out)
        typer.echo(f"report -> {build_page(out)}", err=True)
        return
    guidance = _guidance(guidance, model)
    call = check_call(_size(height, width, num_frames, max_sequence_length))
    dev = checks.device(device)
    prompt_list = read_prompts(prompts) if prompts else None
    pair_list = read_pairs(pairs) if pairs else None
    world = _is_world(model)
    check_inputs(Inputs(prompts=prompt_list, pairs=pair_list, clip=clip, world=world))
    if peers is not None:
        from .peers import read_study

        read_study(peers)  # before the model loads
    scorer = _scorer(clip, model)
    pipe = load_pipeline(model, device=dev, allow_pickle=allow_pickle)
    console = Console(stderr=True)
    with _warnings_to_stderr(), owner.claimed(), console.status("report") as status:
        index = run_report(pipe, out, budget, world=world, clip=scorer, prompts=prompt_list, pairs=pair_list,
                           progress=lambda name: status.update(f"report: {name}"), model_name=model,
                           guidance=guidance, overwrite=overwrite, peers=peers, call=call or None)
    typer.echo(f"report -> {index}", err=True)


def _scorer(clip: Optional[Path], model: str):
    """The user's CLIP folder, else the world CLIP of a shapes-world model, else None."""
    from .metrics import Clip

    if clip:
        return Clip.load(clip)
    from .models import world_clip

    folder = world_clip(model)
    return Clip.load(folder) if folder is not None else None


def _is_world(model: str) -> bool:
    """A shapes-world model (the embedded one or a trained folder): world prompts, judge and CLIP apply."""
    from .models import world_folder

    return world_folder(model) is not None


def _sweep_inputs(model, prompts, n, seed, clip, device, allow_pickle):
    """pipeline, prompts, judge targets (world), CLIP scorer, real images for KID/FD (world renders)."""
    from .models import load_pipeline
    from .prompts import read_prompts
    from .world.prompts import world_prompts, world_renders

    world = _is_world(model)
    if prompts in (None, "world"):
        if not world:
            raise ShapefirstError("this model is not the shapes world, so there are no built-in prompts",
                                  "pass --prompts FILE")
        ps, targets = world_prompts(n, seed)
        real = world_renders(n, seed)
    else:
        ps, targets, real = read_prompts(prompts)[:n], None, None
    scorer = _scorer(clip, model)
    return load_pipeline(model, device=device, allow_pickle=allow_pickle), ps, targets, scorer, real


def _caches(text: str) -> list:
    """A comma list of late-cache specs -> LateCache objects (None for 'none'), without repeats."""
    from .cache import LateCache

    return checks.unique([LateCache.parse(c) for c in (text or "none").split(",")], "--caches")


def _guidance(value: Optional[float], model: str) -> float:
    """The user's guidance scale, else the model's default (the embedded model's recommended one)."""
    from .models import default_guidance

    return checks.guidance(value) if value is not None else default_guidance(model)


@contextmanager
def _warnings_to_stderr():
    """UserWarnings (shapefirst's own warnings are UserWarnings) as one `warning: ...` line each on stderr,
    once each, at the end of the block; other categories (the libraries' Deprecation, Future and Runtime
    warnings about their internals) are not shown: they would bury the lines a user can act on."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        try:
            yield
        finally:
            seen = set()
            for w in caught:
                text = str(w.message).splitlines()[0] if str(w.message) else ""
                if issubclass(w.category, UserWarning) and text not in seen:
                    seen.add(text)
                    typer.echo(f"warning: {text}", err=True)


def _sweep_configs(guidance, stops, schedulers, steps, adaptive, caches, model, modes=("uncond", "cond"),
                   adaptive_shape: str = "", stop_sigmas: str = ""):
    from .sweep import default_configs
    from .models import SCHEDULERS

    return default_configs(guidance, checks.fractions(stops, "--stops") if stops.strip() else [],
                           checks.names(schedulers, "--schedulers", SCHEDULERS),
                           checks.steps(checks.int_list(steps, "--steps"), model), modes=modes,
                           adaptive=checks.thresholds(adaptive), caches=_caches(caches),
                           adaptive_shape=checks.shape_tolerances(adaptive_shape, model),
                           stop_sigmas=checks.noise_levels(stop_sigmas))


@app.command()
def sweep(
    model: str = typer.Option("embedded", help=MODEL_HELP),
    prompts: str = typer.Option("world", help="'world' (the shapes world's held-out captions) or a prompt file"),
    out: str = typer.Option("shapefirst-sweep", help="output folder (sweep.jsonl resumes)"),
    n: int = typer.Option(64, help="number of prompts"),
    stops: str = typer.Option("0.1,0.25,0.5,0.75,0.9", help="guidance stops (fractions of the calls)"),
    stop_sigmas: str = typer.Option("", help=STOP_SIGMAS_HELP),
    schedulers: str = typer.Option("ddim,dpm++", help="schedulers to sweep"),
    steps: str = typer.Option("20,50", help="step counts to sweep"),
    guidance: Optional[float] = typer.Option(None, help=GUIDANCE_HELP),
    seed: int = typer.Option(0, help="seed of the first image"),
    batch: int = typer.Option(8, help="images per pipeline call"),
    adaptive: str = typer.Option("", help="adaptive-stop cosine thresholds to sweep too, e.g. 0.99,0.995"),
    adaptive_shape: str = typer.Option("", help="shape-settled adaptive-stop tolerances to sweep too, e.g. 0.02,0.05 "
                                                "or auto (rows 'adaptive-shape=TOL')"),
    caches: str = typer.Option("none", help="late-stage caches to sweep: none, mean, kept, deep3, "
                                            "mean+deep3 (comma list)"),
    timing_batches: int = typer.Option(3, help="batches timed against full guidance (A/B adjacent); 0 = no timing"),
    clip: Optional[Path] = typer.Option(None, help="a local CLIP model folder (scores for real models)"),
    real: Optional[Path] = typer.Option(None, help="a folder of real images: FID per configuration "
                                                   "(needs --inception)"),
    inception: Optional[Path] = typer.Option(None, help="FID Inception weights (.safetensors; see shapefirst.fid)"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace a sweep in --out made with other settings"),
    device: Optional[str] = typer.Option(None, help="cpu, cuda, cuda:N, mps"),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="allow pickle weights (trusted files only)"),
):
    """Sweep guidance stops x modes x schedulers (x adaptive thresholds and tolerances x late caches):
    saved latency and
    quality against full guidance. One JSON line per configuration in OUT/sweep.jsonl (a rerun with the
    same settings resumes), OUT/sweep.csv and OUT/pareto.png."""
    out = checks.out_path(out)
    from .sweep import run_sweep, saving
    from .outputs import OutputFolder

    n, batch = checks.positive(n, "--n", 64), checks.batch_size(batch)
    checks.seed(seed, n)
    checks.count(timing_batches, "--timing-batches")
    configs = _sweep_configs(_guidance(guidance, model), stops, schedulers, steps, adaptive, caches, model,
                             adaptive_shape=adaptive_shape, stop_sigmas=stop_sigmas)
    if (real is None) != (inception is None):
        raise ShapefirstError("--real and --inception go together (FID needs real images and the Inception weights)",
                              "pass both, or neither")
    dev = checks.device(device)
    OutputFolder(out, "sweep", overwrite=overwrite).check(dry=True)
    fid = _fid(real, inception, allow_pickle) if real is not None else None
    pipe, ps, targets, scorer, renders = _sweep_inputs(model, prompts, n, seed, clip, dev, allow_pickle)
    with _warnings_to_stderr():
        rows = run_sweep(pipe, ps, out, targets=targets, seed=seed, batch=batch, clip=scorer, configs=configs,
                         timing_batches=timing_batches, real_images=renders, fid=fid, overwrite=overwrite,
                         progress=lambda key: typer.echo(f"done {key}", err=True))
    from .sweep import is_main_process

    if not is_main_process():
        return
    for r in rows:
        sv, what = saving(r)
        typer.echo(f"{r['key']:<36} saved {sv:6.1%} {what:<11}  evaluations x{r['evaluation_ratio']:.2f}  "
                   f"PSNR {r['psnr'][0]:5.1f}" + (f"  all-right {r['accuracy']['all']:.1%}" if "accuracy" in r else "")
                   + (f"  KID x1000 {r['kid_x1000'][0]:.2f}" if "kid_x1000" in r else "")
                   + (f"  FID {r['fid']:.2f} (n={r['fid_n'][0]} vs {r['fid_n'][1]})" if "fid" in r else "")
                   + (f"  skipped: {', '.join(r['skipped'])}" if r.get("skipped") else ""))


def _fid(real: Path, inception: Path, allow_pickle: bool):
    from .fid import Fid, read_image_folder

    real_imgs = read_image_folder(real)
    fid = Fid(inception, allow_pickle=allow_pickle)
    fid.update(real_imgs, real=True)
    return fid


@app.command()
def calibrate(
    model: str = typer.Option("embedded", help=MODEL_HELP),
    prompts: str = typer.Option("world", help="'world' or a prompt file"),
    out: str = typer.Option("shapefirst-calibrate", help="output folder (reuses a finished sweep)"),
    n: int = typer.Option(64, help="number of prompts"),
    tolerance: float = typer.Option(0.01, help="largest accepted accuracy loss (95% paired CI lower bound)"),
    stops: str = typer.Option("0.2,0.3,0.4,0.5,0.6,0.7", help="candidate stops (fractions of the calls)"),
    stop_sigmas: str = typer.Option("", help=STOP_SIGMAS_HELP),
    adaptive: str = typer.Option("0.9995", help="candidate adaptive-stop cosine thresholds, e.g. 0.99,0.995 "
                                                "('' = none)"),
    adaptive_shape: str = typer.Option("auto", help="candidate shape-settled adaptive-stop tolerances, "
                                       "e.g. 0.02,0.05; "
                                       "auto = the model's calibrated one ('' = none)"),
    caches: str = typer.Option("none,mean,kept+deep3", help="candidate late-stage caches: none, mean, kept, deep3, "
                               "mean+deep3, kept+deep3 (the default adds the peers study's best at w=3)"),
    modes: str = typer.Option("uncond,cond", help="branches kept after the stop"),
    timing_batches: int = typer.Option(3, help="batches timed against full guidance; 0 = rank by saved evaluations"),
    scheduler: str = typer.Option("ddim", help="scheduler"),
    steps: int = typer.Option(50, help="denoising steps"),
    guidance: Optional[float] = typer.Option(None, help=GUIDANCE_HELP),
    batch: int = typer.Option(8, help="images per pipeline call"),
    clip: Optional[Path] = typer.Option(None, help="a local CLIP model folder"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace a sweep in --out made with other settings"),
    device: Optional[str] = typer.Option(None, help="cpu, cuda, cuda:N, mps"),
):
    """Find the fastest setting (stop, adaptive threshold or shape tolerance, late cache) that keeps quality within the
    tolerance; print it with its measured saving and a snippet."""
    out = checks.out_path(out)
    from .sweep import calibrate as pick, in_noise_level, noise_level_window, run_sweep, saving, snippet
    from .outputs import OutputFolder

    if not 0 < tolerance < 1:
        raise ShapefirstError(f"tolerance {tolerance} is outside (0, 1)", "pass e.g. 0.01 (one point)")
    n, batch = checks.positive(n, "--n", 64), checks.batch_size(batch)
    checks.count(timing_batches, "--timing-batches")
    mode_list = checks.names(modes, "--modes", ("uncond", "cond"))
    configs = _sweep_configs(_guidance(guidance, model), stops, scheduler, str(steps), adaptive, caches, model,
                             modes=mode_list, adaptive_shape=adaptive_shape, stop_sigmas=stop_sigmas)
    dev = checks.device(device)
    OutputFolder(out, "sweep", overwrite=overwrite).check(dry=True)
    pipe, ps, targets, scorer, real = _sweep_inputs(model, prompts, n, 0, clip, dev, False)
    with _warnings_to_stderr():
        rows = run_sweep(pipe, ps, out, targets=targets, batch=batch, clip=scorer, configs=configs, real_images=real,
                         timing_batches=timing_batches, overwrite=overwrite)
    best, verdicts = pick(rows, tolerance)
    for r, ok, why in verdicts:
        typer.echo(f"{'PASS' if ok else 'fail'} {r['key']:<36} saved {saving(r)[0]:6.1%}  {why}")
    if best is None:
        typer.echo("no configuration stays within the tolerance: keep full guidance")
        return
    sv, what = saving(best)
    typer.echo(f"\nrecommended: {best['key']} saves {sv:.1%} of the {what} (measured on n={best['n']} prompts)")
    window = noise_level_window(pipe, best)
    if window is not None:
        best = in_noise_level(best, window)
        typer.echo(f"in noise level: {_window_text(window)} at {best['scheduler']} {best['steps']} steps (calls "
                   f"{window['calls'][0]}..{window['calls'][1] - 1} of {window['n_calls']} guided); the same noise "
                   "levels hold at any scheduler and step count")
    typer.echo(f"\n{snippet(best)}")


def _window_text(window: dict) -> str:
    parts = [] if window["start_sigma"] is None else [f"guidance starts at sigma <= {window['start_sigma']:.4g}"]
    if window["stop_sigma"] is not None:
        parts.append(f"guidance stops at sigma <= {window['stop_sigma']:.4g}")
    return ", ".join(parts)


@app.command()
def train(
    out: str = typer.Option("shapes-world-train", help="work folder (checkpoints; rerun to resume)"),
    seed: int = typer.Option(0, help="seed of the whole recipe"),
    tiny: bool = typer.Option(False, "--tiny", help="a few steps of every stage on tiny sizes (smoke test)"),
    dest: Optional[str] = typer.Option(None, help="where the finished model folder goes (default OUT/model)"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace a model folder an earlier `train` "
                                                              "wrote at --dest"),
    base: Optional[str] = typer.Option(None, help="continue from a finished model folder (or `embedded`): its text "
                                       "encoder, VAE and CLIP are kept, its UNet trained further on fresh latents"),
    unet_steps: Optional[int] = typer.Option(None, help="UNet optimisation steps (default: the recipe's 1000)"),
    unet_lr: Optional[float] = typer.Option(None, help="peak UNet learning rate (default: the recipe's 4e-4)"),
    arch: str = typer.Option("unet", "--arch", help="unet (SD 1.x), dit (PixArt-alpha transformer + T5, "
                                                    "world.train_dit) or video (the moving world on Wan, "
                                                    "world.train_video)"),
    dit_steps: Optional[int] = typer.Option(None, help="--arch dit / video: transformer optimisation steps "
                                                       "(default: the recipe's)"),
    dit_lr: Optional[float] = typer.Option(None, help="--arch dit / video: peak transformer learning rate "
                                                      "(default: the recipe's 3e-4)"),
):
    """Train the shapes-world model (tokenizer -> CLIP -> VAE -> UNet); resumes from checkpoints."""
    out = checks.out_path(out)
    dest = None if dest is None else checks.out_path(dest, "--dest")
    if base is not None and not base.strip():
        raise ShapefirstError(f"--base {base!r} is empty", "pass a model folder `shapefirst train` wrote, or embedded")
    from .world.train import Recipe, train as run_train

    checks.seed(seed)
    if arch not in ("unet", "dit", "video"):
        raise ShapefirstError(f"--arch {arch!r} is not a recipe", "pass --arch unet, --arch dit or --arch video")
    if arch in ("dit", "video"):
        if base or unet_steps is not None or unet_lr is not None:
            raise ShapefirstError(f"--base, --unet-steps and --unet-lr belong to the UNet recipe, not --arch {arch}",
                                  "drop them, or train with --arch unet")
        if arch == "dit":
            from .world.train_dit import DitRecipe as TransformerRecipe, train_dit as run_transformer
        else:
            from .world.train_video import VideoRecipe as TransformerRecipe, train_video as run_transformer

        recipe = TransformerRecipe.tiny(seed) if tiny else TransformerRecipe(seed=seed)
        if dit_steps is not None:
            recipe.dit_steps = checks.positive(dit_steps, "--dit-steps", 1000)
        if dit_lr is not None:
            recipe.dit_lr = checks.learning_rate(dit_lr, "--dit-lr")
        path = run_transformer(out, recipe, dest, overwrite=overwrite)
        typer.echo(f"model -> {path}", err=True)
        return
    if dit_steps is not None or dit_lr is not None:
        raise ShapefirstError("--dit-steps and --dit-lr belong to the transformer recipes (--arch dit, video)",
                              "pass --arch dit or video, or use --unet-steps / --unet-lr")
    recipe = Recipe.tiny(seed) if tiny else Recipe(seed=seed)
    if unet_steps is not None:
        recipe.unet_steps = checks.positive(unet_steps, "--unet-steps", 1000)
    if unet_lr is not None:
        recipe.unet_lr = checks.learning_rate(unet_lr, "--unet-lr")
    if base:
        from .models import embedded_model_path

        recipe.base = str(embedded_model_path() if base == "embedded" else Path(base).resolve())
    path = run_train(out, recipe, dest, overwrite=overwrite)
    typer.echo(f"model -> {path}", err=True)


def _quiet_libraries() -> None:
    """The CLI speaks for itself: library warnings and loading bars would bury its one-line errors."""
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        import diffusers
        import transformers

        diffusers.utils.logging.set_verbosity_error()
        transformers.utils.logging.set_verbosity_error()
    except ImportError:  # pragma: no cover
        pass


def main(argv: list[str] | None = None) -> int:
    _quiet_libraries()
    try:
        _no_nul(sys.argv[1:] if argv is None else argv)
        app(args=argv, standalone_mode=False)
    except ShapefirstError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except (typer.Exit, SystemExit) as e:
        code = getattr(e, "exit_code", getattr(e, "code", 0))
        return int(code or 0)
    except Exception as e:
        usage = _usage_error(e, argv)
        if usage is None:
            raise
        print(usage[0], file=sys.stderr)
        return usage[1]
    return 0


def _no_nul(argv) -> None:
    for i, a in enumerate(argv, start=1):
        if "\x00" in str(a):
            raise ShapefirstError(f"command-line argument {i} holds a NUL byte",
                                  "remove it (paths and prompts are plain text)")


def _usage_error(e: Exception, argv) -> tuple[str, int] | None:
    """A command-line usage error of whatever click typer bundles -> (one line, exit code), else None."""
    names = {c.__name__ for c in type(e).__mro__}
    if "Abort" in names:
        return "error: aborted", 1
    if not names & {"ClickException", "TyperException"} or not hasattr(e, "format_message"):
        return None
    words = [a for a in (sys.argv[1:] if argv is None else argv) if not a.startswith("-")]
    cmd = words[0] if words and words[0] in {c.name or c.callback.__name__ for c in app.registered_commands} else None
    msg = " ".join(str(e.format_message()).split())
    help_hint = f"shapefirst {cmd} --help" if cmd else "shapefirst --help"
    return f"error: {msg}; see `{help_hint}`", int(getattr(e, "exit_code", 2) or 2)


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
