"""The `shapefirst` command line: parses arguments and calls the library; nothing else."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import List, Optional

import typer

from .errors import ShapefirstError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Explain and accelerate text-to-image diffusion: shape first, details later.")

MODEL_HELP = "'embedded' (the shipped shapes world), a local diffusers folder, or a hub id"


def _schedule(guidance: float, stop: Optional[float], stop_step: Optional[int], after: str,
              adaptive: Optional[float] = None, adaptive_min_call: int = 0, start: Optional[float] = None,
              start_step: Optional[int] = None):
    from .guidance import AdaptiveStop, GuidanceSchedule

    ad = AdaptiveStop(threshold=adaptive, min_call=adaptive_min_call) if adaptive is not None else None
    return GuidanceSchedule(scale=guidance, stop=stop, stop_step=stop_step, after=after, adaptive=ad, start=start,
                            start_step=start_step)


@app.command()
def generate(
    prompts: List[str] = typer.Argument(None, help="one or more prompts"),
    model: str = typer.Option("embedded", help=MODEL_HELP),
    steps: int = typer.Option(50, help="denoising steps"),
    guidance: float = typer.Option(7.5, help="classifier-free guidance scale w"),
    guidance_stop: Optional[float] = typer.Option(None, help="fraction of denoiser calls that stay guided, in [0, 1]"),
    guidance_stop_step: Optional[int] = typer.Option(None, help="index of the first unguided denoiser call"),
    after: str = typer.Option("uncond", help="branch kept after the stop: uncond (the paper) or cond"),
    adaptive: Optional[float] = typer.Option(None, help="per-image stop once cos(cond, uncond) >= this, in (0, 1)"),
    adaptive_min_call: int = typer.Option(0, help="no adaptive stop before this call"),
    guidance_start: Optional[float] = typer.Option(None, help="fraction of calls before guidance starts (an interval)"),
    guidance_start_step: Optional[int] = typer.Option(None, help="index of the first guided denoiser call"),
    cache: str = typer.Option("none", help="late-stage reuse after the stop: none, mean, kept, deepN, mean+deep3"),
    negative_prompt: Optional[str] = typer.Option(None, help="negative prompt"),
    scheduler: str = typer.Option("ddim", help="ddim, pndm, euler, euler-a, dpm++ or unipc"),
    seed: int = typer.Option(0, help="image i uses torch.Generator('cpu').manual_seed(seed + i)"),
    images_per_prompt: int = typer.Option(1, help="images per prompt"),
    out: Path = typer.Option(Path("shapefirst-out"), help="output folder"),
    trace: bool = typer.Option(False, "--trace", help="record every denoiser call (x_t, predictions, x0-hat)"),
    device: Optional[str] = typer.Option(None, help="cpu, cuda, mps (default: best available)"),
    dtype: Optional[str] = typer.Option(None, help="float32, float16, bfloat16 (default: fp16 on cuda, else fp32)"),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="allow pickle (.bin/.ckpt) weights: only for trusted files"),
):
    """Generate images with a guidance schedule; writes PNGs and run.json (and the trajectory with --trace)."""
    from .generate import check_prompts, generate as run_generate
    from .models import SCHEDULERS, load_pipeline

    prompts = check_prompts(prompts)
    schedule = _schedule(guidance, guidance_stop, guidance_stop_step, after, adaptive, adaptive_min_call,
                         guidance_start, guidance_start_step)
    late = _caches(cache)[0]
    if scheduler not in SCHEDULERS:
        raise ShapefirstError(f"unknown scheduler {scheduler!r}", f"use one of: {', '.join(SCHEDULERS)}")
    if out.exists() and not out.is_dir():
        raise ShapefirstError(f"output path {out} is a file", "pass a folder path with --out")
    t0 = time.perf_counter()
    pipe = load_pipeline(model, device=device, dtype=dtype, allow_pickle=allow_pickle)
    load_s = time.perf_counter() - t0
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        res = run_generate(pipe, prompts, schedule, steps=steps, seed=seed, images_per_prompt=images_per_prompt,
                           negative_prompt=negative_prompt, scheduler=scheduler, trace=trace, progress=True,
                           cache=late)
    for w in caught:
        if issubclass(w.category, UserWarning):
            typer.echo(f"warning: {w.message}", err=True)
    res.save(out, vae=pipe.vae if trace else None, extra={"model": model, "load_seconds": load_s})
    typer.echo(f"{len(res.images)} images -> {out}  ({res.wall_seconds:.2f} s, "
               f"{res.evaluations_per_image[0]} denoiser evaluations per image)", err=True)


@app.command()
def analyze(
    name: str = typer.Argument(..., help="stages, frequency, attention, eos-swap or token-ablation"),
    model: str = typer.Option("embedded", help=MODEL_HELP),
    out: Path = typer.Option(Path("shapefirst-analysis"), help="output folder (the result goes to OUT/NAME)"),
    n: int = typer.Option(16, help="number of prompts (or pairs)"),
    steps: int = typer.Option(50, help="denoising steps"),
    guidance: float = typer.Option(7.5, help="classifier-free guidance scale"),
    seed: int = typer.Option(0, help="seed of the first image"),
    batch: int = typer.Option(8, help="images per pipeline call"),
    prompts: Optional[Path] = typer.Option(None, help="prompt file: one prompt per line, # comments"),
    pairs: Optional[Path] = typer.Option(None, help="pair file for eos-swap: 'prompt A || prompt B' per line"),
    clip: Optional[Path] = typer.Option(None, help="a local CLIP model folder (scores for real models)"),
    device: Optional[str] = typer.Option(None, help="cpu, cuda, mps"),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="allow pickle weights (trusted files only)"),
):
    """Run one of the paper's analyses; writes results.json, arrays.safetensors and figures."""
    from .experiments import ANALYSES, run_analysis
    from .models import load_pipeline
    from .prompts import read_pairs, read_prompts

    if name not in ANALYSES:
        raise ShapefirstError(f"unknown analysis {name!r}", f"use one of: {', '.join(ANALYSES)}")
    if n < 1 or steps < 1 or batch < 1:
        raise ShapefirstError("--n, --steps and --batch must be positive integers", "pass e.g. --n 16 --steps 50")
    if out.exists() and not out.is_dir():
        raise ShapefirstError(f"output path {out} is a file", "pass a folder path with --out")
    prompt_list = read_prompts(prompts) if prompts else None
    pair_list = read_pairs(pairs) if pairs else None
    world = model == "embedded"
    scorer = _scorer(clip, world)
    pipe = load_pipeline(model, device=device, allow_pickle=allow_pickle)
    res = run_analysis(name, pipe, out, n=n, steps=steps, seed=seed, guidance=guidance, prompts=prompt_list,
                       pairs=pair_list, clip=scorer, world=world, batch=batch)
    typer.echo(json.dumps(res.data.get("summary", {}), indent=2, default=str)[:4000])
    typer.echo(f"{name} -> {out / name}", err=True)


