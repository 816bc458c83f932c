"""One generation run: pipeline + guidance schedule (+ trajectory) -> images, counts, timings.

Image i of a run (prompt-major: prompt p, image j -> i = p * images_per_prompt + j) uses the
generator torch.Generator("cpu").manual_seed(seed + i), so any image can be regenerated alone:
generate(pipe, [prompt_p], seed=seed + i) gives image i again (up to batch-makeup rounding).
"""
from __future__ import annotations

import io
import numbers
import platform
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .cache import LateCache, late_cache
from .errors import ShapefirstError
from .families import family
from .pipeline_call import per_prompt_argument
from .guidance import GuidanceSchedule, guidance_schedule
from .models import scheduler_for
from .pipeline import call_defaults, embeds_call
from .results import atomic_write_bytes, atomic_write_text, png_bytes, strict_dumps
from .trace import Trajectory, TrajectoryRecorder
from .checks import out_path
from .checks import seed as check_seed
from .checks import within_training
from .outputs import OutputFolder
from .tokens import analyze_prompt

_warned_negative = False


def count_calls(pipe, steps: int) -> int:
    """Denoiser calls the pipeline's scheduler makes for `steps` steps (PNDM: 51 for 50). A flow-matching scheduler
    with dynamic shifting (CogView4's, Flux's) takes the pipeline's resolution-dependent shift `mu`, which moves the
    timesteps but not their number: any mu counts them."""
    sch = type(pipe.scheduler).from_config(pipe.scheduler.config)  # a fresh one: the pipeline's keeps its state
    sch.set_timesteps(steps, **({"mu": 0.0} if sch.config.get("use_dynamic_shifting") else {}))
    return len(sch.timesteps)


def check_prompts(prompts) -> list[str]:
    if isinstance(prompts, str):
        prompts = [prompts]
    if prompts is not None and not isinstance(prompts, (list, tuple)):
        raise ShapefirstError(f"prompts {_short(prompts)} ({type(prompts).__name__}) are not text",
                              'pass a prompt or a list of prompts, e.g. ["a red circle"]')
    prompts = list(prompts or [])
    if not prompts:
        raise ShapefirstError("no prompt was given", 'pass at least one prompt, e.g. "a red circle"')
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise ShapefirstError(f"prompt {p!r} is not text", "pass prompts as strings")
        if "\x00" in p or any(0xD800 <= ord(c) <= 0xDFFF for c in p):
            raise ShapefirstError(f"prompt {i + 1} holds a NUL byte or an unpaired surrogate (not text)",
                                  "pass the prompt as plain UTF-8 text")
    return prompts


def warn_truncated(pipe, prompts: list[str]) -> None:
    """One warning per prompt that the pipeline's first tokenizer truncates, showing the dropped words. A tokenizer
    that declares no length of its own (transformers' huge default model_max_length: Kolors' ChatGLM tokenizer, whose
    pipeline truncates at its max_sequence_length argument) has nothing to check here."""

    tok = getattr(pipe, "tokenizer", None)
    if tok is None or not isinstance(getattr(tok, "model_max_length", None), int) or tok.model_max_length > 10**6:
        return
    for i, p in enumerate(prompts):
        info = analyze_prompt(tok, p)
        if info.truncated:
            warnings.warn(f"prompt {i + 1} is longer than {len(info.ids)} tokens; the model will not see: "
                          f"{info.dropped_text!r}", stacklevel=3)


