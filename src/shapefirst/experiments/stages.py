"""Generation stages: at which denoiser call is each attribute of the image decided?

At every denoiser call the pipeline's prediction of the clean image, x0-hat, is decoded with the
VAE and judged. An attribute has *settled* at call c when its judged value at every call >= c
equals its judged value at the last call (a sequence that never changes settles at 0; the answer
is at most n_calls - 1). The paper's claim, on the shapes world: the low-frequency attributes
(shape, color, position, size) settle in the first few calls, the high-frequency one (texture)
later.

Two ways to read an x0-hat:
- "judge" (default): a judge function (default: the shapes world's exact judge,
  `shapefirst.world.judge.judge`) gives labels per attribute. Labels are stored as integer
  codes: code k is `data["vocab"][attribute][k]`; -1 means "no label" (the judge found no
  object). "No label" is a value like any other for settling (an image whose object vanishes
  at the end settles where the vanishing starts for good).
- "clip" (real models, where no judge exists): the cosine similarity of the CLIP image
  embedding of the decoded x0-hat at each call with that of the final generated image. The image
  has settled at the first call from which the similarity stays >= `clip_threshold`
  (CLIP_SETTLE = 0.9) up to the last call; an image whose similarity is below the threshold at
  the last call never settles and gets n_calls.
  "both" does both.

The "final value" that a target is compared with is the judged value at the last call (the value
the settling call refers to); the judged labels of the pipeline's output images are stored too
(`output/...`) with their own match rate.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from ..errors import ShapefirstError
from ..families import family
from ..generate import check_prompts, generate
from ..guidance import GuidanceSchedule
from ..results import Result, save_figure
from ..settling import settled_from
from .registry import Analysis, Inputs, Settings, Summary
from ..world.prompts import world_prompts, world_renders  # noqa: F401 (re-exported for old imports)
from ..world.render import ATTRIBUTES, VALUES
from ..world.judge import judge as world_judge

CLIP_SETTLE = 0.9
"""CLIP mode: an image has settled once the cosine similarity of its x0-hat's CLIP embedding with
the final image's stays >= this value."""

NO_LABEL = -1
DECODE_CHUNK = 8
"""Denoiser calls decoded at once (bounds memory for large images)."""

MODES = ("judge", "clip", "both")


# -- pure settling functions ---------------------------------------------------------------
def settle_call(sequence: Sequence) -> int:
    """First index c such that sequence[c'] == sequence[-1] for every c' >= c (0 if constant)."""
    seq = list(sequence)
    if not seq:
        raise ValueError("settle_call needs a non-empty sequence")
    return int(settled_from(torch.tensor([x == seq[-1] for x in seq])))


def settle_calls(labels_per_call: Sequence[Sequence]) -> list[int]:
    """Settling call of each image: `labels_per_call[c][i]` is image i's label at call c."""
    rows = [list(r) for r in labels_per_call]
    if not rows:
        raise ValueError("settle_calls needs at least one call")
    n = len(rows[0])
    if any(len(r) != n for r in rows):
        raise ValueError("every call must have one label per image")
    return [settle_call([r[i] for r in rows]) for i in range(n)]


def settle_codes(codes: torch.Tensor) -> torch.Tensor:
    """Array version of settle_calls: codes [T, ...] (any comparable dtype) -> long [...]."""
    if codes.dim() < 1 or codes.shape[0] == 0:
        raise ValueError("codes must be [T, ...] with T >= 1")
    return settled_from(codes == codes[-1])


def settle_threshold(values: torch.Tensor, threshold: float = CLIP_SETTLE) -> torch.Tensor:
    """First call from which values [T, ...] stay >= threshold up to the last call, long [...];
    T where the last value is below the threshold (never settled)."""
    if values.dim() < 1 or values.shape[0] == 0:
        raise ValueError("values must be [T, ...] with T >= 1")
    return settled_from(values >= threshold)


def summarize(settle: torch.Tensor) -> dict:
    """Median, 10th/90th percentiles (linear interpolation) and mean of settling calls."""
    x = settle.detach().double().cpu().numpy().reshape(-1)
    p10, p50, p90 = np.percentile(x, [10, 50, 90])
    return {"median": float(p50), "p10": float(p10), "p90": float(p90), "mean": float(x.mean())}


