"""`shapefirst report`: run (or reuse) every analysis and a small sweep, then write one offline page.

Layout of OUT:
    results/<analysis>/      result folders (reused on a rerun when their settings match)
    results/generate/        the traced generation (film strips; for a video its strip and animation)
    results/spacetime/       a video's x0-hat in space and time (from the traced generation)
    results/report.json      the family, the call arguments, and why a section does not apply to this model
    results/sweep/           sweep.jsonl, sweep.csv, pareto.png, cached reference images
    results/peers/           with --peers STUDY: a copy of a benchmarks/peers.py study's rows + its Pareto plot
    page-<stamp>/            the figures of one build
    index.html               written last, atomically; it points at one page-<stamp>/ folder,
                             so a reader sees the old page or the new one, never a half-written one

Every family runs the report (image and video, batched and separate-call CFG). A section that does not apply to
the model is one line on the page saying why (results/report.json keeps it): stages on a video (it judges single
images), frequency on flow matching (its forward process is the DDPM one), attention where
shapefirst.attention.capture_attention refuses the denoiser (its own line), eos-swap and token-ablation where
the family's text has no [EOS] block to edit (tokens.require_end_token) or shapefirst.pipeline does not make its
prompt embeddings (pipeline.EMBEDDING_FAMILIES); an analysis that raises a ShapefirstError while it
runs is that line too (a section saved with other settings is still refused before anything runs).
`call` gives every pipeline call of the report the same arguments (a video's height, width and frames): the report
runs a pipeline sharing the model's components whose calls default to them (with_call_defaults), and they are part
of its fingerprint, so no section made at another size is reused.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import copy

from ..attention import capture_attention
from ..errors import ShapefirstError
from ..experiments import analyses, analysis_key, check_inputs
from ..experiments.frequency import check_pipeline as check_frequency
from ..experiments.frequency import plot_spacetime, run_spacetime, spacetime_summary
from ..experiments.registry import Inputs, figures_of
from ..experiments.stages import check_pipeline as check_stages
from ..families import family
from ..pipeline import require_embeddings
from ..tokens import require_end_token
from ..trace import Trajectory
from ..results import Result, atomic_write_text
from ..experiments import run_analysis
from ..peers import (
        batch1_only,
        fastest_within_tolerance,
        read_batch1,
        read_study,
        study_info,
        table_rows,
    )
from ..peers import default_study
from ..peers import keep_study
from ..sweep import default_configs, run_sweep
from ..timing import VOID_NOISE, any_void
from ..generate import generate
from ..generate import machine_info
from ..guidance import GuidanceSchedule
from ..models import default_guidance
from ..outputs import CALL_DEFAULTS, OutputFolder
from ..outputs import model_fingerprint, text_digest, version
from ..results import read_jsonl, strict_dumps
from ..world.prompts import world_prompts

BUDGETS = {
    # n prompts (or pairs) per analysis, steps, film strips, sweep prompts, sweep stops, batch
    "quick": {"n": 8, "steps": 20, "film": 4, "sweep_n": 8, "stops": (0.25, 0.5, 0.75), "batch": 8},
    "full": {"n": 64, "steps": 50, "film": 6, "sweep_n": 64, "stops": (0.1, 0.25, 0.5, 0.75, 0.9), "batch": 16},
}


CALL_KEYS = ("height", "width", "num_frames", "max_sequence_length")
"""The call arguments the report passes to every pipeline call (`call`): sizes, never guidance or prompts."""


def run_report(pipe, out: str | Path, budget: str = "quick", world: bool = True, clip=None, prompts=None,
               pairs=None, progress=None, model_name: str = "embedded", guidance: float | None = None,
               overwrite: bool = False, peers: str | Path | None = None, call: dict | None = None) -> Path:
    """Compute what is missing under out/results, then build the page. Returns index.html's path.
    peers: a `benchmarks/peers.py` study folder, kept under results/peers/ and shown as its own section;
    None = the study shipped for the embedded model, when pipe is that model at its recommended scale.
    Every section is keyed by its settings and the model's weights: a saved section made with
    others is refused unless overwrite=True (then recomputed). guidance: None = the model's default.
    call: arguments for every pipeline call, of CALL_KEYS (e.g. {"height": 480, "width": 832, "num_frames": 33}
    for a video); None = the pipeline's own defaults. A section that does not apply to this family is one line on
    the page saying why (see the module docstring)."""

    if budget not in BUDGETS:
        raise ShapefirstError(f"unknown budget {budget!r}", f"use one of: {', '.join(BUDGETS)}")
    b = BUDGETS[budget]
    out = Path(out)
    call = check_call(call)
    owner = OutputFolder(out, "report").check()
    w = default_guidance(model_name) if guidance is None else guidance
    res_dir = out / "results"
    t0 = time.time()
    tick = progress or (lambda name: None)
    fam = family(pipe)
    check_inputs(Inputs(prompts=prompts, pairs=pairs, clip=clip, world=world))
    if peers is None:  # the embedded model at its recommended scale: the study shipped with the package

        peers = default_study(pipe, w)
    if peers is not None:

        read_study(peers)  # a wrong folder fails before any model run
    runner = with_call_defaults(pipe, call) if call else pipe
    ps, targets = (prompts, None) if prompts else world_prompts(max(b["n"], b["sweep_n"]), 0)
    owner.claim(["results"])
    tick("generate")
    film_key = _film(runner, ps[:b["film"]], b["steps"], w, res_dir / "generate", overwrite)
    timings, not_run = {}, {}
    if fam.video:
        tick("spacetime")
        _spacetime(res_dir, film_key, overwrite)
    for name in analyses():
        reason = not_applicable(name, runner)
        if reason is not None:
            not_run[name] = reason
            continue
        tick(name)
        s = time.time()
        args = dict(n=b["n"], steps=b["steps"], seed=0, guidance=w, prompts=ps[:b["n"]] if prompts else None,
                    pairs=pairs, clip=clip, world=world, batch=b["batch"])
        # a section saved with other settings is refused here, before the run, never shown as "not run"
        OutputFolder(res_dir / name, "analyze", analysis_key(name, runner, **args), overwrite=overwrite).check(
            probe=False, dry=True)
        try:
            run_analysis(name, runner, res_dir, overwrite=overwrite, **args)
        except ShapefirstError as e:  # the analysis refused this model while running (its own one line)
            not_run[name] = str(e)
        timings[name] = time.time() - s
    tick("sweep")
    s = time.time()
    run_sweep(runner, ps[:b["sweep_n"]], res_dir / "sweep", targets=targets[:b["sweep_n"]] if targets else None,
              configs=default_configs(w, stops=b["stops"], steps=(b["steps"],), schedulers=(_sweep_scheduler(fam),)),
              batch=b["batch"], clip=None if fam.video else clip,  # CLIP scores single images, not videos
              overwrite=overwrite, warn_void=False)  # a void timing is said on the page (VOID_CAPTION)
    timings["sweep"] = time.time() - s
    if peers is not None:
        keep_peers(peers, out)
    atomic_write_text(res_dir / "report.json", strict_dumps({"family": fam.name, "video": fam.video, "call": call,
                                                             "not_run": not_run}, indent=1))
    meta = {"model": model_name, "budget": budget, "guidance": w, "settings": b, "seconds": time.time() - t0,
            "timings": timings, "family": fam.name, "call": call}
    return build_page(out, meta)


def check_call(call) -> dict:
    """The report's call arguments: a dict of CALL_KEYS -> positive integers (None: none)."""
    if call is None:
        return {}
    if not isinstance(call, dict):
        raise ShapefirstError(f"call={call!r} is not a dict of call arguments", 'pass e.g. call={"height": 480}')
    for k, v in call.items():
        if k not in CALL_KEYS:
            raise ShapefirstError(f"the report does not pass {k!r} to the pipeline",
                                  f"pass only {', '.join(CALL_KEYS)}")
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ShapefirstError(f"{k}={v!r} is not a positive integer", f"pass e.g. {k}=16")
    return dict(call)