@app.command()
def report(
    model: str = typer.Option("embedded", help=MODEL_HELP),
    out: Path = typer.Option(Path("shapefirst-report"), help="output folder (index.html + results/)"),
    budget: str = typer.Option("quick", help="quick (minutes on a laptop CPU) or full"),
    prompts: Optional[Path] = typer.Option(None, help="prompt file (needed for models other than the shapes world)"),
    pairs: Optional[Path] = typer.Option(None, help="pair file for the eos-swap section ('A || B' per line)"),
    clip: Optional[Path] = typer.Option(None, help="a local CLIP model folder (scores for real models)"),
    device: Optional[str] = typer.Option(None, help="cpu, cuda, mps"),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="allow pickle weights (trusted files only)"),
    page_only: bool = typer.Option(False, "--page-only", help="rebuild index.html from saved results, run nothing"),
):
    """Run every analysis and a small sweep on one model, and write one offline HTML page."""
    from rich.console import Console

    from .models import load_pipeline
    from .prompts import read_pairs, read_prompts
    from .report import BUDGETS, build_page, run_report

    if budget not in BUDGETS:
        raise ShapefirstError(f"unknown budget {budget!r}", f"use one of: {', '.join(BUDGETS)}")
    if out.exists() and not out.is_dir():
        raise ShapefirstError(f"output path {out} is a file", "pass a folder path with --out")
    if page_only:
        typer.echo(f"report -> {build_page(out)}", err=True)
        return
    prompt_list = read_prompts(prompts) if prompts else None
    pair_list = read_pairs(pairs) if pairs else None
    world = model == "embedded"
    scorer = _scorer(clip, world)
    pipe = load_pipeline(model, device=device, allow_pickle=allow_pickle)
    console = Console(stderr=True)
    with console.status("report") as status:
        index = run_report(pipe, out, budget, world=world, clip=scorer, prompts=prompt_list, pairs=pair_list,
                           progress=lambda name: status.update(f"report: {name}"), model_name=model)
    typer.echo(f"report -> {index}", err=True)


