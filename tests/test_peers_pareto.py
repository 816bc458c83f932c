"""The peers study's summary (shapefirst.peers): the Pareto plot has one curve per method and
only configurations with both a quality row and a batch-8 timing; a study folder is read, refused when it
is not one, kept under a report's results/peers and shown there as its own section."""
import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from shapefirst.cli import main
from shapefirst.errors import ShapefirstError
from shapefirst import peers
from shapefirst.metrics import mean_ci, wilson
from shapefirst.outputs import OutputFolder
from shapefirst.report import build_page, keep_peers

ROOT = Path(__file__).resolve().parents[1]
ATTRS = ("color", "shape", "position", "size", "texture", "all")


def rows(acc: dict[str, float], n: int = 1000) -> dict:
    return {name: {"n": n, "accuracy": {"all": a}} for name, a in acc.items()}


def sweep_row(name, all_right, worst_lo=0.0, image_clip=98.0, evals=0.75, n=1000):
    d = {a: [0.0, worst_lo if a == "shape" else 0.0, 0.01] for a in ATTRS}
    return {"name": name, "key": name, "n": n, "accuracy": {a: all_right for a in ATTRS},
            "accuracy_delta_vs_full": d, "evaluation_ratio": evals, "image_clip": [image_clip, 0, 0],
            "image_clip_floor": [97.0, 0, 0]}