def with_call_defaults(pipe, call: dict):
    """A pipeline sharing `pipe`'s components and settings (a shallow copy) whose calls default to `call` (a caller's
    own arguments win). Its class derives from pipe's and has its name, so families, hooks and records see the same
    pipeline; the defaults are a class attribute (outputs.CALL_DEFAULTS), part of its fingerprint."""
    base = type(pipe)
    defaults = dict(call)

    def __call__(self, *args, **kwargs):
        return base.__call__(self, *args, **{**defaults, **kwargs})

    cls = type(base.__name__, (base,), {"__call__": __call__, CALL_DEFAULTS: defaults,
                                         "__module__": base.__module__, "__qualname__": base.__qualname__})
    runner = copy.copy(pipe)
    runner.__class__ = cls
    return runner


def not_applicable(name: str, pipe) -> str | None:
    """Why analysis `name` does not apply to this pipeline (one line), or None when it runs."""
    try:
        if name == "stages":
            check_stages(pipe)
        elif name == "frequency":
            check_frequency(pipe)
        elif name == "attention":
            with capture_attention(pipe):  # its own refusal, when the denoiser has no text attention it captures
                pass
    except ShapefirstError as e:
        return str(e)
    if name in ("eos-swap", "token-ablation"):
        try:  # the reason the family's text has no [EOS] block to edit first, then pipeline.EMBEDDING_FAMILIES
            require_end_token(pipe, name)
            require_embeddings(pipe, name)
        except ShapefirstError as e:
            return str(e)
    return None


