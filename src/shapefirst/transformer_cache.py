"""diffusers' transformer caches on a diffusion-transformer pipeline, alone or under a shapefirst guidance
schedule: on pipelines with batched CFG (PixArt, SD3, Sana, HunyuanDiT, CogVideoX) and on those that call the
transformer once per branch (Wan 2.1/2.2, Flux with true CFG, Qwen-Image, Lumina 2, CogView4, Chroma,
HunyuanVideo), whether the pipeline prepares them or not.

The caches (`diffusers.hooks`, as diffusers 0.42 ships them): FasterCache (Lv et al. 2024; it also
skips the unconditional branch), Pyramid Attention Broadcast (Zhao et al. 2024), First Block Cache
(ParaAttention), TaylorSeer (Liu et al. 2025) and MagCache (Ma et al. 2025). diffusers' cache-ready
pipelines (Flux, Wan, CogVideoX, ...) give them two things that PixArt's and SD3's pipelines in 0.42 do
not: a `cache_context` around every denoiser call (First Block Cache, TaylorSeer and MagCache keep their
state per context and refuse to run without one) and `pipe.current_timestep` (FasterCache and Pyramid
Attention Broadcast gate on it). `transformer_cache(pipe, TransformerCache(...))` applies the cache with
diffusers' own `apply_*` function to every transformer of the pipeline (Wan 2.2: both experts) and adds
two plain torch forward pre-hooks per transformer: one records each call's timestep (FasterCache and PAB
compare it on the host, as in diffusers' own pipelines: one device read per call for those two), one on
the first transformer block opens a cache context for the call where the pipeline opened none (one
batched [uncond, cond] call; on a pipeline that calls the transformer once per branch without contexts of
its own, Lumina 2 and Chroma, the call's branch, "cond" or "uncond", told by the family's branch argument
as shapefirst.separate tells it; a pipeline's own "cond"/"uncond" contexts are left as they are) and starts
every cache afresh when a new run begins (the scheduler's `timesteps` is a new tensor) or the rows a
context computes change.

Blocks: First Block Cache and MagCache take the blocks of a transformer's child ModuleLists named as in
BLOCK_LISTS (diffusers' own list; Lumina 2's refiners run before its `layers` and are never cached) and read
each block's outputs through diffusers' own block metadata (read only); a block class diffusers 0.42 has none
for (Sana's, HunyuanDiT's, Lumina 2's and Chroma's blocks) is refused for them in one line, TaylorSeer (and PAB on
batched CFG) still runs there. First Block Cache needs two blocks (a head and a tail) that return the same
layout.

Under a guidance stop (`conflict` has the rules):
- batched CFG: the batch drops from 2B rows to B, so the caches that only look back a call or a few
  (First Block Cache, PAB, TaylorSeer) start afresh at the stop and compose. FasterCache refuses, because
  its denoiser hook splits every batch into [uncond, cond] halves to skip the unconditional branch (after
  the stop there is one branch, so "FasterCache + stop" is FasterCache alone), and so does MagCache, whose
  skip rule is indexed by the step (its `mag_ratios`), which a restart at the stop would misalign.
- one call per branch: the pipeline's "cond" context keeps computing the conditional branch on every row
  and the "uncond" context simply ends at the stop (shapefirst does not make that call), so each context's
  state stays one branch's, in step order: First Block Cache, TaylorSeer and MagCache compose with a stop
  that keeps the conditional branch (after="cond"). after="uncond" is refused (the pipeline's first, "cond"
  context would compute the unconditional branch from the stop on, mixing branches in one state); MagCache
  also refuses schedules under which the unconditional branch does not run from the first step without
  gaps (a late start, alternate, per-image adaptive stops: its ratios are indexed by the calls a state has
  seen), and TaylorSeer refuses `alternate` (its Taylor expansion counts calls as equally spaced steps).
  FasterCache and PAB are refused on these pipelines altogether: both keep one state per layer rather than
  per branch context (PAB's unconditional call would reuse the conditional call's attention; FasterCache
  splits a one-branch batch into halves).
Each refusal is checked at every call (host attributes only). On SD3, FasterCache and First Block Cache
fail inside diffusers 0.42, and FasterCache on HunyuanDiT (UNSUPPORTED says why): refused up front.
MagCache on Wan 2.2 takes one `mag_ratios` list per expert (each expert runs part of the steps;
calibrate_mag_ratios measures them).

    with transformer_cache(pipe, TransformerCache("fbc", threshold=0.1)):
        images = pipe(prompts).images
"""
from __future__ import annotations

