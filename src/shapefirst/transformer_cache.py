"""diffusers' transformer caches on a diffusion-transformer pipeline that does not prepare them,
alone or under a shapefirst guidance schedule.

The caches (`diffusers.hooks`, as diffusers 0.42 ships them): FasterCache (Lv et al. 2024; it also
skips the unconditional branch), Pyramid Attention Broadcast (Zhao et al. 2024), First Block Cache
(ParaAttention), TaylorSeer (Liu et al. 2025) and MagCache (Ma et al. 2025). diffusers' cache-ready
pipelines (Flux, CogVideoX, ...) give them two things that PixArt's and SD3's pipelines in 0.42 do
not: a `cache_context` around every denoiser call (First Block Cache, TaylorSeer and
MagCache keep their state per context and refuse to run without one) and `pipe.current_timestep`
(FasterCache and Pyramid Attention Broadcast gate on it). Their transformer models are not
`CacheMixin` either, so `enable_cache` is missing. `transformer_cache(pipe, TransformerCache(...))`
applies the cache with diffusers' own `apply_*` function and supplies both with two plain torch
forward pre-hooks: one on the transformer records each call's timestep (FasterCache and PAB compare
it on the host, as they do in diffusers' own pipelines: one device read per call for those two), one
on the first transformer block opens the cache context for the call and starts every cache afresh
when a new run begins (the scheduler's `timesteps` is a new tensor) or the batch changes.

Under a guidance stop the denoiser batch drops from 2B rows to B, so a tensor cached from the guided
calls must not be reused: the caches that only look back a call or a few (First Block Cache, PAB,
TaylorSeer) start afresh at the stop and compose. Two refuse, with an error at the call where the
batch changes: FasterCache, because its denoiser hook splits every batch into [uncond, cond] halves
to skip the unconditional branch (after the stop there is one branch, so "FasterCache + stop" is
FasterCache alone), and MagCache, whose skip rule is indexed by the step (its `mag_ratios`), which a
restart at the stop would misalign. Both check the pipeline's guidance schedule at every call (host
attributes only) and refuse one that stops. On SD3, FasterCache and First Block Cache fail inside
diffusers 0.42 (UNSUPPORTED says why) and are refused up front.

    with transformer_cache(pipe, TransformerCache("fbc", threshold=0.1)):
        images = pipe(prompts).images
"""
from __future__ import annotations

import logging
import re
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from diffusers.hooks import HookRegistry

from .diffusers_shim import open_context, state_managers
from .errors import ShapefirstError
from .guidance_hook import session_of
from .pipeline import denoiser_of, latent_input, timestep_input, timestep_value

KINDS = ("faster", "pab", "fbc", "taylorseer", "mag")
NAMES = {"faster": "FasterCache", "pab": "Pyramid Attention Broadcast", "fbc": "First Block Cache",
         "taylorseer": "TaylorSeer", "mag": "MagCache"}
# defaults from diffusers' documentation examples for image models, with PixArt's module names
DEFAULTS = {
    "faster": {"spatial_attention_block_skip_range": 2, "spatial_attention_timestep_skip_range": (-1, 681),
               "low_frequency_weight_update_timestep_range": (99, 641),
               "high_frequency_weight_update_timestep_range": (-1, 301),
               "attention_weight_callback": 0.3, "tensor_format": "BCHW"},
    "pab": {"spatial_attention_block_skip_range": 2, "spatial_attention_timestep_skip_range": (100, 800)},
    "fbc": {"threshold": 0.05},
    # diffusers' default patterns are fullmatched against "transformer_blocks.N.attn": PixArt's are attn1/attn2
    "taylorseer": {"cache_interval": 5, "disable_cache_before_step": 3, "max_order": 1,
                   "taylor_factors_dtype": torch.float32, "cache_identifiers": [r"transformer_blocks\.\d+\.attn\d?"]},
    "mag": {"threshold": 0.06, "max_skip_steps": 3, "retention_ratio": 0.2},
}
# kind -> (diffusers.hooks config class, its apply function)
DIFFUSERS = {"faster": ("FasterCacheConfig", "apply_faster_cache"),
             "pab": ("PyramidAttentionBroadcastConfig", "apply_pyramid_attention_broadcast"),
             "fbc": ("FirstBlockCacheConfig", "apply_first_block_cache"),
             "taylorseer": ("TaylorSeerCacheConfig", "apply_taylorseer_cache"),
             "mag": ("MagCacheConfig", "apply_mag_cache")}