def _sweep_scheduler(fam) -> str | None:
    """ddim where the family takes it (the report's sweep so far), else the pipeline's own scheduler (None)."""
    return "ddim" if "ddim" in fam.schedulers else None


def _spacetime(res_dir: Path, film_key: dict, overwrite: bool) -> None:
    """A video's x0-hat in space and time, from the traced generation's trajectory (keyed by that run's key)."""
    folder = res_dir / "spacetime"
    owner = OutputFolder(folder, "analyze", {"analysis": "spacetime", "film": film_key}, overwrite=overwrite).check()
    if owner.reused and (folder / "results.json").exists():
        return
    res = run_spacetime(Trajectory.load(res_dir / "generate" / "trajectory"))
    owner.claim()
    res.save(folder)
    figs = plot_spacetime(res, folder)
    owner.claim(["results.json", "arrays.safetensors", *[Path(f).name for f in figs]])


def keep_peers(study: str | Path, out: str | Path) -> Path:
    """Keep a peers study's rows and Pareto plot under out/results/peers (the page reads them from there)."""

    out = Path(out)
    OutputFolder(out, "report").claim(["results"])
    return keep_study(study, out / "results" / "peers")


def _peers_section(folder: Path) -> dict:
    q, t = read_study(folder)
    info = study_info(folder)
    where = (f" Measured by `python benchmarks/peers.py` on {info['machine']} (model {info['model']}, guidance "
             f"{info['guidance']:g}); shipped with shapefirst, not recomputed by this report." if info else "")
    best = fastest_within_tolerance(q, t)
    n, timed = q["full"]["n"], sum(1 for name in q if name in t and not batch1_only(name))
    verdict = (f"The fastest batch-8 configuration within the calibrate tolerance here is {best[0]} "
               f"({best[1]:.1%} saved)." if best else
               "No timed configuration other than full guidance stays within the calibrate tolerance here.")
    return {"id": "peers", "title": "shapefirst against its peers: saved latency and all-five accuracy",
            "caption": f"benchmarks/peers.py: {len(q)} configurations on the same {n} prompts and seeds, each image "
                       f"judged; {timed} of them timed A/B adjacent against full guidance at batch 8 (median of "
                       "ratios; only those are on the plot), and at batch 1 where the table says. Error bars: "
                       "Wilson 95% intervals. Within "
                       "tolerance: every attribute's paired 95% CI above -1 point and Image-CLIP not below the "
                       f"seed floor. {verdict}{where}",
            "figures": [folder / "pareto.png"] if (folder / "pareto.png").exists() else [],
            "table": table_rows(q, t, read_batch1(folder))}