import logging
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial

import torch
from diffusers.hooks import HookRegistry

from .diffusers_shim import block_outputs, current_context, open_context, set_context, state_managers
from .errors import ShapefirstError
from .families import Family, family
from .guidance_hook import denoisers_of, session_of
from .pipeline import latent_input, timestep_input, timestep_value
from .pipeline_call import running_call
from .separate import branch_of

KINDS = ("faster", "pab", "fbc", "taylorseer", "mag")
NAMES = {"faster": "FasterCache", "pab": "Pyramid Attention Broadcast", "fbc": "First Block Cache",
         "taylorseer": "TaylorSeer", "mag": "MagCache"}
# defaults from diffusers' documentation examples for image models, with the attention module names of PixArt,
# SD3, Flux (transformer_blocks.N.attn[12], single_transformer_blocks.N.attn), Wan and HunyuanDiT
# (blocks.N.attn1/attn2) and Lumina 2 (layers.N.attn: its noise_refiner/context_refiner are not cached)
DEFAULTS = {
    "faster": {"spatial_attention_block_skip_range": 2, "spatial_attention_timestep_skip_range": (-1, 681),
               "low_frequency_weight_update_timestep_range": (99, 641),
               "high_frequency_weight_update_timestep_range": (-1, 301),
               "attention_weight_callback": 0.3, "tensor_format": "BCHW"},
    "pab": {"spatial_attention_block_skip_range": 2, "spatial_attention_timestep_skip_range": (100, 800)},
    "fbc": {"threshold": 0.05},
    # diffusers' default patterns are fullmatched against "transformer_blocks.N.attn": PixArt's are attn1/attn2
    "taylorseer": {"cache_interval": 5, "disable_cache_before_step": 3, "max_order": 1,
                   "taylor_factors_dtype": torch.float32,
                   "cache_identifiers": [
                       r"(single_transformer_blocks|transformer_blocks|blocks|layers)\.\d+\.attn\d?"]},
    "mag": {"threshold": 0.06, "max_skip_steps": 3, "retention_ratio": 0.2},
}
# kind -> (diffusers.hooks config class, its apply function)
DIFFUSERS = {"faster": ("FasterCacheConfig", "apply_faster_cache"),
             "pab": ("PyramidAttentionBroadcastConfig", "apply_pyramid_attention_broadcast"),
             "fbc": ("FirstBlockCacheConfig", "apply_first_block_cache"),
             "taylorseer": ("TaylorSeerCacheConfig", "apply_taylorseer_cache"),
             "mag": ("MagCacheConfig", "apply_mag_cache")}
NEEDS_TIMESTEP = ("faster", "pab")
BLOCK_KINDS = ("fbc", "mag")  # the caches that skip whole blocks, reading their outputs through block metadata
# the child ModuleLists diffusers 0.42's block caches take as a transformer's blocks, in the order they are
# registered (= run: transformer_blocks before single_transformer_blocks), as diffusers.hooks._common names them
BLOCK_LISTS = ("blocks", "transformer_blocks", "single_transformer_blocks", "layers", "visual_transformer_blocks",
               "temporal_transformer_blocks")