NEEDS_TIMESTEP = ("faster", "pab")
# (denoiser class, kind): why diffusers 0.42's cache fails on it (found on tiny pipelines,
# tests/test_transformer_cache.py)
UNSUPPORTED = {
    ("SD3Transformer2DModel", "faster"): "FasterCache does not split SD3's pooled_projections with the other "
                                         "[uncond, cond] inputs, so the time embedding's batch mismatches",
    ("SD3Transformer2DModel", "fbc"): "First Block Cache subtracts the text states of SD3's last joint block, "
                                      "which returns none (context_pre_only)",
}
ONE_BATCH = {"faster": "FasterCache skips the unconditional branch itself (its denoiser hook splits every batch "
                       "into [uncond, cond] halves, and after a stop there is one branch)",
             "mag": "MagCache's skip rule is indexed by the step (mag_ratios), which a restart at the stop would "
                    "misalign"}


@dataclass(frozen=True)
class TransformerCache:
    """One of diffusers' transformer caches. kind: faster | pab | fbc | taylorseer | mag; options:
    fields of its diffusers config over DEFAULTS (FasterCache's attention_weight_callback may be a number).
    MagCache needs `mag_ratios` measured on the same model and step count (calibrate_mag_ratios)."""

    kind: str
    options: dict = field(default_factory=dict)

    def __init__(self, kind: str, **options):
        if kind not in KINDS:
            raise ShapefirstError(f"unknown transformer cache {kind!r}", f"use one of: {', '.join(KINDS)}")
        if kind == "mag" and options.get("mag_ratios") is None and not options.get("calibrate"):
            raise ShapefirstError("MagCache needs mag_ratios measured on this model at this step count",
                                  "measure them with shapefirst.transformer_cache.calibrate_mag_ratios(pipe, run)")
        if kind == "mag" and options.get("mag_ratios") is not None:
            options.setdefault("num_inference_steps", len(options["mag_ratios"]))
        object.__setattr__(self, "kind", kind)
        object.__setattr__(self, "options", {**DEFAULTS[kind], **options})

    @property
    def label(self) -> str:
        keep = {k: v for k, v in self.options.items() if k not in DEFAULTS[self.kind] or DEFAULTS[self.kind][k] != v}
        return self.kind + "".join(f" {k}={v}" for k, v in keep.items() if k != "mag_ratios")

    def diffusers_config(self, timestep):
        """The diffusers config; `timestep` is a callable returning the current call's timestep."""
        from diffusers import hooks

        o = dict(self.options)
        if self.kind == "faster" and not callable(o.get("attention_weight_callback")):
            w = float(o["attention_weight_callback"])
            o["attention_weight_callback"] = lambda _module: w
        if self.kind in NEEDS_TIMESTEP:
            o["current_timestep_callback"] = timestep
        cls = getattr(hooks, DIFFUSERS[self.kind][0])
        try:
            return cls(**o)
        except (TypeError, ValueError) as e:
            raise ShapefirstError(f"bad {self.kind} cache option: {e}", f"see diffusers' {cls.__name__}") from None


def _apply(den, cache: TransformerCache, timestep) -> None:
    from diffusers import hooks

    getattr(hooks, DIFFUSERS[cache.kind][1])(den, cache.diffusers_config(timestep))


def _registries(den) -> list[tuple[torch.nn.Module, HookRegistry]]:
    return [(m, HookRegistry.check_if_exists_or_initialize(m)) for m in den.modules()]


def _hook_names(den) -> set[tuple[int, str]]:
    return {(id(m), name) for m, reg in _registries(den) for name in reg.hooks}


def _hooks_since(den, before: set) -> list[tuple[torch.nn.Module, HookRegistry, str]]:
    return [(m, reg, n) for m, reg in _registries(den) for n in list(reg.hooks) if (id(m), n) not in before]


