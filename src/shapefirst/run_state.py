"""The run state: what shapefirst's hooks share during ONE pipeline call (a run).

A run is one call of a pipeline that has a guidance schedule (shapefirst.session.Session finds it
from the call itself: shapefirst.pipeline_call). Its RunState is created at the run's first denoiser
call and read through its public fields by the guidance hook, the late caches, the ControlNet rows,
attention capture and the K/V intervention:
  pipe, frame           the pipeline and the frame of its running `__call__` (the run's identity)
  binding               what the pipeline had applied when the run began (schedule, recorder, late cache)
  schedule, recorder    the binding's schedule and trajectory recorder
  run                   the ordinal of this run among the pipeline's runs since its schedule was applied
  call                  index of the current (or next) denoiser call; n_calls: the run's calls
  batch                 images of the run
  cfg_now, guided       does the current call run CFG; bool per image (host): is it guided now
  layout                the current call's RowLayout (shapefirst.rows)
  late                  past the guided phase for every sample (one row per sample)
  may_stop_next         some sample is guided now and may be unguided from the next call
  evaluations, stop_calls  per image (host): rows through the denoiser; first unguided call (-1 never)
  stopped               adaptive stops per image, on the denoiser's device (None before any)
  shape_low, shape_streak  the shape criterion's state per image, on the denoiser's device
  kept                  per-run tensors of the cooperating hooks (a late cache's kept outputs), one slot per
                        hook (Session.new_slot): a new run starts with none, and two runs at once (threads,
                        pipelines sharing the denoiser) never see each other's
  first_late, deep_shallow, deep_recording  the DeepCache phase of the run (shapefirst.cache)
  step_seen, step_first, step_branch, step_out  a "separate" family's current step (shapefirst.separate)
Bookkeeping lives on the host and never reads a device value, except the adaptive criterion's
decision (one read per call, after `AdaptiveStop.decides_from`) and, for a pipeline detected by
structure, a check of its CFG batch once per run.
"""
from __future__ import annotations

import threading

import torch

from .errors import ShapefirstError
from .frequency import split_bands
from .noise_levels import run_noise_levels
from .pipeline_call import PipelineCall, calls_of_run, guidance_weight_of_call
from .rows import cfg_layout, plain_layout
from .schedules import AdaptiveStop
from .trace import predicted_x0
from .video_strip import unpack, unpack_video
from .families import SUPPORTED, family