# (denoiser class, kind): why diffusers 0.42's cache fails on it (found on tiny pipelines,
# tests/test_transformer_cache.py)
UNSUPPORTED = {
    ("SD3Transformer2DModel", "faster"): "FasterCache does not split SD3's pooled_projections with the other "
                                         "[uncond, cond] inputs, so the time embedding's batch mismatches",
    ("SD3Transformer2DModel", "fbc"): "First Block Cache subtracts the text states of SD3's last joint block, "
                                      "which returns none (context_pre_only)",
    ("HunyuanDiT2DModel", "faster"): "FasterCache does not split HunyuanDiT's image_meta_size, style, text masks "
                                     "and T5 states with the other [uncond, cond] inputs, so the time embedding's "
                                     "batch mismatches",
    ("CogView3PlusTransformer2DModel", "faster"): "FasterCache does not split CogView3Plus's original_size, "
                                                  "target_size and crop_coords with the other [uncond, cond] "
                                                  "inputs, so the time embedding's batch mismatches",
    ("LatteTransformer3DModel", "fbc"): "Latte's spatial and temporal blocks see the video reshaped differently "
                                        "(rows x frames, then rows x patches), so First Block Cache's first-block "
                                        "residual and its tail do not line up",
    ("LatteTransformer3DModel", "mag"): "Latte's spatial and temporal blocks see the video reshaped differently "
                                        "(rows x frames, then rows x patches), so MagCache's block residuals do not "
                                        "line up",
    ("BriaTransformer2DModel", "faster"): "FasterCache splits every tensor argument into batch halves, and Bria's "
                                          "positional ids are [tokens, 3] for every row",
}
ONE_BATCH = {"faster": "FasterCache skips the unconditional branch itself (its denoiser hook splits every batch "
                       "into [uncond, cond] halves, and after a stop there is one branch)",
             "mag": "MagCache's skip rule is indexed by the step (mag_ratios), which a restart at the stop would "
                    "misalign"}
# kinds refused on a pipeline that calls the transformer once per branch, and why
PER_LAYER = {"faster": "FasterCache splits every transformer call's batch into [uncond, cond] halves and keeps one "
                       "state per layer",
             "pab": "Pyramid Attention Broadcast keeps one state per attention layer, not per branch, so the "
                    "unconditional call would reuse the conditional call's attention"}


@dataclass(frozen=True)
class TransformerCache:
    """One of diffusers' transformer caches. kind: faster | pab | fbc | taylorseer | mag; options:
    fields of its diffusers config over DEFAULTS (FasterCache's attention_weight_callback may be a number).
    MagCache needs `mag_ratios` measured on the same model and step count (calibrate_mag_ratios): one list,
    or one list per transformer on a pipeline with several (Wan 2.2's two experts)."""

    kind: str
    options: dict = field(default_factory=dict)

    def __init__(self, kind: str, **options):
        if kind not in KINDS:
            raise ShapefirstError(f"unknown transformer cache {kind!r}", f"use one of: {', '.join(KINDS)}")
        if kind == "mag" and options.get("mag_ratios") is None and not options.get("calibrate"):
            raise ShapefirstError("MagCache needs mag_ratios measured on this model at this step count",
                                  "measure them with shapefirst.transformer_cache.calibrate_mag_ratios(pipe, run)")
        object.__setattr__(self, "kind", kind)
        object.__setattr__(self, "options", {**DEFAULTS[kind], **options})

    @property
    def label(self) -> str:
        keep = {k: v for k, v in self.options.items() if k not in DEFAULTS[self.kind] or DEFAULTS[self.kind][k] != v}
        return self.kind + "".join(f" {k}={v}" for k, v in keep.items() if k != "mag_ratios")

    def per_denoiser(self, n: int) -> list[dict]:
        """The options for each of a pipeline's `n` transformers: MagCache's ratios split per transformer (one
        list each; a single list for a single transformer), its num_inference_steps from their length."""
        if self.kind != "mag" or self.options.get("mag_ratios") is None:
            return [dict(self.options) for _ in range(n)]
        raw = self.options["mag_ratios"]
        nested = raw.dim() > 1 if isinstance(raw, torch.Tensor) else \
            bool(len(raw)) and isinstance(raw[0], (list, tuple, torch.Tensor))
        per = list(raw) if nested else [raw]
        if len(per) != n:
            raise ShapefirstError(f"MagCache got {len(per)} mag_ratios list(s) for a pipeline with {n} transformers "
                                  "(each runs its own share of the steps)",
                                  "pass one list per transformer, as calibrate_mag_ratios(pipe, run, steps) returns")
        return [{**self.options, "mag_ratios": [float(x) for x in r], "num_inference_steps": len(r)} for r in per]

    def diffusers_config(self, timestep, options: dict | None = None):
        """The diffusers config; `timestep` is a callable returning the current call's timestep."""
        from diffusers import hooks

        o = dict(self.options if options is None else options)
        if self.kind == "mag" and o.get("mag_ratios") is not None:
            o.setdefault("num_inference_steps", len(o["mag_ratios"]))
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


def _late_start(schedule) -> bool:
    return bool(schedule.start) or bool(schedule.start_step) or schedule.start_sigma is not None