# -- helpers -------------------------------------------------------------------------------
def decode_chunks(traj, vae, which: str = "x0", chunk: int = DECODE_CHUNK,
                  calls: Sequence[int] | None = None) -> Iterator[tuple[list[int], torch.Tensor]]:
    """Yield (calls, images [len(calls), N, 3, H, W] in [0, 1]) over a trajectory, a few calls at a time."""
    calls = list(range(traj.n_calls)) if calls is None else list(calls)
    for i in range(0, len(calls), chunk):
        part = calls[i:i + chunk]
        yield part, traj.decode(vae, which, part)


def _labels_of(out) -> tuple[dict, int | None]:
    """A judge's answer -> (labels dict, count or None). Accepts a Verdict-like object or a dict."""
    if hasattr(out, "labels"):
        return dict(out.labels or {}), getattr(out, "count", None)
    if isinstance(out, dict):
        return dict(out), None
    raise ShapefirstError(f"the judge returned {type(out).__name__}",
                          "return a Verdict (with .labels) or a dict of attribute -> label")


class _Codebook:
    """attribute -> list of values; known shapes-world values first, new ones appended."""

    def __init__(self, attributes):
        self.vocab = {a: list(VALUES.get(a, ())) for a in attributes}

    def code(self, attr: str, value) -> int:
        if value is None:
            return NO_LABEL
        vals = self.vocab[attr]
        value = str(value)
        if value not in vals:
            vals.append(value)
        return vals.index(value)


def _check_schedules(schedules) -> dict[str, GuidanceSchedule]:
    if schedules is None:
        return {"full": GuidanceSchedule(7.5)}
    if not isinstance(schedules, dict) or not schedules:
        raise ShapefirstError("schedules must be a non-empty dict of name -> GuidanceSchedule",
                              'pass e.g. {"full": GuidanceSchedule(7.5)}')
    out = {}
    for name, s in schedules.items():
        if not isinstance(name, str) or not name or "/" in name:
            raise ShapefirstError(f"schedule name {name!r} is not a plain name", "use names without '/', e.g. 'full'")
        out[name] = GuidanceSchedule.from_dict(s) if isinstance(s, dict) else s
        if not isinstance(out[name], GuidanceSchedule):
            raise ShapefirstError(f"schedule {name!r} is a {type(s).__name__}", "pass GuidanceSchedule objects")
    return out


# -- the experiment --------------------------------------------------------------------------
def run_stages(pipe, prompts, targets: list[dict] | None = None, steps: int = 50, seed: int = 0,
               schedules: dict | None = None, batch: int = 16, judge_fn: Callable | None = None, clip=None,
               progress: Callable[[int, int], None] | None = None, mode: str | None = None,
               attributes: Sequence[str] = ATTRIBUTES, clip_threshold: float = CLIP_SETTLE) -> Result:
    """Settling call of each attribute of each image, per guidance schedule -> Result(kind="stages").

    prompts: one image per prompt; image i uses seed + i (as in `generate`), generated in batches
    of `batch` prompts. targets: optional label dicts, one per prompt. schedules: name ->
    GuidanceSchedule (default {"full": GuidanceSchedule(7.5)}). mode: "judge", "clip" or "both";
    default "clip" when judge_fn is None and a `shapefirst.metrics.Clip` is given, else "judge"
    (judge_fn default: the shapes world's judge). progress(done_images, total_images) is called
    after each batch.

    Arrays (N images, T calls): `labels/<schedule>/<attribute>` int32 [T, N] codes per call,
    `count/<schedule>` int32 [T, N] (judged object count, -1 if the judge gives none),
    `settle/<schedule>/<attribute>` long [N], `output/<schedule>/<attribute>` int32 [N] (the
    output image's label), `match/<schedule>/<attribute>` int8 [N] (with targets; also
    `match/<schedule>/all`), `clip_sim/<schedule>` float32 [T, N] and `settle/<schedule>/clip`
    (clip modes), `timesteps/<schedule>` float64 [T].
    """
    check_pipeline(pipe)
    prompts, targets, mode = _check_inputs(prompts, targets, batch, mode, judge_fn, clip)
    use_judge, use_clip = mode in ("judge", "both"), mode in ("clip", "both")
    if use_judge and judge_fn is None:
        judge_fn = world_judge
    run = _Run(pipe, prompts, steps, seed, batch, list(attributes) if use_judge else [],
               judge_fn if use_judge else None, clip if use_clip else None, progress)
    schedules = _check_schedules(schedules)
    run.total = len(prompts) * len(schedules)
    arrays: dict[str, torch.Tensor] = {}
    per_schedule = {name: run.schedule(name, sch, targets, clip_threshold, arrays) for name, sch in schedules.items()}
    settings = {"steps": steps, "seed": seed, "n": len(prompts), "batch": batch, "mode": mode,
                "schedules": {k: s.to_dict() for k, s in schedules.items()}, "attributes": run.attributes,
                "clip_threshold": clip_threshold if use_clip else None, "prompts": prompts, "targets": targets,
                "pipeline": type(pipe).__name__, "scheduler": type(pipe.scheduler).__name__,
                "settle_definition": "first call c with value(c') == value(last call) for all c' >= c"
                                     + ("; clip: first call from which similarity to the final image stays >= "
                                        f"{clip_threshold} (n_calls = never)" if use_clip else "")}
    data = {"settings": settings, "vocab": run.book.vocab, "no_label_code": NO_LABEL, "schedules": per_schedule}
    return Result("stages", data, arrays)