class RunState:
    """One pipeline call's shared state (see the module docstring)."""

    def __init__(self, session, call: PipelineCall, binding, batch: int, ordinal: int):
        self.session, self.pipe, self.frame, self.binding = session, call.pipe, call.frame, binding
        self.pipeline_call = call
        self.schedule, self.recorder = binding.schedule, binding.recorder
        self.verify, self.run, self.thread = binding.verify, ordinal, threading.get_ident()
        self.n_calls = calls_of_run(call.pipe)
        self.sigmas = run_noise_levels(call.pipe.scheduler, self.n_calls) if self.schedule.uses_sigma else None
        self.call, self.batch, self.prepared = 0, batch, False
        self.cfg_now, self.cfg_pending, self.layout = None, None, None
        self.evaluations = torch.zeros(batch, dtype=torch.long)
        self.stop_calls = torch.full((batch,), -1, dtype=torch.long)
        self.stopped = self.shape_low = self.shape_streak = None
        self.guided = torch.ones(batch, dtype=torch.bool)
        self.late = self.may_stop_next = False
        self.kept: list = [None] * session.slots
        self.first_late, self.deep_shallow, self.deep_recording = None, False, False
        self.step_seen, self.step_first, self.step_branch, self.step_out = set(), None, None, None  # separate.py

    @property
    def done(self) -> bool:
        return self.n_calls is not None and self.call >= self.n_calls

    @property
    def row_sample(self) -> torch.Tensor:
        return self.layout.row_sample

    def guidance_weight(self) -> float:
        """w of this run: the pipeline's guidance scale (attribute, else its call's argument), else the schedule's."""
        return guidance_weight_of_call(self.pipeline_call, self.schedule.scale)

    def verify_cfg_batch(self, sample: torch.Tensor) -> None:
        """For a pipeline detected by its structure (models.family_by_structure), once per run: a CFG call
        must be [uncond, cond] of the same latents (two bitwise-equal halves: one host read per run)."""

        rows = sample.shape[0]
        if not getattr(self.pipe, "do_classifier_free_guidance", False):
            return
        if rows % 2 or not torch.equal(sample[:rows // 2], sample[rows // 2:]):
            raise ShapefirstError(f"{type(self.pipe).__name__} runs classifier-free guidance with a denoiser batch of "
                                  f"{rows} rows that is not [uncond, cond] of the same latents, which guidance "
                                  "schedules do not support",
                                  f"use a pipeline with diffusers' standard CFG batch, e.g. {SUPPORTED}")

    def guided_at(self, call: int) -> torch.Tensor:
        """Bool per image (host): is it guided at `call`? With adaptive stops this reads the device's
        stop flags once (the one device-to-host read of a call, only after `AdaptiveStop.decides_from`)."""
        k0, k = self.window()
        on = k0 <= call < k or (self.schedule.alternate and call >= k and call % 2 == 0)
        g = torch.full((self.batch,), on, dtype=torch.bool)
        ad = self.schedule.adaptive
        if ad is not None and self.stopped is not None and call > ad.decides_from and bool(g.any()):
            g &= ~self.stopped.cpu()
        return g

    def window(self) -> tuple[int, int]:
        """(k0, k): the run's first guided call and first unguided call (noise-level windows mapped through the
        run's own noise levels)."""
        n = self.n_calls if self.n_calls is not None else 10**9
        return self.schedule.first_guided_call(n, self.sigmas), self.schedule.first_unguided_call(n, self.sigmas)

    def _set_phase(self, guided: torch.Tensor) -> None:
        k0, k = self.window()
        if self.schedule.alternate:  # guided again at the next even call: never late
            k = self.n_calls if self.n_calls is not None else 10**9
        ad, some = self.schedule.adaptive, bool(guided.any())
        self.late = self.call >= k0 and not some
        self.may_stop_next = some and (self.call + 1 >= k or (ad is not None and self.call >= ad.decides_from))

    @torch.compiler.disable
    def prepare(self, sample: torch.Tensor, cfg: bool) -> None:
        """Begin the current denoiser call (idempotent until `finish`): guided images, layout, listeners."""
        if self.prepared:
            return
        rows = sample.shape[0]
        self.cfg_now = cfg
        if self.call == 0 and self.verify:
            self.verify_cfg_batch(sample)
        if cfg:
            self.guided = self.guided_at(self.call)
            self._set_phase(self.guided)
            key = (tuple(self.guided.tolist()), self.schedule.after, sample.device)
            make = lambda: cfg_layout(key[0], key[1], key[2])  # noqa: E731
        else:
            self.guided = torch.ones(rows, dtype=torch.bool)
            self.late = self.may_stop_next = False
            key = ("plain", rows, sample.device)
            make = lambda: plain_layout(rows, sample.device)  # noqa: E731
        self.layout, self.prepared = self.session.layout(key, make), True
        for listener in self.session.listeners:
            listener.on_call(self)

    @torch.compiler.disable
    def finish(self) -> None:
        """End the current denoiser call: count it, note first unguided calls."""
        if self.cfg_now:
            self.evaluations += torch.where(self.guided, 2, 1)
            newly = (self.stop_calls < 0) & ~self.guided
            self.stop_calls[newly] = self.call
        else:
            self.evaluations += 1
        self.call += 1
        self.prepared = False

    @torch.compiler.disable
    def settle(self, uncond: torch.Tensor, cond: torch.Tensor, x_t: torch.Tensor | None = None,
               timestep=None, weight: float | None = None) -> None:
        """Adaptive stops: flag (on the device) the guided samples that meet the criterion; effect from the next
        call. Cosine: their branches agree. Shape: the low band of x0-hat (from x_t, the call's latent input for
        one branch, the timestep, a tensor on the device, and the combined prediction u + weight (c - u)) has
        changed by less than the tolerance at `patience` calls in a row. Nothing is read back to the host."""
        ad = self.schedule.adaptive
        if ad is None or not bool(self.guided.any()):
            return
        if ad.criterion == "shape":
            settle = self._shape_settled(ad, uncond, cond, x_t, timestep, weight)
        elif self.call >= ad.min_call:
            settle = ad.settled(uncond.float(), cond.float())
        else:
            return
        if settle is None:
            return
        settle = settle & self.layout.guided.to(settle.device)
        self.stopped = settle if self.stopped is None else self.stopped | settle

    def _unpacked(self, x0: torch.Tensor) -> torch.Tensor:
        """Packed x0-hat [N, tokens, D] -> its spatial layout: LTX-Video's video tokens [N, C, F, h, w]
        (video_strip.unpack_video), else 2x2 patches [N, C, h, w] (Flux, Chroma, Bria, Qwen-Image)."""
        call = self.pipeline_call
        height, width = call.local("height"), call.local("width")
        if family(self.pipe).latent_layout == "packed_video":
            return unpack_video(self.pipe.vae, x0, height, width)
        return unpack(x0, height, width)

    def _shape_settled(self, ad: AdaptiveStop, uncond, cond, x_t, timestep, weight) -> torch.Tensor | None:
        """The shape criterion's per-call update (see settle); None before `min_call`."""
        if x_t is None or timestep is None or weight is None:
            raise ShapefirstError("the shape-settled adaptive stop needs the call's latent input, timestep and "
                                  "guidance weight", "call RunState.settle(uncond, cond, x_t, timestep, weight)")
        u = uncond.float()
        combined = u + float(weight) * (cond.float() - u)  # what the sampler follows (unguided rows: c - c == 0)
        x0 = predicted_x0(self.pipe.scheduler, timestep.to(u.device), x_t.float(), combined)
        if x0.dim() == 3:  # packed tokens: the band is spatial, so put them back in place first
            x0 = self._unpacked(x0)
        low = split_bands(x0, ad.radius)[0]
        prev, streak = self.shape_low, self.shape_streak
        if prev is None or prev.shape != low.shape or streak is None:
            streak = torch.zeros(low.shape[0], dtype=torch.long, device=low.device)
        else:
            streak = torch.where(ad.shape_change(low, prev) < ad.tolerance, streak + 1, 0)
        self.shape_low, self.shape_streak = low, streak
        return streak >= ad.patience if self.call >= ad.min_call else None