def conflict(kind: str, separate: bool, schedule) -> str | None:
    """Why cache `kind` cannot run under `schedule` (a shapefirst GuidanceSchedule, or None), on a pipeline
    with batched CFG or (separate) one transformer call per branch; None when it composes."""
    if schedule is None or not schedule.stops:
        return None
    if not separate:
        return ONE_BATCH.get(kind)
    if schedule.after != "cond":
        return ("after='uncond': from the stop on, the pipeline's first call of each step (its 'cond' cache "
                "context) computes the unconditional branch, so one cache state would mix both branches")
    if kind == "mag" and (_late_start(schedule) or schedule.alternate or schedule.adaptive is not None):
        return ("MagCache indexes its mag_ratios by the calls each branch's state has seen, so the unconditional "
                "branch must run from the first step without gaps (no late start, alternate or adaptive stop)")
    if kind == "taylorseer" and schedule.alternate:
        return ("TaylorSeer's expansion counts a state's calls as equally spaced steps, and alternate makes the "
                "unconditional branch skip every other step after the stop")
    return None


FIXES = {False: "run {kind} alone, or use fbc, pab or taylorseer with the stop",
         True: "keep the conditional branch after a plain stop (GuidanceSchedule(w, stop=..., after='cond')), "
               "or run {kind} alone"}


def _apply(den, cache: TransformerCache, timestep, options: dict) -> None:
    from diffusers import hooks

    getattr(hooks, DIFFUSERS[cache.kind][1])(den, cache.diffusers_config(timestep, options))
    HookRegistry.check_if_exists_or_initialize(den).invalidate_child_registries_cache()


def _registries(den) -> list[tuple[torch.nn.Module, HookRegistry]]:
    return [(m, HookRegistry.check_if_exists_or_initialize(m)) for m in den.modules()]


def _hook_names(den) -> set[tuple[int, str]]:
    return {(id(m), name) for m, reg in _registries(den) for name in reg.hooks}


def _hooks_since(den, before: set) -> list[tuple[torch.nn.Module, HookRegistry, str]]:
    return [(m, reg, n) for m, reg in _registries(den) for n in list(reg.hooks) if (id(m), n) not in before]


@dataclass
class _Part:
    """One transformer of the pipeline and the cache hooks applied to it."""

    den: torch.nn.Module
    added: list  # [(module, hook)]
    managers: list


class _Calls:
    """What the pre-hooks share: the current timestep, each transformer's cache hooks to start afresh, the
    context shapefirst opened last, and the rows each context computed last."""

    def __init__(self, pipe, cache: TransformerCache, fam: Family):
        self.pipe, self.cache, self.fam, self.separate = pipe, cache, fam, fam.cfg == "separate"
        self.parts: list[_Part] = []
        self.timestep, self.given = None, {}
        self.run_timesteps, self.rows, self.opened = None, {}, None
        self.calls = 0
        self.current = None  # the index of the transformer running now

    @property
    def added(self) -> list:
        """[(module, hook)] every cache hook applied, over all transformers."""
        return [a for part in self.parts for a in part.added]

    def bind(self, den, added: list) -> None:
        self.parts.append(_Part(den, added, state_managers(h for _, h in added)))

    def record_timestep(self, index: int, module, args, kwargs) -> None:
        self.timestep, self.current = timestep_input(args, kwargs), index
        if self.separate:  # the argument that tells the call's branch (shapefirst.separate.branch_of)
            arg = self.fam.branches[0][0]
            self.given = {arg: kwargs.get(arg)}

    def context_name(self) -> str:
        """The cache context of a call the pipeline opened none for: one batched [uncond, cond] call, or on a
        pipeline that calls the transformer once per branch, that branch ("cond" / "uncond": the pipeline call's
        embeddings it was given); outside a pipeline call, one context."""
        call = running_call() if self.separate else None
        return "cond_uncond" if call is None else branch_of(self.fam, call, self.given)

    def refuse_a_conflict(self) -> None:
        session = session_of(self.pipe)
        binding = session.binding_of(self.pipe) if session is not None else None
        why = conflict(self.cache.kind, self.separate, binding.schedule if binding is not None else None)
        if why:
            raise ShapefirstError(f"the {self.cache.kind} cache does not compose with a guidance schedule that "
                                  f"stops: {why}", FIXES[self.separate].format(kind=self.cache.kind))

    def current_timestep(self) -> float:
        return timestep_value(self.timestep)

    def reset(self) -> None:
        for part in self.parts:
            for m, h in part.added:
                h.reset_state(m)
        self.rows = {}

    def open_call(self, part: _Part, module, args, kwargs) -> None:
        rows = latent_input(args, kwargs).shape[0]
        self.refuse_a_conflict()
        ts = getattr(self.pipe.scheduler, "timesteps", None)
        own = current_context(part.managers)
        mine = own is None or own is self.opened
        name = self.context_name() if mine else own.name
        key = (id(part.den), name)
        if ts is not self.run_timesteps:
            self.reset()
            self.run_timesteps = ts
        # FasterCache's own unconditional skip changes the batch it passes on: its hooks expect that
        elif self.rows.get(key, rows) != rows and self.cache.kind not in ONE_BATCH:
            self.reset()
        self.rows[key] = rows
        if mine:  # one batched [uncond, cond] call, as diffusers names it, or the call's branch
            self.opened = open_context(part.managers, name)
        else:  # the pipeline's own context (a reset above cleared it)
            set_context(part.managers, own)
        self.calls += 1