def _scorer(clip: Optional[Path], world: bool):
    """The user's CLIP folder, else the shapes world's own CLIP for the embedded model, else None."""
    from .metrics import Clip
    from .models import embedded_model_path

    if clip:
        return Clip.load(clip)
    return Clip.load(embedded_model_path() / "clip") if world else None


def _sweep_inputs(model, prompts, n, seed, clip, device, allow_pickle):
    """pipeline, prompts, judge targets (world), CLIP scorer, real images for KID/FD (world renders)."""
    from .experiments.stages import world_prompts, world_renders
    from .models import load_pipeline
    from .prompts import read_prompts

    world = model == "embedded"
    if prompts in (None, "world"):
        if not world:
            raise ShapefirstError("this model is not the shapes world, so there are no built-in prompts",
                                  "pass --prompts FILE")
        ps, targets = world_prompts(n, seed)
        real = world_renders(n, seed)
    else:
        ps, targets, real = read_prompts(prompts)[:n], None, None
    scorer = _scorer(clip, world)
    return load_pipeline(model, device=device, allow_pickle=allow_pickle), ps, targets, scorer, real


def _thresholds(text: str) -> list[float]:
    vals = _floats(text, "--adaptive")
    for v in vals:
        if not 0 < v < 1:
            raise ShapefirstError(f"--adaptive threshold {v} is outside (0, 1)", "pass cosine similarities such as 0.99")
    return vals


def _caches(text: str) -> list:
    """A comma list of late-cache specs -> LateCache objects (None for 'none')."""
    from .cache import LateCache

    return [LateCache.parse(c) for c in (text or "none").split(",")]


def _floats(text: str, what: str) -> list[float]:
    try:
        vals = [float(x) for x in text.split(",") if x.strip()]
    except ValueError as e:
        raise ShapefirstError(f"{what} {text!r} is not a comma-separated list of numbers", "pass e.g. 0.25,0.5") from e
    for v in vals:
        if not 0 <= v <= 1:
            raise ShapefirstError(f"{what} value {v} is outside [0, 1]", "pass fractions of the denoiser calls")
    return vals