@dataclass
class GenerationResult:
    images: np.ndarray  # [N, H, W, 3] float in [0, 1]; a video pipeline's [N, frames, H, W, 3]
    prompts: list[str]  # one per image
    seeds: list[int]  # one per image
    evaluations_per_image: list[int]
    wall_seconds: float
    settings: dict = field(default_factory=dict)
    trajectory: Trajectory | None = None

    def pil(self):
        """One PIL image per image; a list of frames per video."""
        from PIL import Image

        def one(im):
            return Image.fromarray((np.clip(im, 0, 1) * 255).round().astype(np.uint8))
        return [[one(f) for f in im] if im.ndim == 4 else one(im) for im in self.images]

    def save(self, out: str | Path, vae=None, extra: dict | None = None, overwrite: bool = False,
             key: dict | None = None) -> Path:
        """Write one PNG per image, the trajectory (if any) and run.json into `out`, a folder that is
        new, empty, or holds an earlier `generate` output (replaced only with overwrite=True: its own
        files go, nothing else; see shapefirst.outputs). Everything is written into a staging folder
        first (where a full disk or any other failure strikes), then renamed into place, run.json
        last: a folder with run.json is complete, and a failed save leaves nothing new."""

        out = out_path(out, "out")
        created = not out.exists()
        # dry: an earlier output (overwrite) is removed only once the new one is written in full
        owner = OutputFolder(out, "generate", key, overwrite=overwrite, reuse=False).check(probe=False, dry=True)
        try:
            out.mkdir(parents=True, exist_ok=True)
            stage = Path(tempfile.mkdtemp(prefix=".stage-", dir=out))
        except OSError as e:
            raise ShapefirstError(f"cannot create or write the output folder {out} ({e.strerror or e})",
                                  "choose a writable --out folder") from e
        try:
            self._write(stage, vae, extra)
            owner.remove_own()  # the earlier output's own files (none in a new or empty folder)
            owner.claim(p.name for p in stage.iterdir())
            files = sorted((p for p in stage.rglob("*") if p.is_file()), key=lambda p: p.name == "run.json")
            for p in files:
                dest = out / p.relative_to(stage)
                dest.parent.mkdir(parents=True, exist_ok=True)
                p.replace(dest)
        except BaseException as e:  # a failed decode or Ctrl-C too: no staging folder is left behind
            shutil.rmtree(stage, ignore_errors=True)
            if created:
                shutil.rmtree(out, ignore_errors=True)
            if not isinstance(e, OSError):
                raise
            raise ShapefirstError(f"writing to {out} failed ({e.strerror or e})",
                                  "free disk space or choose another --out") from e
        shutil.rmtree(stage, ignore_errors=True)
        return out

    def _write(self, stage: Path, vae, extra: dict | None) -> None:
        names = []
        for i, im in enumerate(self.pil()):
            name = f"video_{i:03d}.webp" if isinstance(im, list) else f"image_{i:03d}.png"
            atomic_write_bytes(stage / name, webp_bytes(im) if isinstance(im, list) else png_bytes(im))
            names.append(name)
        if self.trajectory is not None:
            self.trajectory.save(stage / "trajectory")
            if vae is not None:
                self.trajectory.contact_sheet(vae, stage / "trajectory" / "contact_sheet.png")
                self.trajectory.gif(vae, stage / "trajectory" / "x0.gif")
        run = {**self.settings, "prompts_per_image": self.prompts, "seeds": self.seeds,
               "denoiser_evaluations_per_image": self.evaluations_per_image,
               "wall_seconds": self.wall_seconds, "images": names, **(extra or {}), "machine": machine_info()}
        atomic_write_text(stage / "run.json", strict_dumps(run, indent=2))


def webp_bytes(frames: list, fps: int = 8) -> bytes:
    """An animated, lossless WebP of the frames (Pillow), looping: a file any browser opens."""
    buf = io.BytesIO()
    frames[0].save(buf, format="WEBP", save_all=True, append_images=frames[1:], duration=1000 // fps, loop=0,
                   lossless=True)
    return buf.getvalue()