def check_pipeline(pipe) -> None:
    """stages reads each call's decoded x0-hat as one image (the judge or CLIP): a video pipeline gets one line
    saying so and where its trajectory is drawn instead."""
    if family(pipe).video:
        raise ShapefirstError(f"stages judges each call's decoded x0-hat as one image, and {type(pipe).__name__} "
                              "makes videos",
                              "draw a video's trajectory with Trajectory.strip and Trajectory.animation, and its "
                              "bands in space and time with experiments.frequency.run_spacetime")


def _check_inputs(prompts, targets, batch, mode, judge_fn, clip):
    prompts = check_prompts(prompts)
    if int(batch) != batch or batch < 1:
        raise ShapefirstError(f"batch {batch} is not a positive integer", "pass e.g. 16")
    if targets is not None:
        targets = [dict(t) for t in targets]
        if len(targets) != len(prompts):
            raise ShapefirstError(f"{len(targets)} targets for {len(prompts)} prompts",
                                  "pass one label dict per prompt")
    if mode is None:
        mode = "clip" if (judge_fn is None and clip is not None) else "judge"
    if mode not in MODES:
        raise ShapefirstError(f"unknown stages mode {mode!r}", f"use one of {MODES}")
    if mode in ("clip", "both") and clip is None:
        raise ShapefirstError(f"mode {mode!r} needs a CLIP model", "pass clip=Clip.load(folder)")
    return prompts, targets, mode