@app.command()
def sweep(
    model: str = typer.Option("embedded", help=MODEL_HELP),
    prompts: str = typer.Option("world", help="'world' (the shapes world's held-out captions) or a prompt file"),
    out: Path = typer.Option(Path("shapefirst-sweep"), help="output folder (sweep.jsonl resumes)"),
    n: int = typer.Option(64, help="number of prompts"),
    stops: str = typer.Option("0.1,0.25,0.5,0.75,0.9", help="guidance stops (fractions of the calls)"),
    schedulers: str = typer.Option("ddim,dpm++", help="schedulers to sweep"),
    steps: str = typer.Option("20,50", help="step counts to sweep"),
    guidance: float = typer.Option(7.5, help="classifier-free guidance scale"),
    seed: int = typer.Option(0, help="seed of the first image"),
    batch: int = typer.Option(8, help="images per pipeline call"),
    adaptive: str = typer.Option("", help="adaptive-stop cosine thresholds to sweep too, e.g. 0.99,0.995"),
    caches: str = typer.Option("none", help="late-stage caches to sweep: none, mean, kept, deep3, mean+deep3 (comma list)"),
    timing_batches: int = typer.Option(3, help="batches timed against full guidance (A/B adjacent); 0 = no timing"),
    clip: Optional[Path] = typer.Option(None, help="a local CLIP model folder (scores for real models)"),
    real: Optional[Path] = typer.Option(None, help="a folder of real images: FID per configuration (needs --inception)"),
    inception: Optional[Path] = typer.Option(None, help="FID Inception weights (.safetensors; see shapefirst.fid)"),
    device: Optional[str] = typer.Option(None, help="cpu, cuda, mps"),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="allow pickle weights (trusted files only)"),
):
    """Sweep guidance stops x modes x schedulers (x adaptive thresholds x late caches): saved latency and
    quality against full guidance. One JSON line per configuration in OUT/sweep.jsonl (a rerun resumes),
    OUT/sweep.csv and OUT/pareto.png."""
    from .experiments.sweep import default_configs, run_sweep, saving
    from .models import SCHEDULERS

    if n < 1 or batch < 1:
        raise ShapefirstError("--n and --batch must be positive integers", "pass e.g. --n 64 --batch 8")
    stop_list = _floats(stops, "--stops")
    sched_list = [s for s in schedulers.split(",") if s]
    for s in sched_list:
        if s not in SCHEDULERS:
            raise ShapefirstError(f"unknown scheduler {s!r}", f"use one of: {', '.join(SCHEDULERS)}")
    try:
        step_list = [int(s) for s in steps.split(",") if s]
    except ValueError as e:
        raise ShapefirstError(f"--steps {steps!r} is not a list of integers", "pass e.g. 20,50") from e
    if any(s < 1 for s in step_list):
        raise ShapefirstError("--steps values must be positive", "pass e.g. 20,50")
    if out.exists() and not out.is_dir():
        raise ShapefirstError(f"output path {out} is a file", "pass a folder path with --out")
    if timing_batches < 0:
        raise ShapefirstError(f"--timing-batches {timing_batches} is negative", "pass 0 (no timing) or more")
    configs = default_configs(guidance, stop_list, sched_list, step_list, adaptive=_thresholds(adaptive),
                              caches=_caches(caches))
    fid = None
    if (real is None) != (inception is None):
        raise ShapefirstError("--real and --inception go together (FID needs real images and the Inception weights)",
                              "pass both, or neither")
    if real is not None:
        from .fid import Fid, read_image_folder

        real_imgs = read_image_folder(real)
        fid = Fid(inception, allow_pickle=allow_pickle)
        fid.update(real_imgs, real=True)
    pipe, ps, targets, scorer, renders = _sweep_inputs(model, prompts, n, seed, clip, device, allow_pickle)
    rows = run_sweep(pipe, ps, out, targets=targets, seed=seed, batch=batch, clip=scorer, configs=configs,
                     timing_batches=timing_batches, real_images=renders, fid=fid,
                     progress=lambda key: typer.echo(f"done {key}", err=True))
    from .experiments.sweep import _distributed

    st = _distributed()
    if st is not None and not st.is_main_process:
        return
    for r in rows:
        sv, what = saving(r)
        typer.echo(f"{r['key']:<36} saved {sv:6.1%} {what:<11}  evaluations x{r['evaluation_ratio']:.2f}  "
                   f"PSNR {r['psnr'][0]:5.1f}" + (f"  all-right {r['accuracy']['all']:.1%}" if "accuracy" in r else "")
                   + (f"  KID x1000 {r['kid_x1000'][0]:.2f}" if "kid_x1000" in r else "")
                   + (f"  FID {r['fid']:.2f} (n={r['fid_n'][0]} vs {r['fid_n'][1]})" if "fid" in r else ""))