def machine_info() -> dict:
    import diffusers
    import transformers

    import os

    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__,
            "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def generate(pipe, prompts, schedule: GuidanceSchedule | None = None, steps: int = 50, seed: int = 0,
             images_per_prompt: int = 1, negative_prompt: str | list[str] | None = None,
             scheduler: str | None = None, trace: bool = False, progress: bool = False, cache: LateCache | None = None,
             batch: int | None = None, **pipe_kwargs) -> GenerationResult:
    """Generate with a guidance schedule; returns images, per-image denoiser evaluations and timing.
    `cache`: late-stage reuse after the stop (shapefirst.cache.LateCache).
    `batch`: at most this many images per pipeline call (more are run batch after batch, image i
    still seeded with seed + i); None = all in one call. With prompt_embeds the caller's tensors are one
    call (batch does not split them).

    Extra keyword arguments go to the pipeline (e.g. prompt_embeds=..., negative_prompt_embeds=...;
    pass prompts=None then, and the batch is taken from prompt_embeds)."""
    _check_pipe(pipe)
    schedule = GuidanceSchedule() if schedule is None else schedule
    embeds = "prompt_embeds" in pipe_kwargs and prompts is None
    prompts_list = ([f"<embeds {i}>" for i in range(pipe_kwargs["prompt_embeds"].shape[0])] if embeds
                    else check_prompts(prompts))
    n_prompts = len(prompts_list)
    _check_arguments(schedule, steps, seed, images_per_prompt, batch, cache, scheduler, trace, progress)
    _check_negative(negative_prompt, n_prompts)
    n = n_prompts * images_per_prompt
    if batch is not None and n > batch and "prompt_embeds" not in pipe_kwargs:
        if trace:
            raise ShapefirstError(f"a trajectory records one pipeline call, and {n} images need several of {batch}",
                                  f"pass at most {batch} images with --trace, or a larger --batch")
        return _in_batches(pipe, prompts_list, schedule, batch, images_per_prompt, negative_prompt, seed,
                           dict(steps=steps, scheduler=scheduler, progress=progress, cache=cache, **pipe_kwargs))
    with scheduler_for(pipe, scheduler):  # `scheduler` is this run's: the pipeline keeps its own
        return _one_call(pipe, prompts, prompts_list, schedule, steps, seed, images_per_prompt, negative_prompt,
                         scheduler, trace, progress, cache, pipe_kwargs)


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _integer(value, name: str, low: int, example: int) -> int:
    """An int (not a bool, a float or a string) >= low, else one ShapefirstError naming the argument."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ShapefirstError(f"{name}={_short(value)} ({type(value).__name__}) is not an integer >= {low}",
                              f"pass e.g. {name}={example}")
    return int(value)


def _check_pipe(pipe) -> None:
    if not callable(pipe) or not hasattr(pipe, "scheduler"):
        raise ShapefirstError(f"pipe {_short(pipe)} is not a diffusers pipeline",
                              'pass one, e.g. shapefirst.load_pipeline("embedded")')


def _check_arguments(schedule, steps, seed, images_per_prompt, batch, cache, scheduler, trace, progress) -> None:
    """generate()'s arguments, each checked at the call: a wrong type or value is one ShapefirstError
    naming it and the fix, never a TypeError from inside the pipeline."""

    if not isinstance(schedule, GuidanceSchedule):
        fix = f"GuidanceSchedule({schedule!r})" if isinstance(schedule, numbers.Real) else "GuidanceSchedule(7.5)"
        raise ShapefirstError(f"schedule={_short(schedule)} is not a GuidanceSchedule",
                              f"pass schedule={fix} (from shapefirst import GuidanceSchedule)")
    _integer(steps, "steps", 1, 50)
    n = _integer(images_per_prompt, "images_per_prompt", 1, 1)
    if batch is not None:
        _integer(batch, "batch", 1, 8)
    check_seed(_integer(seed, "seed", 0, 0), n)
    if cache is not None and not isinstance(cache, LateCache):
        raise ShapefirstError(f"cache={_short(cache)} is not a LateCache",
                              'pass e.g. cache=LateCache.parse("mean") (from shapefirst import LateCache), or None')
    if scheduler is not None and not isinstance(scheduler, str):
        raise ShapefirstError(f"scheduler={_short(scheduler)} is not a scheduler name", 'pass e.g. scheduler="ddim"')
    for name, flag in (("trace", trace), ("progress", progress)):
        if not isinstance(flag, (bool, np.bool_)):
            raise ShapefirstError(f"{name}={_short(flag)} is not True or False", f"pass {name}=True or {name}=False")


def _check_negative(negative_prompt, n_prompts: int) -> None:
    """None, one text for every prompt, or a list of texts, one per prompt."""
    if negative_prompt is None or isinstance(negative_prompt, str):
        return
    fix = f'pass one text (e.g. negative_prompt="blurry") or a list of {n_prompts} texts, one per prompt'
    if not isinstance(negative_prompt, (list, tuple)) or not all(isinstance(q, str) for q in negative_prompt):
        raise ShapefirstError(f"negative_prompt={_short(negative_prompt)} is not text", fix)
    if len(negative_prompt) != n_prompts:
        raise ShapefirstError(f"negative_prompt holds {len(negative_prompt)} texts for {n_prompts} prompts", fix)


def _one_call(pipe, prompts, prompts_list, schedule, steps, seed, images_per_prompt, negative_prompt, scheduler,
              trace, progress, cache, pipe_kwargs) -> GenerationResult:
    """One pipeline call of `generate` (its scheduler already set)."""
    n_prompts, n = len(prompts_list), len(prompts_list) * images_per_prompt
    n_calls = _prepare(pipe, steps, schedule, negative_prompt)
    if prompts is not None:
        warn_truncated(pipe, prompts_list)
        warn_empty(prompts_list, schedule, negative_prompt)
    gens = [torch.Generator("cpu").manual_seed(seed + i) for i in range(n)]
    recorder = TrajectoryRecorder() if trace else None
    fam = family(pipe)
    per_prompt = per_prompt_argument(pipe)
    text = _text_kwargs(prompts_list if prompts is not None else None, negative_prompt, n_prompts)
    given = {**pipe_kwargs, **text}
    defaults = call_defaults(pipe, given)
    if prompts is not None and isinstance(defaults.get("negative_prompt"), str):  # one per prompt, as a caller's
        defaults["negative_prompt"] = [defaults["negative_prompt"]] * n_prompts  # (EasyAnimate needs one each)
    kwargs = dict(num_inference_steps=steps, generator=gens, output_type="np", **{fam.scale_arg: schedule.scale},
                  **{per_prompt: images_per_prompt}, **pipe_kwargs, **defaults, **text)
    bar = _Progress(n_calls) if progress else None
    if bar is not None:
        kwargs["callback_on_step_end"] = bar
    with guidance_schedule(pipe, schedule, recorder) as hook, late_cache(pipe, cache):
        t0 = time.perf_counter()
        try:
            out = pipe(**kwargs)
            images = out.frames if fam.video else out.images  # videos: [N, frames, H, W, 3]
        finally:
            if bar is not None:
                bar.close()
        wall = time.perf_counter() - t0
    settings = {"steps": steps, "denoiser_calls": n_calls, "guidance": schedule.scale, "schedule": schedule.to_dict(),
                "cache": cache.to_dict() if cache is not None else None,
                "scheduler": scheduler or type(pipe.scheduler).__name__, "seed": seed,
                "images_per_prompt": images_per_prompt, "negative_prompt": negative_prompt, "prompts": prompts_list,
                "first_unguided_call_per_image": hook.stop_calls.tolist()
                if schedule.adaptive is not None or schedule.uses_sigma
                else [schedule.first_unguided_call(n_calls)] * n}
    per_image_prompts = [p for p in prompts_list for _ in range(images_per_prompt)]
    traj = recorder.trajectory if recorder is not None else None
    if traj is not None:
        traj.meta.update({"prompts": per_image_prompts, "schedule": schedule.to_dict()})
    return GenerationResult(np.asarray(images), per_image_prompts, [seed + i for i in range(n)],
                            hook.evaluations_per_image(), wall, settings, traj)


def _text_kwargs(prompts, negative_prompt, n_prompts: int) -> dict:
    out = {} if prompts is None else {"prompt": prompts}
    if negative_prompt is not None:
        out["negative_prompt"] = [negative_prompt] * n_prompts if isinstance(negative_prompt, str) else negative_prompt
    return out


def _prepare(pipe, steps: int, schedule: GuidanceSchedule, negative_prompt) -> int:
    """Check steps and the schedule against the run's real calls; return the calls."""
    global _warned_negative

    trained = pipe.scheduler.config.get("num_train_timesteps")
    within_training(steps, trained if isinstance(trained, int) else None, "steps")
    n_calls = count_calls(pipe, steps)
    # validates start/stop steps against the real number of calls
    if not schedule.uses_sigma and schedule.first_guided_call(n_calls) > schedule.first_unguided_call(n_calls):
        raise ShapefirstError(f"the guidance start (call {schedule.first_guided_call(n_calls)}) is after its stop "
                              f"(call {schedule.first_unguided_call(n_calls)})", "pass start <= stop")
    if negative_prompt and schedule.stops and schedule.after == "uncond" and not _warned_negative:
        warnings.warn("after='uncond' with a negative prompt: the unguided late calls follow the NEGATIVE prompt's "
                      "branch (the unconditional branch is the negative prompt's); "
                      "use after='cond' to follow the prompt",
                      stacklevel=3)
        _warned_negative = True
    return n_calls