class _Run:
    """One stages run: generates each schedule's traced batches and reads every call's decoded x0-hat
    with the judge (labels, object count) and/or CLIP (similarity to the final image)."""

    def __init__(self, pipe, prompts, steps, seed, batch, attributes, judge_fn, clip, progress):
        self.pipe, self.prompts, self.steps, self.seed, self.batch = pipe, prompts, steps, seed, batch
        self.attributes, self.judge_fn, self.clip, self.progress = attributes, judge_fn, clip, progress
        self.book = _Codebook(attributes)
        self.done, self.total = 0, 0

    def schedule(self, name, sch, targets, clip_threshold, arrays) -> dict:
        """Run every batch with schedule `sch`; fill arrays[.../name/...]; return its summary."""
        parts, timesteps = [], None
        for b0 in range(0, len(self.prompts), self.batch):
            res = generate(self.pipe, self.prompts[b0:b0 + self.batch], schedule=sch, steps=self.steps,
                           seed=self.seed + b0, trace=True)
            traj = res.trajectory
            if timesteps is None:
                timesteps = list(traj.timesteps)
            elif len(traj.timesteps) != len(timesteps):
                raise ShapefirstError("batches made different numbers of denoiser calls", "use a fixed scheduler")
            parts.append(self._read_batch(traj, res.images))
            self.done += len(res.images)
            if self.progress is not None:
                self.progress(self.done, self.total)
        joined = {k: torch.cat([p[k] for p in parts], 1) if parts[0][k].dim() == 2
                     else torch.cat([p[k] for p in parts])
                  for k in parts[0]}
        return self._summarize(name, joined, timesteps, targets, clip_threshold, arrays)

    def _read_batch(self, traj, images) -> dict[str, torch.Tensor]:
        """{"code/<attr>": int32 [T, n], "count": int32 [T, n], "out/<attr>": int32 [n], "sim": float32 [T, n]}."""
        t_calls, nb = traj.n_calls, len(images)
        got = {f"code/{a}": torch.full((t_calls, nb), NO_LABEL, dtype=torch.int32) for a in self.attributes}
        got["count"] = torch.full((t_calls, nb), -1, dtype=torch.int32)
        got["sim"] = torch.zeros((t_calls, nb), dtype=torch.float32)
        final_feat = self.clip.image_features(images) if self.clip is not None else None
        for calls, imgs in decode_chunks(traj, self.pipe.vae):
            hwc = imgs.permute(0, 1, 3, 4, 2).numpy()  # [k, N, H, W, 3] in [0, 1]
            if self.judge_fn is not None:
                self._judge_calls(calls, hwc, got)
            if self.clip is not None:
                feats = self.clip.image_features(hwc.reshape(-1, *hwc.shape[2:])).view(len(calls), nb, -1)
                got["sim"][calls] = (feats * final_feat[None]).sum(-1).float().cpu()
        for a in self.attributes:
            got[f"out/{a}"] = torch.tensor([self.book.code(a, self._labels(im)[0].get(a)) for im in images],
                                           dtype=torch.int32)
        return got

    def _labels(self, image):
        return _labels_of(self.judge_fn(image))

    def _judge_calls(self, calls, hwc, got) -> None:
        for j, c in enumerate(calls):
            for i in range(hwc.shape[1]):
                labels, count = self._labels(hwc[j, i])
                for a in self.attributes:
                    got[f"code/{a}"][c, i] = self.book.code(a, labels.get(a))
                if count is not None:
                    got["count"][c, i] = int(count)

    def _summarize(self, name, got, timesteps, targets, clip_threshold, arrays) -> dict:
        t_calls = len(timesteps)
        summary: dict = {"n_calls": t_calls, "timesteps": [float(t) for t in timesteps], "settle": {},
                         "final_match": None, "output_match": None}
        arrays[f"timesteps/{name}"] = torch.tensor(timesteps, dtype=torch.float64)
        if self.judge_fn is not None:
            arrays[f"count/{name}"] = got["count"]
            for a in self.attributes:
                arrays[f"labels/{name}/{a}"] = got[f"code/{a}"]
                arrays[f"settle/{name}/{a}"] = settle_codes(got[f"code/{a}"])
                arrays[f"output/{name}/{a}"] = got[f"out/{a}"]
                summary["settle"][a] = summarize(arrays[f"settle/{name}/{a}"])
            if targets is not None and self.attributes:
                self._matches(name, targets, arrays, summary)
        if self.clip is not None:
            arrays[f"clip_sim/{name}"] = got["sim"]
            arrays[f"settle/{name}/clip"] = settle_threshold(got["sim"], clip_threshold)
            summary["settle"]["clip"] = summarize(arrays[f"settle/{name}/clip"])
            summary["clip_never_settled"] = int((arrays[f"settle/{name}/clip"] >= t_calls).sum())
        return summary

    def _matches(self, name, targets, arrays, summary) -> None:
        """Share of images whose last x0-hat (final_match) and output (output_match) have the target label."""
        summary["final_match"], summary["output_match"] = {}, {}
        hits_all, out_all = [], []
        for a in self.attributes:
            want = torch.tensor([self.book.code(a, t[a]) if a in t else -2 for t in targets], dtype=torch.int32)
            known = torch.tensor([a in t for t in targets])
            hit = (arrays[f"labels/{name}/{a}"][-1] == want) | ~known
            out_hit = (arrays[f"output/{name}/{a}"] == want) | ~known
            arrays[f"match/{name}/{a}"] = hit.to(torch.int8)
            hits_all.append(hit)
            out_all.append(out_hit)
            if bool(known.any()):
                summary["final_match"][a] = float(hit[known].double().mean())
                summary["output_match"][a] = float(out_hit[known].double().mean())
        allhit = torch.stack(hits_all).all(0)
        arrays[f"match/{name}/all"] = allhit.to(torch.int8)
        summary["final_match"]["all"] = float(allhit.double().mean())
        summary["output_match"]["all"] = float(torch.stack(out_all).all(0).double().mean())