def _film(pipe, prompts, steps: int, guidance: float, folder: Path, overwrite: bool) -> dict:
    """The traced generation behind the film strips (a video's strip and animation), reused when its key matches.
    Returns its key."""

    key = {"model": model_fingerprint(pipe), "prompts": text_digest(prompts), "steps": steps, "guidance": guidance,
           "version": version()}
    if OutputFolder(folder, "generate", key, overwrite=overwrite).check(probe=False, dry=True).reused \
            and (folder / "run.json").exists():
        return key
    r = generate(pipe, prompts, GuidanceSchedule(guidance), steps=steps, trace=True)
    r.save(folder, vae=pipe.vae, overwrite=overwrite, key=key)
    return key


def _sections(res_dir: Path) -> list[dict]:
    """Figures, tables and captions per analysis, from saved results only; a section that does not apply to the
    model (results/report.json) is its one line."""
    info = json.loads((res_dir / "report.json").read_text()) if (res_dir / "report.json").exists() else {}
    not_run = info.get("not_run") or {}
    out = []
    gen = res_dir / "generate"
    if (gen / "run.json").exists():
        out.append(_film_section(gen))
    if (res_dir / "spacetime" / "results.json").exists():
        sm = spacetime_summary(Result.load(res_dir / "spacetime"))
        out.append({"id": "spacetime", "title": sm.title, "caption": sm.caption,
                    "figures": figures_of(sm, res_dir / "spacetime"), "table": sm.table})
    for name, analysis in analyses().items():
        folder = res_dir / name
        if (folder / "results.json").exists():
            sm = analysis.summary(Result.load(folder))
            out.append({"id": name, "title": sm.title, "caption": sm.caption, "figures": figures_of(sm, folder),
                        "table": sm.table})
        elif name in not_run:
            out.append({"id": name, "title": f"{name}: not run on this model",
                        "caption": f"Not run on this model: {not_run[name]}", "figures": [], "table": []})
    sw = res_dir / "sweep"
    if (sw / "sweep.jsonl").exists():
        out.append(_sweep_section(sw, bool(info.get("video"))))
    if (res_dir / "peers" / "quality.jsonl").exists():
        out.append(_peers_section(res_dir / "peers"))
    return out


def _film_section(gen: Path) -> dict:
    run = json.loads((gen / "run.json").read_text())
    table = [["prompt", "steps", "guidance"]] + [[p, run["steps"], run["guidance"]] for p in run["prompts"]]
    traj = gen / "trajectory"
    meta = json.loads((traj / "trajectory.json").read_text()).get("meta", {}) if (traj / "trajectory.json").exists() \
        else {}
    if meta.get("layout") in ("video", "video_frames"):
        return {"id": "generate", "title": "Shape first, details later: x0-hat of every frame, call by call",
                "caption": "The strip: per video (top to bottom), each row is one denoiser call (first at the top, "
                           "last at the bottom, evenly spaced) and each column one frame of the model's current "
                           "guess of the final video (x0-hat, decoded by the pipeline's VAE as the pipeline decodes "
                           "its latents). The animation plays the video: per frame, the calls side by side (first "
                           "call left, last call right), so motion and detail can be watched forming.",
                "figures": [traj / "contact_sheet.png", traj / "x0.gif"], "table": table}
    return {"id": "generate", "title": "Shape first, details later: x0-hat at every denoiser call",
            "caption": "Each row is one prompt; columns show the model's current guess of the final image "
                       "(x0-hat, decoded) from the first denoiser call (left) to the last (right): where the "
                       "object's place, color and outline appear, and how long fine detail keeps changing.",
            "figures": [traj / "contact_sheet.png"], "table": table}