def write_study(folder: Path, quality: list[dict], timing: list[dict] | None) -> Path:
    for phase, rs in (("quality", quality), ("timing", timing)):
        if rs is not None:
            (folder / phase).mkdir(parents=True, exist_ok=True)
            (folder / phase / "sweep.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rs))
    return folder


STUDY_Q = [sweep_row("full", 0.95, evals=1.0, image_clip=100.0),
           sweep_row("shapefirst stop=0.5 uncond +mean+deep3", 0.945),
           sweep_row("shapefirst stop=0.4 uncond +mean+deep3", 0.93, worst_lo=-0.02),  # fails the 1-point rule
           sweep_row("T-GATE gate_step=25 (tgate)", 0.94),
           sweep_row("diffusers SDCFGCutoffCallback(0.5)", 0.95)]
STUDY_T = [{"name": "full", "saved_latency": 0.0},
           {"name": "shapefirst stop=0.5 uncond +mean+deep3", "saved_latency": 0.36},
           {"name": "shapefirst stop=0.4 uncond +mean+deep3", "saved_latency": 0.43},
           {"name": "T-GATE gate_step=25 (tgate)", "saved_latency": 0.30},
           {"name": "diffusers SDCFGCutoffCallback(0.5)", "saved_latency": 0.9}]  # batch 1: never "fastest"


def test_points_group_by_method_sort_by_saving_and_skip_untimed(tmp_path):
    q = rows({"full": 0.9, "shapefirst stop=0.3 uncond +mean": 0.87, "shapefirst stop=0.5 uncond": 0.89,
              "shapefirst stop_step=25 uncond + DeepCache interval=3": 0.86, "T-GATE gate_step=25 (tgate)": 0.88,
              "Step AG 0.5 (stop=0.5 cond)": 0.885, "diffusers SDCFGCutoffCallback(0.5)": 0.88})
    t = {"full": {"saved_latency": 0.0}, "shapefirst stop=0.5 uncond": {"saved_latency": 0.21},
         "shapefirst stop=0.3 uncond +mean": {"saved_latency": 0.45},
         "T-GATE gate_step=25 (tgate)": {"saved_latency": 0.3},
         "shapefirst stop_step=25 uncond + DeepCache interval=3": {"saved_latency": 0.5},
         "diffusers SDCFGCutoffCallback(0.5)": {"saved_latency": 0.2}}  # a batch-1 row: not on this axis
    pts = peers.pareto_points(q, t)
    assert set(pts) == {"full guidance", "shapefirst stop (+ late caches), uncond after", "T-GATE (tgate)",
                        "shapefirst stop + DeepCache, uncond after"}
    ours = pts["shapefirst stop (+ late caches), uncond after"]
    assert [p[4] for p in ours] == ["shapefirst stop=0.5 uncond", "shapefirst stop=0.3 uncond +mean"]
    assert ours[0][2:4] == pytest.approx(wilson(890, 1000))
    assert peers.pareto_plot(q, t, tmp_path / "p.png").stat().st_size > 0
    assert peers.pareto_plot(q, {}, tmp_path / "none.png") is None and not (tmp_path / "none.png").exists()


def test_the_benchmark_script_draws_with_the_same_function():
    mod = bench_module()
    assert mod.pareto_plot is peers.pareto_plot


def test_fastest_within_tolerance_skips_failing_and_batch1_rows(tmp_path):
    q, t = peers.read_study(write_study(tmp_path, STUDY_Q, STUDY_T))
    assert peers.fastest_within_tolerance(q, t) == ("shapefirst stop=0.5 uncond +mean+deep3", 0.36)
    assert peers.fastest_within_tolerance(q, {}) is None
    table = peers.table_rows(q, t)
    assert [r[0] for r in table[1:]] == [r["name"] for r in STUDY_Q]
    lo, hi = wilson(945, 1000)
    assert table[2][4] == f"94.5% [{lo:.1%}, {hi:.1%}]" and table[2][-1] == "yes"
    assert table[3][-1].startswith("no: shape accuracy CI lower bound -0.020")
    assert table[5][1] == "-" and table[5][2] == "-"  # the callback's batch-1 timing is not a batch-8 saving
    t1 = {"diffusers SDCFGCutoffCallback(0.5)": {"saved_latency": 0.2}, "full": {"saved_latency": -0.01}}
    table = peers.table_rows(q, t, t1)
    assert table[5][1:3] == ["-", "20.0%"] and table[1][2] == "-1.0%" and table[2][2] == "-"


@pytest.mark.parametrize("case", ["empty", "no full row", "missing fields"])
def test_a_folder_that_is_not_a_study_is_refused_before_anything_is_written(tmp_path, case):
    study = tmp_path / "study"
    study.mkdir()
    if case == "no full row":
        write_study(study, STUDY_Q[1:], STUDY_T)
    elif case == "missing fields":
        write_study(study, [{"name": "full", "n": 3}], None)
    dest = tmp_path / "rep" / "results" / "peers"
    with pytest.raises(ShapefirstError, match="peers"):
        peers.keep_study(study, dest)
    assert not dest.exists()


def test_keep_study_copies_rows_draws_and_drops_stale_files(tmp_path):
    dest = tmp_path / "kept"
    study = write_study(tmp_path / "a", STUDY_Q, STUDY_T)
    (study / "timing_b1").mkdir()
    (study / "timing_b1" / "sweep.jsonl").write_text(json.dumps({"name": "full", "saved_latency": 0.01}) + "\n")
    peers.keep_study(study, dest)
    assert sorted(p.name for p in dest.iterdir()) == ["pareto.png", "quality.jsonl", "timing.jsonl", "timing_b1.jsonl"]
    assert peers.read_study(dest) == peers.read_study(study) and peers.read_batch1(dest) == peers.read_batch1(study)
    peers.keep_study(write_study(tmp_path / "b", STUDY_Q, None), dest)  # untimed: no plot, no old timing
    assert sorted(p.name for p in dest.iterdir()) == ["quality.jsonl"]


def test_report_shows_the_kept_study_and_refuses_a_wrong_folder(tmp_path, capsys):
    rep = tmp_path / "rep"
    (rep / "results").mkdir(parents=True)
    OutputFolder(rep, "report").claim(["results"])
    keep_peers(write_study(tmp_path / "study", STUDY_Q, STUDY_T), rep)
    text = build_page(rep).read_text()
    assert 'id="peers"' in text and "shapefirst stop=0.5 uncond +mean+deep3 (36.0% saved)" in text
    assert "4 of them timed" in text  # the callback's batch-1 timing is not counted
    assert any(p.name == "peers-pareto.png" for p in rep.glob("page-*/*"))
    code = main(["report", "--page-only", "--out", str(rep), "--peers", str(tmp_path / "nothing")])
    err = capsys.readouterr().err
    assert code != 0 and "holds no peers study" in err and "benchmarks/peers.py" in err
    assert peers.read_study(rep / "results" / "peers")[0].keys() == {r["name"] for r in STUDY_Q}


def test_the_shipped_study_belongs_to_the_shipped_model_and_is_the_reports_default(tmp_path, tiny_pipe):
    from shapefirst.models import default_guidance, load_pipeline
    from shapefirst.outputs import model_fingerprint

    w, pipe = default_guidance("embedded"), load_pipeline("embedded")
    assert peers.default_study(pipe, w) == peers.SHIPPED_STUDY
    assert peers.default_study(pipe, w + 1) is None and peers.default_study(tiny_pipe, w) is None
    info = peers.study_info(peers.SHIPPED_STUDY)
    assert info["model"] == model_fingerprint(pipe) and info["guidance"] == w
    q, t = peers.read_study(peers.SHIPPED_STUDY)
    assert q["full"]["n"] >= 1000 and t  # the bar: n >= 1000, and timed rows for the plot
    rep = tmp_path / "rep"
    (rep / "results").mkdir(parents=True)
    OutputFolder(rep, "report").claim(["results"])
    keep_peers(peers.SHIPPED_STUDY, rep)  # a flat (shipped or kept) folder copies like a study folder
    assert sorted(p.name for p in (rep / "results" / "peers").iterdir()) == [
        "pareto.png", "quality.jsonl", "study.json", "timing.jsonl", "timing_b1.jsonl"]
    page = build_page(rep).read_text()
    assert f"Measured by `python benchmarks/peers.py` on {info['machine']}" in page
    b1 = peers.read_batch1(peers.SHIPPED_STUDY)["diffusers SDCFGCutoffCallback(0.4)"]["saved_latency"]
    assert f"{b1:.1%}" in page  # the callback's batch-1 saving: the table's batch-1 column


def run_folder(folder: Path, judged: dict[str, list[int]], timing: list[dict] | None = None) -> Path:
    """A benchmarks/peers.py run: quality rows with per-image files (acc/A per image), as run_sweep writes them."""
    from shapefirst.sweep import _save_per_image

    rows = []
    for name, acc in judged.items():
        r = sweep_row(name, float(np.mean(acc)), n=len(acc))
        r["per_image_file"] = f"per_image/{name.replace(' ', '_')}.safetensors"
        _save_per_image(folder / "quality" / r["per_image_file"],
                        {f"acc/{a}": np.array(acc, dtype=float) for a in ("all", "shape")})
        rows.append(r)
    return write_study(folder, rows, timing)


def test_merge_keeps_rows_and_judgments_so_paired_differences_survive_the_run(tmp_path):
    full, ours, peer = [1, 1, 0, 1, 1, 0], [1, 1, 1, 1, 1, 0], [1, 0, 0, 1, 0, 0]
    run = run_folder(tmp_path / "run", {"full": full, "shapefirst stop=0.4 cond": ours,
                                        "T-GATE gate_step=20 (tgate)": peer},
                     [{"name": "full", "saved_latency": 0.01}])
    q, _ = peers.read_study(run)
    a, b = q["shapefirst stop=0.4 cond"], q["T-GATE gate_step=20 (tgate)"]
    expected = peers.paired(run, a, b)
    diff = np.array(ours, dtype=float) - np.array(peer, dtype=float)
    assert expected == pytest.approx(mean_ci(diff))
    dest = tmp_path / "kept"
    write_study(dest, [sweep_row("DeepCache interval=3 (DeepCache)", 0.9)], None)  # an older row, no judgments
    (dest / "quality" / "sweep.jsonl").rename(dest / "quality.jsonl")
    (dest / "quality").rmdir()
    assert peers.merge_study(run, dest) == {}
    shutil.rmtree(run)
    q2, t2 = peers.read_study(dest)
    assert list(q2) == ["DeepCache interval=3 (DeepCache)", "full",
                        "shapefirst stop=0.4 cond", "T-GATE gate_step=20 (tgate)"]
    assert t2 == {"full": {"name": "full", "saved_latency": 0.01}}
    assert peers.paired(dest, q2["shapefirst stop=0.4 cond"],
                        q2["T-GATE gate_step=20 (tgate)"]) == pytest.approx(expected)
    assert peers.paired(dest, q2["shapefirst stop=0.4 cond"], q2["DeepCache interval=3 (DeepCache)"]) is None
    # a rerun: the same accuracies reproduce, another one is reported; the rerun's row replaces the kept one
    rerun = run_folder(tmp_path / "rerun", {"full": full, "shapefirst stop=0.4 cond": full})
    checks = peers.merge_study(rerun, dest)
    assert checks["full"] == "same" and checks["shapefirst stop=0.4 cond"].startswith("accuracy")
    q3, _ = peers.read_study(dest)
    assert q3["shapefirst stop=0.4 cond"]["accuracy"]["all"] == pytest.approx(4 / 6)
    assert peers.judged(dest, q3["T-GATE gate_step=20 (tgate)"])["all"].tolist() == peer  # kept from the first run


def test_the_benchmark_table_pairs_a_kept_study_from_its_judgments(tmp_path):
    mod = bench_module()
    ours, peer = [1, 1, 1, 1, 0, 1], [1, 0, 0, 1, 0, 1]
    run = run_folder(tmp_path / "run", {"full": [1] * 6, "shapefirst stop=0.4 cond": ours,
                                        "diffusers SDCFGCutoffCallback(0.4)": peer})
    for phase, rows_ in (("quality", peers.read_study(run)[0].values()), ("timing_b1", [])):
        (run / phase).mkdir(exist_ok=True)
        extra = {"kid_x1000": [0.1, 0.0, 0.2], "image_clip_ceiling": [100.0, 0, 0]}
        (run / phase / "sweep.jsonl").write_text("".join(json.dumps({**r, **extra}) + "\n" for r in rows_))
    (run / "timing_b1" / "sweep.jsonl").write_text("".join(json.dumps({"name": n, "n": 6, "saved_latency": s}) + "\n"
                                                           for n, s in (("shapefirst stop=0.4 cond", 0.3),
                                                                        ("diffusers SDCFGCutoffCallback(0.4)", 0.25))))
    dest = tmp_path / "kept"
    peers.merge_study(run, dest)
    shutil.rmtree(run)
    text = mod.table(dest, 0.01)
    d = mean_ci(np.array(ours, float) - np.array(peer, float))
    assert ("| shapefirst stop=0.4 cond | diffusers SDCFGCutoffCallback(0.4) | "
            f"{d[0]:+.3f} [{d[1]:+.3f}, {d[2]:+.3f}] | "
            in text) and "30.0% / 25.0% (batch 1) |" in text
    assert "| diffusers SDCFGCutoffCallback(0.4) | - | 25.0% |" in text  # no batch-8 saving for a batch-1-only peer


def bench_module():
    spec = importlib.util.spec_from_file_location("peers_bench", ROOT / "benchmarks" / "peers.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_benchmark_runs_diffusers_transformer_caches_on_pixart_alone_and_under_the_stop(tmp_path):
    """--tcaches on a transformer pipeline: UNet-only peers (tgate, DeepCache, SD's callback) are left out, each
    cache runs alone and (where it composes) under the stop, with the stop's evaluations; MagCache calibrates its
    ratios once (diffusers' calibration) and reuses them."""
    import argparse

    from shapefirst.tiny import tiny_pixart_pipeline

    mod = bench_module()
    pipe = tiny_pixart_pipeline(folder=tmp_path)
    args = argparse.Namespace(guidance=4.5, steps=6, scheduler="ddim", levels=[0.5], after=["cond"], caches=[],
                              adaptive=[], shape=[], deepcache=[3],
                              tcaches=mod.kinds("faster,fbc,mag"), only=[], skip=[], ngms=[], deepcache_stops=[],
                              cache_dit=False)
    cfgs = {c.name: c for c in mod.configs(pipe, args)}
    assert not [n for n in cfgs if "T-GATE" in n or "DeepCache" in n or "Callback" in n or "image by image" in n]
    combos = [n for n in cfgs if "+ shapefirst" in n]
    assert combos == ["First Block Cache + shapefirst stop=0.5 cond"]  # FasterCache and MagCache do not compose
    assert {"FasterCache (diffusers)", "First Block Cache (diffusers)", "MagCache (diffusers)"} <= cfgs.keys()
    prompts = ["a red circle", "a blue square"]
    r = cfgs[combos[0]].run(pipe, prompts, 0, 6, "ddim")
    assert r.images.shape[0] == 2 and r.evaluations_per_image == [2 * 3 + 3] * 2
    mag = cfgs["MagCache (diffusers)"].run
    a, b = mag(pipe, prompts, 0, 6, "ddim"), mag(pipe, prompts, 0, 6, "ddim")
    assert np.array_equal(a.images, b.images) and a.evaluations_per_image == [12, 12]
    with pytest.raises(argparse.ArgumentTypeError, match="unknown transformer cache"):
        mod.kinds("fbc,deepcache")


def test_the_benchmark_runs_cache_dit_alone_and_under_the_stop_on_the_transformer_world():
    """--cache-dit on the shipped transformer world: cache-dit at its defaults alone and under the stop, with the
    stop's evaluations (the hook's), images differing from full guidance only where its cache skips."""
    import argparse

    from shapefirst.models import load_pipeline

    mod = bench_module()
    pipe = load_pipeline("embedded-dit")
    args = argparse.Namespace(guidance=3.0, steps=20, scheduler="ddim", levels=[0.5], after=["cond"], caches=[],
                              adaptive=[], shape=[], deepcache=[3], tcaches=[], only=["cache-dit"], skip=[],
                              ngms=[], deepcache_stops=[], cache_dit=True)
    cfgs = {c.name: c for c in mod.configs(pipe, args)}
    assert list(cfgs) == ["full", "cache-dit DBCache (cache-dit defaults)", "cache-dit + shapefirst stop=0.5 cond"]
    prompt = ["a large red striped circle on the left"]
    plain = mod.run_pipe(pipe, prompt, 0, 20, "ddim", 3.0)
    alone = cfgs["cache-dit DBCache (cache-dit defaults)"].run(pipe, prompt, 0, 20, "ddim")
    both = cfgs["cache-dit + shapefirst stop=0.5 cond"].run(pipe, prompt, 0, 20, "ddim")
    assert alone.evaluations_per_image == [40] and both.evaluations_per_image == [10 * 2 + 10]
    assert not np.array_equal(alone.images, plain.images) and not np.array_equal(both.images, alone.images)
    assert np.array_equal(mod.run_pipe(pipe, prompt, 0, 20, "ddim", 3.0).images, plain.images)  # restored


def test_the_benchmark_names_ngms_and_places_stops_under_deepcache_where_asked(tiny_pipe):
    """--ngms: AUTOMATIC1111's rule (every other call below the sigma, conditional branch); --deepcache-stops
    INTERVAL:STOP pairs, each stop a call the interval refreshes (others refused)."""
    import argparse

    from shapefirst.guidance import GuidanceSchedule

    mod = bench_module()
    args = argparse.Namespace(guidance=3.0, steps=20, scheduler="dpm++", levels=[0.5], after=["cond"], caches=[],
                              adaptive=[], shape=[], deepcache=[3, 5], tcaches=[], skip=[], ngms=[2.214],
                              deepcache_stops=mod.deepcache_stops("3:12,3:15,5:10"), cache_dit=False,
                              only=["NGMS", "+ DeepCache"])
    own = tiny_pipe.scheduler
    cfgs = {c.name: c for c in mod.configs(tiny_pipe, args)}
    assert tiny_pipe.scheduler is own  # Guidance Interval's calls are read without swapping the shared pipeline's
    assert [n for n in cfgs if "DeepCache" in n] == ["shapefirst stop_step=12 cond + DeepCache interval=3",
                                                      "shapefirst stop_step=15 cond + DeepCache interval=3",
                                                      "shapefirst stop_step=10 cond + DeepCache interval=5"]
    assert cfgs["A1111 NGMS sigma<=2.214 every other step (cond)"].schedule == GuidanceSchedule.a1111_ngms(3.0, 2.214)
    for bad in ("3:13", "5", "x:3"):
        with pytest.raises(argparse.ArgumentTypeError, match="INTERVAL:STOP"):
            mod.deepcache_stops(bad)


def test_the_end_to_end_line_times_the_base_and_pairs_quality_across_two_studies(tmp_path, tiny_pipe):
    """e2e: each configuration at its solver against full guidance at --base, both run here (time ratio per batch,
    the base against itself as the noise), quality paired per prompt from the two kept studies' judgments."""
    import argparse

    from shapefirst.guidance import GuidanceSchedule
    from shapefirst.sweep import Config

    mod = bench_module()
    base_acc, ours = [1, 1, 0, 1], [1, 0, 1, 1]
    base = run_folder(tmp_path / "base", {"full": base_acc})
    study = run_folder(tmp_path / "study", {"full": [1] * 4, "shapefirst stop=0.5 cond": ours})
    args = argparse.Namespace(base="ddim:4", base_study=base, dest=study, guidance=3.0, batch=2)
    cfgs = [Config("full", GuidanceSchedule(3.0), "dpm++", 2),
            Config("shapefirst stop=0.5 cond", GuidanceSchedule(3.0, stop=0.5, after="cond"), "dpm++", 2)]
    own = tiny_pipe.scheduler
    text = mod.end_to_end(tiny_pipe, ["a red circle", "a blue square", "a green star", "a red square"], cfgs, args)
    assert tiny_pipe.scheduler is own
    lines = text.splitlines()
    assert len(lines) == 4 and lines[2].startswith("| 2 dpm++ full | ")
    assert lines[3].startswith("| 2 dpm++ shapefirst stop=0.5 cond | ")
    assert "100.0% (base 75.0%) | +25.0 [" in lines[2]
    d = mean_ci(np.array(ours, float) - np.array(base_acc, float))
    assert f"75.0% (base 75.0%) | {100 * d[0]:+.1f} [{100 * d[1]:+.1f}, {100 * d[2]:+.1f}] (4) |" in lines[3]
    ratio, saved = (c.strip() for c in lines[3].split("|")[2:4])
    assert float(ratio) > 0 and saved == f"{1 - float(ratio):.1%}"  # a time, not asserted: a busy CI machine


def test_rows_of_one_rule_share_one_curve():
    """The Pareto plot draws one curve per method: NGMS at every sigma, cache-dit alone and under the stop."""
    assert {peers.method_of(f"A1111 NGMS sigma<={s} every other step (cond)") for s in (2.214, 4.2)} == \
        {"A1111 NGMS (every other call below its sigma)"}
    assert peers.method_of("cache-dit DBCache (cache-dit defaults)") == "cache-dit"
    assert peers.method_of("cache-dit + shapefirst stop=0.4 cond") == "shapefirst stop + cache-dit, cond after"
    assert peers.method_of("shapefirst stop_step=15 cond + DeepCache interval=3") == \
        "shapefirst stop + DeepCache, cond after"