class _Calls:
    """What the two pre-hooks share: the current timestep, and the cache hooks to start afresh."""

    def __init__(self, pipe, cache: TransformerCache):
        self.pipe, self.cache = pipe, cache
        self.added: list = []  # [(module, hook)] the cache's hooks
        self.managers: list = []
        self.timestep = None
        self.run_timesteps, self.rows = None, None
        self.calls = 0

    def bind(self, added: list) -> None:
        self.added = added
        self.managers = state_managers(h for _, h in added)

    def record_timestep(self, module, args, kwargs) -> None:
        self.timestep = timestep_input(args, kwargs)

    def refuse_a_stop(self) -> None:
        session = session_of(self.pipe)
        binding = session.binding_of(self.pipe) if session is not None else None
        if binding is not None and binding.schedule.stops:
            raise ShapefirstError(f"the {self.cache.kind} cache does not compose with a guidance schedule that "
                                  f"stops: {ONE_BATCH[self.cache.kind]}",
                                  f"run {self.cache.kind} alone, or use fbc, pab or taylorseer with the stop")

    def current_timestep(self) -> float:
        return timestep_value(self.timestep)

    def open_call(self, module, args, kwargs) -> None:
        rows = latent_input(args, kwargs).shape[0]
        ts = getattr(self.pipe.scheduler, "timesteps", None)
        if self.cache.kind in ONE_BATCH:
            self.refuse_a_stop()
        # FasterCache's own unconditional skip changes the batch it passes on: its hooks expect that
        if ts is not self.run_timesteps or (rows != self.rows and self.cache.kind not in ONE_BATCH):
            for m, h in self.added:
                h.reset_state(m)
            self.run_timesteps, self.rows = ts, rows
        open_context(self.managers)  # one batched [uncond, cond] call, as diffusers names it
        self.calls += 1


def _first_block(den) -> torch.nn.Module:
    blocks = getattr(den, "transformer_blocks", None)
    if not isinstance(blocks, torch.nn.ModuleList) or not len(blocks):
        raise ShapefirstError(f"transformer caches need a diffusion transformer with `transformer_blocks`; "
                              f"this pipeline's denoiser is a {type(den).__name__}",
                              "use them on PixArt or SD3 pipelines; for a UNet use shapefirst's late caches "
                              "(--cache) or the DeepCache package")
    return blocks[0]


@contextmanager
def transformer_cache(pipe, cache: TransformerCache):
    """Apply `cache` to the pipeline's transformer for the `with` block; on exit (also on an exception)
    every hook it added is removed and the transformer runs its plain forward again."""
    den = denoiser_of(pipe)
    first = _first_block(den)
    why = UNSUPPORTED.get((type(den).__name__, cache.kind))
    if why:
        raise ShapefirstError(f"the {cache.kind} cache does not run on {type(den).__name__} in diffusers 0.42: {why}",
                              "use pab, taylorseer or mag on this model")
    before = _hook_names(den)
    calls = _Calls(pipe, cache)
    handles = []
    try:
        _apply(den, cache, calls.current_timestep)
        calls.bind([(m, reg.hooks[n]) for m, reg, n in _hooks_since(den, before)])
        handles = [den.register_forward_pre_hook(calls.record_timestep, with_kwargs=True),
                   first.register_forward_pre_hook(calls.open_call, with_kwargs=True)]
        yield calls
    finally:
        for h in handles:
            h.remove()
        for _, reg, n in _hooks_since(den, before):
            reg.remove_hook(n, recurse=False)


class _RatiosLog(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.ratios: list[list[float]] = []

    def emit(self, record) -> None:
        m = re.search(r"MagCache Calibration Results: \[(.*)\]", record.getMessage())
        if m:
            self.ratios.append([float(x) for x in m.group(1).split(",") if x.strip()])


def calibrate_mag_ratios(pipe, run, steps: int) -> list[float]:
    """MagCache's calibration as diffusers ships it (calibrate=True: nothing skipped, the per-step
    magnitude ratios logged at the end of the run): `run()` makes one pipeline call of `steps` steps;
    returns the ratios diffusers logged (read from its logger), to pass as mag_ratios."""
    log = logging.getLogger("diffusers.hooks.mag_cache")
    handler, level = _RatiosLog(), log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        with transformer_cache(pipe, TransformerCache("mag", calibrate=True, num_inference_steps=steps)):
            run()
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
    if not handler.ratios or len(handler.ratios[-1]) != steps:
        raise ShapefirstError(f"MagCache calibration logged no ratios for a {steps}-step run",
                              f"make run() one pipeline call of {steps} steps")
    return handler.ratios[-1]
