"""`shapefirst report`: run (or reuse) every analysis and a small sweep, then write one offline page.

Layout of OUT:
    results/<analysis>/      result folders (reused on a rerun when their settings match)
    results/generate/        the traced generation (film strips)
    results/sweep/           sweep.jsonl, sweep.csv, pareto.png, cached reference images
    results/peers/           with --peers STUDY: a copy of a benchmarks/peers.py study's rows + its Pareto plot
    page-<stamp>/            the figures of one build
    index.html               written last, atomically; it points at one page-<stamp>/ folder,
                             so a reader sees the old page or the new one, never a half-written one
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from ..errors import ShapefirstError
from ..experiments import analyses, check_inputs
from ..experiments.registry import Inputs, figures_of
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
from ..outputs import OutputFolder
from ..outputs import model_fingerprint, text_digest, version
from ..results import read_jsonl
from ..world.prompts import world_prompts

BUDGETS = {
    # n prompts (or pairs) per analysis, steps, film strips, sweep prompts, sweep stops, batch
    "quick": {"n": 8, "steps": 20, "film": 4, "sweep_n": 8, "stops": (0.25, 0.5, 0.75), "batch": 8},
    "full": {"n": 64, "steps": 50, "film": 6, "sweep_n": 64, "stops": (0.1, 0.25, 0.5, 0.75, 0.9), "batch": 16},
}


def run_report(pipe, out: str | Path, budget: str = "quick", world: bool = True, clip=None, prompts=None,
               pairs=None, progress=None, model_name: str = "embedded", guidance: float | None = None,
               overwrite: bool = False, peers: str | Path | None = None) -> Path:
    """Compute what is missing under out/results, then build the page. Returns index.html's path.
    peers: a `benchmarks/peers.py` study folder, kept under results/peers/ and shown as its own section;
    None = the study shipped for the embedded model, when pipe is that model at its recommended scale.
    Every section is keyed by its settings and the model's weights: a saved section made with
    others is refused unless overwrite=True (then recomputed). guidance: None = the model's default."""

    if budget not in BUDGETS:
        raise ShapefirstError(f"unknown budget {budget!r}", f"use one of: {', '.join(BUDGETS)}")
    b = BUDGETS[budget]
    out = Path(out)
    owner = OutputFolder(out, "report").check()
    w = default_guidance(model_name) if guidance is None else guidance
    res_dir = out / "results"
    t0 = time.time()
    tick = progress or (lambda name: None)
    check_inputs(Inputs(prompts=prompts, pairs=pairs, clip=clip, world=world))
    if peers is None:  # the embedded model at its recommended scale: the study shipped with the package

        peers = default_study(pipe, w)
    if peers is not None:

        read_study(peers)  # a wrong folder fails before any model run
    ps, targets = (prompts, None) if prompts else world_prompts(max(b["n"], b["sweep_n"]), 0)
    owner.claim(["results"])
    tick("generate")
    _film(pipe, ps[:b["film"]], b["steps"], w, res_dir / "generate", overwrite)
    timings = {}
    for name in analyses():
        tick(name)
        s = time.time()
        run_analysis(name, pipe, res_dir, n=b["n"], steps=b["steps"], seed=0,
                     guidance=w, prompts=ps[:b["n"]] if prompts else None, pairs=pairs, clip=clip, world=world,
                     batch=b["batch"], overwrite=overwrite)
        timings[name] = time.time() - s
    tick("sweep")
    s = time.time()
    run_sweep(pipe, ps[:b["sweep_n"]], res_dir / "sweep", targets=targets[:b["sweep_n"]] if targets else None,
              configs=default_configs(w, stops=b["stops"], steps=(b["steps"],)), batch=b["batch"], clip=clip,
              overwrite=overwrite, warn_void=False)  # a void timing is said on the page (VOID_CAPTION)
    timings["sweep"] = time.time() - s
    if peers is not None:
        keep_peers(peers, out)
    meta = {"model": model_name, "budget": budget, "guidance": w, "settings": b, "seconds": time.time() - t0,
            "timings": timings}
    return build_page(out, meta)


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