def warn_empty(prompts: list[str], schedule: GuidanceSchedule, negative_prompt) -> None:
    """Guidance on an empty prompt with no negative prompt: both branches see the same (empty) text,
    so u + w (c - u) = u whatever w is: unconditional generation at twice the cost."""
    if schedule.scale <= 1 or negative_prompt:
        return
    empty = [i + 1 for i, p in enumerate(prompts) if not p.strip()]
    if empty:
        which = f"prompt {empty[0]} is" if len(empty) == 1 else f"prompts {', '.join(map(str, empty[:5]))} are"
        warnings.warn(f"{which} empty: this is unconditional generation, and guidance {schedule.scale:g} "
                      "cannot change "
                      "it (both branches see the same text) but doubles the work; pass --guidance 1 or a prompt",
                      stacklevel=3)


def _in_batches(pipe, prompts: list[str], schedule, batch: int, images_per_prompt: int, negative_prompt, seed: int,
                kwargs: dict) -> GenerationResult:
    """generate() for more than `batch` images: image i (prompt-major) is still seeded with seed + i."""
    per_image = [p for p in prompts for _ in range(images_per_prompt)]
    negs = None
    if negative_prompt is not None:
        negs = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
        negs = [q for q in negs for _ in range(images_per_prompt)]
    parts = [generate(pipe, per_image[c:c + batch], schedule, seed=seed + c,
                      negative_prompt=None if negs is None else negs[c:c + batch], **kwargs)
             for c in range(0, len(per_image), batch)]
    settings = {**parts[0].settings, "seed": seed, "images_per_prompt": images_per_prompt, "batch": batch,
                "prompts": prompts, "negative_prompt": negative_prompt,
                "first_unguided_call_per_image": [c for p in parts
                                                  for c in p.settings["first_unguided_call_per_image"]]}
    return GenerationResult(np.concatenate([p.images for p in parts]), per_image,
                            [seed + i for i in range(len(per_image))],
                            [e for p in parts for e in p.evaluations_per_image], sum(p.wall_seconds for p in parts),
                            settings)