@app.command()
def calibrate(
    model: str = typer.Option("embedded", help=MODEL_HELP),
    prompts: str = typer.Option("world", help="'world' or a prompt file"),
    out: Path = typer.Option(Path("shapefirst-calibrate"), help="output folder (reuses a finished sweep)"),
    n: int = typer.Option(64, help="number of prompts"),
    tolerance: float = typer.Option(0.01, help="largest accepted accuracy loss (95% paired CI lower bound)"),
    stops: str = typer.Option("0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8", help="candidate stops"),
    adaptive: str = typer.Option("", help="candidate adaptive-stop thresholds, e.g. 0.99,0.995"),
    caches: str = typer.Option("none", help="candidate late-stage caches: none, mean, kept, deep3, mean+deep3"),
    modes: str = typer.Option("uncond,cond", help="branches kept after the stop"),
    timing_batches: int = typer.Option(3, help="batches timed against full guidance; 0 = rank by saved evaluations"),
    scheduler: str = typer.Option("ddim", help="scheduler"),
    steps: int = typer.Option(50, help="denoising steps"),
    guidance: float = typer.Option(7.5, help="classifier-free guidance scale"),
    batch: int = typer.Option(8, help="images per pipeline call"),
    clip: Optional[Path] = typer.Option(None, help="a local CLIP model folder"),
    device: Optional[str] = typer.Option(None, help="cpu, cuda, mps"),
):
    """Find the fastest setting (stop, adaptive threshold, late cache) that keeps quality within the
    tolerance; print it with its measured saving and a snippet."""
    from .experiments.sweep import calibrate as pick, default_configs, run_sweep, saving, snippet

    if not 0 < tolerance < 1:
        raise ShapefirstError(f"tolerance {tolerance} is outside (0, 1)", "pass e.g. 0.01 (one point)")
    stop_list = _floats(stops, "--stops")
    if out.exists() and not out.is_dir():
        raise ShapefirstError(f"output path {out} is a file", "pass a folder path with --out")
    mode_list = [m for m in modes.split(",") if m]
    for m in mode_list:
        if m not in ("uncond", "cond"):
            raise ShapefirstError(f"--modes value {m!r} is not uncond or cond", "pass e.g. uncond,cond")
    configs = default_configs(guidance, stop_list, (scheduler,), (steps,), modes=mode_list,
                              adaptive=_thresholds(adaptive), caches=_caches(caches))
    pipe, ps, targets, scorer, real = _sweep_inputs(model, prompts, n, 0, clip, device, False)
    if timing_batches < 0:
        raise ShapefirstError(f"--timing-batches {timing_batches} is negative", "pass 0 (no timing) or more")
    rows = run_sweep(pipe, ps, out, targets=targets, batch=batch, clip=scorer, configs=configs, real_images=real,
                     timing_batches=timing_batches)
    best, verdicts = pick(rows, tolerance)
    for r, ok, why in verdicts:
        typer.echo(f"{'PASS' if ok else 'fail'} {r['key']:<36} saved {saving(r)[0]:6.1%}  {why}")
    if best is None:
        typer.echo("no configuration stays within the tolerance: keep full guidance")
        return
    sv, what = saving(best)
    typer.echo(f"\nrecommended: {best['key']} saves {sv:.1%} of the {what} "
               f"(measured on n={best['n']} prompts)\n\n{snippet(best)}")


@app.command()
def train(
    out: Path = typer.Option(Path("shapes-world-train"), help="work folder (checkpoints; rerun to resume)"),
    seed: int = typer.Option(0, help="seed of the whole recipe"),
    tiny: bool = typer.Option(False, "--tiny", help="a few steps of every stage on tiny sizes (smoke test)"),
    dest: Optional[Path] = typer.Option(None, help="where the finished model folder goes (default OUT/model)"),
):
    """Train the shapes-world model (tokenizer -> CLIP -> VAE -> UNet); resumes from checkpoints."""
    from .world.train import Recipe, train as run_train

    recipe = Recipe.tiny(seed) if tiny else Recipe(seed=seed)
    path = run_train(out, recipe, dest)
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
        app(args=argv, standalone_mode=False)
    except ShapefirstError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except (typer.Exit, SystemExit) as e:
        code = getattr(e, "exit_code", getattr(e, "code", 0))
        return int(code or 0)
    except Exception as e:  # click usage errors
        import click

        if isinstance(e, click.exceptions.ClickException):
            e.show()
            return e.exit_code
        if isinstance(e, click.exceptions.Abort):
            print("aborted", file=sys.stderr)
            return 1
        raise
    return 0


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