def _film(pipe, prompts, steps: int, guidance: float, folder: Path, overwrite: bool) -> None:
    """The traced generation behind the film strips, reused when its key matches."""

    key = {"model": model_fingerprint(pipe), "prompts": text_digest(prompts), "steps": steps, "guidance": guidance,
           "version": version()}
    if OutputFolder(folder, "generate", key, overwrite=overwrite).check(probe=False, dry=True).reused \
            and (folder / "run.json").exists():
        return
    r = generate(pipe, prompts, GuidanceSchedule(guidance), steps=steps, trace=True)
    r.save(folder, vae=pipe.vae, overwrite=overwrite, key=key)


def _sections(res_dir: Path) -> list[dict]:
    """Figures, tables and captions per analysis, from saved results only."""
    out = []
    gen = res_dir / "generate"
    if (gen / "run.json").exists():
        run = json.loads((gen / "run.json").read_text())
        out.append({"id": "generate", "title": "Shape first, details later: x0-hat at every denoiser call",
                    "caption": "Each row is one prompt; columns show the model's current guess of the final image "
                               "(x0-hat, decoded) from the first denoiser call (left) to the last (right): where the "
                               "object's place, color and outline appear, and how long fine detail keeps changing.",
                    "figures": [gen / "trajectory" / "contact_sheet.png"],
                    "table": [["prompt", "steps", "guidance"]] + [[p, run["steps"], run["guidance"]]
                                                                  for p in run["prompts"]]})
    for name, analysis in analyses().items():
        folder = res_dir / name
        if (folder / "results.json").exists():
            sm = analysis.summary(Result.load(folder))
            out.append({"id": name, "title": sm.title, "caption": sm.caption, "figures": figures_of(sm, folder),
                        "table": sm.table})
    sw = res_dir / "sweep"
    if (sw / "sweep.jsonl").exists():

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
        out.append({"id": "sweep", "title": "What turning guidance off late buys",
                    "caption": "Saved latency is measured against full guidance on the same batches (A/B adjacent, "
                               "median of ratios); quality is measured against the full-guidance image of the same "
                               "seed. 'uncond' keeps the unconditional branch after the stop (the paper), 'cond' the "
                               "conditional one (diffusers' callback)." + (VOID_CAPTION if void else ""),
                    "figures": [sw / "pareto.png"] if (sw / "pareto.png").exists() else [], "table": rows})
    if (res_dir / "peers" / "quality.jsonl").exists():
        out.append(_peers_section(res_dir / "peers"))
    return out


VOID_CAPTION = (" These timings are VOID: full guidance timed against itself moved by more than "
                f"{VOID_NOISE:.0%} (the machine was busy), so the saved latencies are not measurements; the figure "
                "places the configurations by their saved denoiser evaluations instead. Rerun the report with "
                "nothing else running.")


def build_page(out: str | Path, meta: dict | None = None) -> Path:
    """Render index.html from out/results alone (no model run)."""
    import jinja2


    out = Path(out)
    res_dir = out / "results"
    if not res_dir.is_dir():
        raise ShapefirstError(f"{res_dir} holds no results", "run `shapefirst report` first")
    OutputFolder(out, "report").check(probe=False)
    stamp = time.strftime("%Y%m%d-%H%M%S") + f"-{time.time_ns() % 10**6:06d}"
    page = out / f"page-{stamp}"
    page.mkdir(parents=True)
    OutputFolder(out, "report").claim(["results", page.name])
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
    env = jinja2.Environment(loader=jinja2.PackageLoader("shapefirst", "report"), autoescape=True)
    meta = meta or {}
    text = env.get_template("template.html").render(sections=sections, meta=meta, machine=machine_info(),
                                                    meta_json=json.dumps(meta, indent=1, default=str))
    owner = OutputFolder(out, "report")
    old_pages = [e for e in owner.entries() if e.startswith("page-") and e != page.name]
    owner.claim(["results", "index.html", page.name])
    atomic_write_text(out / "index.html", text)
    for name in old_pages:  # only pages this command built: a user's own page-* folder stays
        shutil.rmtree(out / name, ignore_errors=True)
    owner.forget(old_pages)
    return out / "index.html"