def _blocks(den) -> list[torch.nn.Module]:
    """The transformer's blocks as diffusers' block caches take them (BLOCK_LISTS), in the order they run."""
    return [b for name, m in den.named_children() if name in BLOCK_LISTS and isinstance(m, torch.nn.ModuleList)
            for b in m]


def _first_block(den) -> torch.nn.Module:
    blocks = _blocks(den)
    if blocks:
        return blocks[0]
    raise ShapefirstError(f"transformer caches need a diffusion transformer with `transformer_blocks`, `blocks` or "
                          f"another of diffusers' block lists ({', '.join(BLOCK_LISTS)}); this pipeline's denoiser "
                          f"is a {type(den).__name__}",
                          "use them on a diffusion-transformer pipeline; for a UNet use shapefirst's late caches "
                          "(--cache) or the DeepCache package")


def _block_layouts(den, kind: str) -> list[tuple[int, int | None]]:
    """Where each block of the transformer returns its outputs (diffusers' own block metadata, read only: shapefirst
    does not add to diffusers' registry); a block class diffusers has none for is refused."""
    layouts = []
    for block in _blocks(den):
        cls = type(block)
        layout = block_outputs(cls)
        if layout is None:
            raise ShapefirstError(f"the {kind} cache skips whole blocks and reads their outputs through diffusers' "
                                  f"block metadata, which diffusers 0.42 has none for on {cls.__name__} "
                                  f"({type(den).__name__})", "use taylorseer (or pab on batched CFG) on this model")
        layouts.append(layout)
    return layouts


def _check_blocks(den, kind: str) -> None:
    """First Block Cache and MagCache: every block's output layout known; First Block Cache also needs a head and
    a tail block returning the same layout (it subtracts the head's outputs from the tail's)."""
    layouts = _block_layouts(den, kind)
    if kind != "fbc":
        return
    name = type(den).__name__
    if len(layouts) < 2:
        raise ShapefirstError(f"First Block Cache needs two transformer blocks (a head whose residual decides and "
                              f"a tail whose residual is reused); this {name} has {len(layouts)}",
                              "use taylorseer or mag on this model")
    if (layouts[0][1] is None) != (layouts[-1][1] is None):
        raise ShapefirstError(f"First Block Cache subtracts the first block's outputs from the last block's, but "
                              f"{name}'s first block returns {_layout(layouts[0])} and its last "
                              f"{_layout(layouts[-1])}", "use taylorseer or mag on this model")


def _layout(layout: tuple[int, int | None]) -> str:
    return "one tensor (a joint text+image stream)" if layout[1] is None else "image and text states apart"