def _sweep_section(sw: Path, video: bool) -> dict:
    rows = [["configuration", "saved latency", "denoiser evaluations", "L1 to full", "PSNR to full", "Image-CLIP",
             "all attributes right"]]
    swept = read_jsonl(sw / "sweep.jsonl")
    void = any_void(swept)
    for r in swept:
        lat = "-" if r.get("saved_latency") is None else f"{r['saved_latency']:.1%}"
        rows.append([r["key"], lat + (" (void)" if r.get("timing_void") and r.get("name") != "full" else ""),
                     f"{r['evaluation_ratio']:.2f}", f"{r['l1'][0]:.4f}",
                     f"{r['psnr'][0]:.1f}", f"{r['image_clip'][0]:.1f}" if "image_clip" in r else "-",
                     f"{r['accuracy']['all']:.0%}" if "accuracy" in r else "-"])
    return {"id": "sweep", "title": "What turning guidance off late buys",
            "caption": "Saved latency is measured against full guidance on the same batches (A/B adjacent, "
                       "median of ratios); quality is measured against the full-guidance image of the same "
                       "seed. 'uncond' keeps the unconditional branch after the stop (the paper), 'cond' the "
                       "conditional one (diffusers' callback)."
                       + (" On videos L1 and PSNR are over every frame; Image-CLIP is not measured (CLIP scores "
                          "single images)." if video else "") + (VOID_CAPTION if void else ""),
            "figures": [sw / "pareto.png"] if (sw / "pareto.png").exists() else [], "table": rows}


VOID_CAPTION = (" These timings are VOID: full guidance timed against itself moved by more than "
                f"{VOID_NOISE:.0%} (the machine was busy), so the saved latencies are not measurements; the figure "
                "places the configurations by their saved denoiser evaluations instead. Rerun the report with "
                "nothing else running.")


def _render(page: Path, res_dir: Path, meta: dict) -> str:
    """The page's figures copied into `page`, and index.html's text."""
    import jinja2

    sections = _sections(res_dir)
    for sec in sections:
        figs = []
        for f in sec["figures"]:
            f = Path(f)
            if f.exists():
                dest = page / f"{sec['id']}-{f.name}"
                shutil.copy2(f, dest)
                figs.append(f"{page.name}/{dest.name}")
        sec["figures"] = figs
    if "family" not in meta and (res_dir / "report.json").exists():
        info = json.loads((res_dir / "report.json").read_text())
        meta = {**meta, "family": info.get("family"), "call": info.get("call")}
    env = jinja2.Environment(loader=jinja2.PackageLoader("shapefirst", "report"), autoescape=True)
    return env.get_template("template.html").render(sections=sections, meta=meta, machine=machine_info(),
                                                    meta_json=json.dumps(meta, indent=1, default=str))


def build_page(out: str | Path, meta: dict | None = None) -> Path:
    """Render index.html from out/results alone (no model run)."""
    out = Path(out)
    res_dir = out / "results"
    if not res_dir.is_dir():
        raise ShapefirstError(f"{res_dir} holds no results", "run `shapefirst report` first")
    OutputFolder(out, "report").check(probe=False)
    stamp = time.strftime("%Y%m%d-%H%M%S") + f"-{time.time_ns() % 10**6:06d}"
    page = out / f"page-{stamp}"
    page.mkdir(parents=True)
    owner = OutputFolder(out, "report")
    owner.claim(["results", page.name])
    try:
        text = _render(page, res_dir, meta or {})
        old_pages = [e for e in owner.entries() if e.startswith("page-") and e != page.name]
        owner.claim(["results", "index.html", page.name])
        atomic_write_text(out / "index.html", text)
    except BaseException:  # the page folder this build began goes again: nothing half-written stays
        shutil.rmtree(page, ignore_errors=True)
        owner.forget([page.name])
        raise
    for name in old_pages:  # only pages this command built: a user's own page-* folder stays
        shutil.rmtree(out / name, ignore_errors=True)
    owner.forget(old_pages)
    return out / "index.html"