# -- plots ------------------------------------------------------------------------------------
def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)


def plot_stages(result: Result, folder: str | Path) -> list[Path]:
    """One PNG per schedule: cumulative share of images settled vs denoiser call, a line per attribute."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    folder = Path(folder)
    paths = []
    attrs = list(result.data["settings"]["attributes"]) + ["clip"]
    for name, summ in result.data["schedules"].items():
        t_calls = int(summ["n_calls"])
        fig = Figure(figsize=(6.4, 4.2), layout="constrained")
        ax = fig.add_subplot(111)
        calls = torch.arange(t_calls)
        n_img = 0
        styles = ["-", "--", "-.", ":"]
        for k, a in enumerate(a for a in attrs if f"settle/{name}/{a}" in result.arrays):
            key = f"settle/{name}/{a}"
            s = result.arrays[key].long()
            n_img = len(s)
            share = (s[None, :] <= calls[:, None]).double().mean(1).numpy()
            ax.step(calls.numpy(), share, where="post", ls=styles[k % len(styles)], lw=2.2 - 0.25 * k,
                    label=f"{a} (median {summ['settle'][a]['median']:g})")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("denoiser call")
        ax.set_ylabel("share of images settled")
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlim(0, max(t_calls - 1, 1))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
        ax.set_title(f"{name}: when each attribute settles ({n_img} images, {t_calls} calls)")
        paths.append(save_figure(fig, folder / f"stages_{_safe(name)}.png"))
    return paths


# -- the analysis: settings, run, summary (report + CLI) --------------------------------------
def findings(data: dict) -> list[str]:
    """Which attribute settles first and last, per schedule, and where texture falls (the paper:
    texture, the high-frequency attribute, after the low-frequency ones)."""
    out = []
    for name, summ in (data.get("schedules") or {}).items():
        med = {a: v["median"] for a, v in (summ.get("settle") or {}).items() if v.get("median") is not None}
        if len(med) < 2:
            continue
        first, last = min(med, key=med.get), max(med, key=med.get)
        sentence = (f"With {name} guidance, {first} settles first (median call {med[first]:.0f}) and {last} last "
                    f"(call {med[last]:.0f}) of {summ.get('n_calls')} calls")
        if "texture" in med:
            shape_like = [med[a] for a in ("shape", "color", "position", "size") if a in med]
            later = bool(shape_like) and med["texture"] > max(shape_like)
            sentence += ("; texture (high frequency) after every low-frequency attribute, as the paper reports"
                         if later else "; texture is not the last to settle here, against the paper")
        out.append(sentence + ".")
    return out


def _run(pipe, settings: Settings, inputs: Inputs) -> Result:
    ps, targets = inputs.prompts_and_targets(settings.n, settings.seed)
    if not inputs.world and inputs.clip is None:
        raise ShapefirstError("stages on a model other than the shapes world needs a CLIP scorer",
                              "pass --clip PATH (a local CLIP model folder)")
    w = settings.guidance
    schedules = {"full": GuidanceSchedule(w), "stop 0.5 uncond": GuidanceSchedule(w, stop=0.5)}
    return run_stages(pipe, ps, targets, steps=settings.steps, seed=settings.seed, schedules=schedules,
                      batch=settings.batch, clip=inputs.clip, mode="judge" if inputs.world else "clip")


def summary(result: Result) -> Summary:
    rows = [["schedule", "attribute", "median settling call", "10th-90th percentile", "calls"]]
    for sname, summ in result.data["schedules"].items():
        for a, v in summ["settle"].items():
            rows.append([sname, a, f"{v['median']:.0f}", f"{v['p10']:.0f}-{v['p90']:.0f}", summ["n_calls"]])
    found = findings(result.data)
    return Summary("When each attribute is decided",
                   "Share of images whose judged attribute (from the decoded x0-hat) has reached its final value by "
                   "each call. " + " ".join(found), rows, found, ("stages_*.png",))


ANALYSIS = Analysis("stages", _run, summary, plot_stages, order=10, needs=("prompts", "clip"))