def _check(pipe, dens: list, cache: TransformerCache, separate: bool) -> None:
    for den in dens:
        _first_block(den)
        if cache.kind in BLOCK_KINDS:
            _check_blocks(den, cache.kind)
        why = UNSUPPORTED.get((type(den).__name__, cache.kind))
        if why:
            raise ShapefirstError(f"the {cache.kind} cache does not run on {type(den).__name__} in diffusers 0.42: "
                                  f"{why}", "use pab, taylorseer or mag on this model")
        if getattr(den, "is_cache_enabled", False):
            raise ShapefirstError(f"a diffusers cache is already enabled on this {type(den).__name__}",
                                  "call its disable_cache() first, or use that cache alone")
    if separate and cache.kind in PER_LAYER:
        raise ShapefirstError(f"the {cache.kind} cache does not run on {type(pipe).__name__}, which calls the "
                              f"transformer once per branch: {PER_LAYER[cache.kind]}",
                              "use fbc, taylorseer or mag on this pipeline (one state per branch through its "
                              "cache_context)")


@contextmanager
def transformer_cache(pipe, cache: TransformerCache):
    """Apply `cache` to the pipeline's transformer(s) for the `with` block; on exit (also on an exception)
    every hook it added is removed and the transformers run their plain forward again."""
    dens = denoisers_of(pipe)
    fam = family(pipe)
    separate = fam.cfg == "separate"
    _check(pipe, dens, cache, separate)
    options = cache.per_denoiser(len(dens))
    before = [_hook_names(den) for den in dens]
    calls = _Calls(pipe, cache, fam)
    handles = []
    try:
        for i, den in enumerate(dens):
            _apply(den, cache, calls.current_timestep, options[i])
            calls.bind(den, [(m, reg.hooks[n]) for m, reg, n in _hooks_since(den, before[i])])
            handles += [den.register_forward_pre_hook(partial(calls.record_timestep, i), with_kwargs=True),
                        _first_block(den).register_forward_pre_hook(partial(calls.open_call, calls.parts[-1]),
                                                                    with_kwargs=True)]
        yield calls
    finally:
        for h in handles:
            h.remove()
        for den, names in zip(dens, before):
            for _, reg, n in _hooks_since(den, names):
                reg.remove_hook(n, recurse=False)
            HookRegistry.check_if_exists_or_initialize(den).invalidate_child_registries_cache()


class _RatiosLog(logging.Handler):
    """diffusers' MagCache calibration results as they are logged, with the transformer that logged them."""

    def __init__(self, calls):
        super().__init__(logging.INFO)
        self.calls = calls
        self.ratios: list[tuple[int, list[float]]] = []

    def emit(self, record) -> None:
        m = re.search(r"MagCache Calibration Results: \[(.*)\]", record.getMessage())
        if m:
            self.ratios.append((self.calls.current, [float(x) for x in m.group(1).split(",") if x.strip()]))


def _steps_per_denoiser(pipe, run, dens: list) -> list[int]:
    """How many steps each transformer runs in `run()` (distinct timesteps it is called with)."""
    seen = [set() for _ in dens]
    handles = [den.register_forward_pre_hook(
        lambda m, a, k, s=s: s.add(timestep_value(timestep_input(a, k))), with_kwargs=True)
        for den, s in zip(dens, seen)]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return [len(s) for s in seen]


def calibrate_mag_ratios(pipe, run, steps: int) -> list:
    """MagCache's calibration as diffusers ships it (calibrate=True: nothing skipped, the per-step
    magnitude ratios logged at the end of the run): `run()` makes one pipeline call of `steps` steps;
    returns the ratios diffusers logged (read from its logger), to pass as mag_ratios. On a pipeline with
    several transformers (Wan 2.2) a first run counts the steps each runs, and the result is one list per
    transformer (each of its own length)."""
    dens = denoisers_of(pipe)
    counts = [steps] if len(dens) == 1 else _steps_per_denoiser(pipe, run, dens)
    log = logging.getLogger("diffusers.hooks.mag_cache")
    level = log.level
    cache = TransformerCache("mag", calibrate=True, mag_ratios=[[1.0] * n for n in counts])
    handler = _RatiosLog(None)
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        with transformer_cache(pipe, cache) as calls:
            handler.calls = calls
            run()
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
    got = [[r for i, r in handler.ratios if i == d] for d in range(len(dens))]
    if any(not g or len(g[-1]) != n for g, n in zip(got, counts)):
        raise ShapefirstError(f"MagCache calibration logged no ratios for a {steps}-step run",
                              f"make run() one pipeline call of {steps} steps")
    return got[0][-1] if len(dens) == 1 else [g[-1] for g in got]