def generate_embeds(pipe, cond: torch.Tensor, uncond: torch.Tensor, steps: int, seed: int,
                    schedule: GuidanceSchedule | None = None, infos: list | None = None) -> np.ndarray:
    """Images [N, H, W, 3] in [0, 1] for conditional / unconditional embeddings; image i uses seed + i.
    `infos`: the token infos of the prompts `cond` was made from (PixArt's attention masks need them)."""
    return generate(pipe, None, schedule, steps=steps, seed=seed, **embeds_call(pipe, cond, uncond, infos)).images


def batches(n: int, batch: int):
    """(start, end) of consecutive batches of at most `batch` out of n items."""
    if int(batch) != batch or batch < 1:
        raise ShapefirstError(f"batch {batch} is not a positive integer", "pass e.g. batch=8")
    for s in range(0, n, int(batch)):
        yield s, min(n, s + int(batch))


class _Progress:
    """A rich progress bar on stderr, driven by callback_on_step_end (it only reads)."""

    def __init__(self, total: int):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.p = Progress(TextColumn("denoising"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                          console=Console(stderr=True), transient=True)
        self.task = self.p.add_task("gen", total=total)
        self.p.start()

    def __call__(self, pipe, i, t, kwargs):
        self.p.update(self.task, completed=i + 1)
        return {}

    def close(self):
        self.p.stop()
