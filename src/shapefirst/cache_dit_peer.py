"""The `cache-dit` package (DBCache, vipshop/cache-dit) as a peer of shapefirst's guidance stop: its cache at
its own defaults on a pipeline it supports, entered and left as a context manager that restores the pipeline
on exit and on exceptions.

    with guidance_schedule(pipe, GuidanceSchedule(3.0, stop=0.4, after="cond")), cache_dit_peer(pipe):
        images = pipe(prompts, guidance_scale=3.0).images

What cache-dit does to a pipeline (`cache_dit.enable_cache`): it replaces the transformer's `forward` with
one that swaps its blocks for cached ones during the call, and wraps the pipeline CLASS's `__call__` to
reset its cache context per call. Entered inside `guidance_schedule`, its forward wraps shapefirst's
guidance hook (and inside cache-dit's, shapefirst's wraps it): either way the guidance hook sees every
denoiser call the pipeline makes. `cache_dit.disable_cache` puts both back; it restores the forward through
`__get__`, which a forward wrapped by a diffusers hook (shapefirst's guidance hook) lacks, so the peer
hands cache-dit a bound method there and puts the hooked forward back itself. Enter and leave it nested
with shapefirst's contexts.

CFG layouts must agree: cache-dit keeps the branches of a pipeline that calls the transformer once per
branch apart by the parity of its transformer calls (`enable_separate_cfg`, on for Wan by its block
adapter, off by default for Flux), shapefirst by the embeddings a call is given (shapefirst.separate). A
torch forward pre-hook on each transformer checks every call of the pipeline:
- a call whose layout differs from cache-dit's (Flux with true CFG at cache-dit's defaults) is refused,
  naming `enable_separate_cfg`;
- one-call-per-branch pipelines under a shapefirst schedule that stops (or a step whose own scale is <= 1,
  Wan 2.2's guidance_scale_2): refused, because shapefirst does not make the skipped branch's call, which
  shifts cache-dit's parity so that it would file the conditional branch under its CFG state;
- batched CFG (PixArt, SD3) composes with a stop: after it the batch has B rows instead of 2B, cache-dit's
  residual comparison sees the shapes differ and computes that call in full, then caches again (its
  threshold >= 1 or a static steps mask would skip that comparison, and are refused under a stop).
cache-dit's DBCache always computes the first Fn_compute_blocks (8) blocks of each block group, so it
needs more blocks than that (refused up front otherwise). cache-dit is imported only when a peer is made
(its import takes seconds)."""
from __future__ import annotations

import threading
import types
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from diffusers.hooks import HookRegistry

from .errors import ShapefirstError
from .families import family
from .guidance_hook import denoisers_of, session_of
from .pipeline_call import running_call
from .session import separate_cfg

FIX_STOP = ("run cache-dit without a stop on this pipeline, or use diffusers' fbc, taylorseer or mag through "
            "shapefirst.transformer_cache, which compose with it")


def _cache_dit():
    try:
        import cache_dit
    except ImportError:
        raise ShapefirstError("the cache-dit package is not installed", "pip install cache-dit") from None
    return cache_dit


@dataclass
class CacheDitPeer:
    """What `cache_dit_peer` yields: the pipeline, cache-dit's config as enabled (`enable_separate_cfg` filled
    in by its block adapter) and the transformers it caches."""

    pipe: object
    config: object
    denoisers: list
    handles: list = field(default_factory=list)
    stand_ins: set = field(default_factory=set)  # id() of transformers whose hooked forward has a stand-in
    reached: threading.local = field(default_factory=threading.local)

    @property
    def separate_cfg(self) -> bool:
        return bool(self.config.enable_separate_cfg)

    def stats(self) -> list:
        """cache-dit's own statistics of the last call (cache_dit.summary, quiet): per block group its
        `cached_steps` and, with separate CFG, `cfg_cached_steps`."""
        return _cache_dit().summary(self.pipe, logging=False)

    def check_call(self, module, args, kwargs) -> None:
        """Forward pre-hook on each transformer: refuse a call of the pipeline that cache-dit would misread."""
        self.reached.flag = False
        call = running_call()
        if call is not None and call.pipe is self.pipe:
            fam = family(self.pipe)
            separate = fam.cfg == "separate" and separate_cfg(fam, call)
            self._check_layout(separate)
            self._check_schedule(fam, call, separate)

    def _check_layout(self, separate: bool) -> None:
        if separate != self.separate_cfg:
            raise ShapefirstError(f"cache-dit treats each {type(self.pipe).__name__} transformer call as "
                                  f"{'one branch of a step' if self.separate_cfg else 'a whole step'}, but this "
                                  f"call runs {'CFG as one call per branch' if separate else 'one call per step'}",
                                  f"enter cache_dit_peer(pipe, enable_separate_cfg={separate})")

    def _check_schedule(self, fam, call, separate: bool) -> None:
        session = session_of(self.pipe)
        binding = session.binding_of(self.pipe) if session is not None else None
        if binding is None or not binding.schedule.stops and not _unguided_step(fam, call, separate):
            return
        if separate:
            raise ShapefirstError("cache-dit tells the branches apart by the parity of its transformer calls, and "
                                  "under this guidance schedule shapefirst skips the unconditional call of unguided "
                                  "steps, which would file the conditional branch under cache-dit's CFG state",
                                  FIX_STOP)
        c = self.config
        if c.residual_diff_threshold >= 1.0 or (c.steps_computation_mask is not None and
                                                c.steps_computation_policy == "static"):
            raise ShapefirstError("this cache-dit config reuses its cache without comparing shapes (threshold >= 1 "
                                  "or a static steps mask), and the guidance stop halves the batch",
                                  "keep residual_diff_threshold below 1 and the dynamic steps policy")

    def check_reached(self, module, args, kwargs, output):
        """Forward hook (first of them) on a transformer that had a hooked forward: did the call reach it?"""
        if id(module) in self.stand_ins and not self.reached.flag:
            raise ShapefirstError(f"cache-dit replaced {type(module).__name__}.forward (its patch for this model) "
                                  "under the diffusers hook that was on it (shapefirst's guidance hook), which no "
                                  "longer runs", "enter cache_dit_peer outside (before) guidance_schedule here")
        return output


def _unguided_step(fam, call, separate: bool) -> bool:
    """A step whose own guidance scale is <= 1 (Wan 2.2's guidance_scale_2), whose unconditional call shapefirst
    skips under any schedule."""
    scale = call.local(fam.scale_local) if separate and fam.scale_local else None
    return isinstance(scale, (int, float)) and scale <= 1.0


def _block_groups(den) -> dict[str, int]:
    """The transformer's block lists (cache-dit's block adapters cache `blocks`, `transformer_blocks`,
    `single_transformer_blocks`) and their lengths."""
    return {n: len(m) for n, m in den.named_children() if n.endswith("blocks") and isinstance(m, torch.nn.ModuleList)}


def _config(cd, options: dict):
    try:
        return cd.DBCacheConfig(**options)
    except TypeError as e:
        raise ShapefirstError(f"bad cache-dit option: {e}", "see cache_dit.DBCacheConfig") from None


def _check(cd, pipe, config, dens: list) -> None:
    name = type(pipe).__name__
    if not cd.BlockAdapterRegister.is_supported(pipe):
        raise ShapefirstError(f"cache-dit has no block adapter for {name}",
                              "use it on a diffusion-transformer pipeline it supports (cache_dit.supported_pipelines()"
                              ": Wan, Flux, PixArt, SD3, ...); for a UNet use the DeepCache package")
    if cd.BlockAdapter.is_cached(pipe):
        raise ShapefirstError(f"cache-dit is already enabled on a {name} (it patches the pipeline class)",
                              "leave that peer (or cache_dit.disable_cache it) first")
    for den in dens:
        for group, n in _block_groups(den).items():
            if config.Fn_compute_blocks + config.Bn_compute_blocks > n:
                raise ShapefirstError(f"cache-dit's DBCache computes the first Fn_compute_blocks="
                                      f"{config.Fn_compute_blocks} and last Bn_compute_blocks="
                                      f"{config.Bn_compute_blocks} blocks at every step, and this "
                                      f"{type(den).__name__}'s `{group}` has {n}",
                                      f"pass Fn_compute_blocks={max(n - 1, 1)} or fewer")


def _enable(cd, pipe, config) -> None:
    try:
        cd.enable_cache(pipe, cache_config=config)
    except AssertionError as e:  # cache-dit's block adapters assert what they accept
        raise ShapefirstError(f"cache-dit could not cache {type(pipe).__name__}: {e}",
                              "use a pipeline whose transformer cache-dit's block adapter accepts") from None


class _Restore:
    """Everything of the pipeline's transformers that cache-dit may leave changed, put back after
    `cache_dit.disable_cache`: the `forward` attribute of every module (cache-dit leaves a bound method where
    there was none, cannot re-bind a forward wrapped by a diffusers hook, and its Flux patch rewrites Flux's
    forward for good), attributes it set on a transformer (its Flux patch's marker), the order of a
    transformer's children (its block swap moves them), and the pipeline class's `__call__` (where the class
    had none of its own)."""

    def __init__(self, pipe, dens: list, reached):
        self.cls, self.dens = type(pipe), dens
        self.call = vars(self.cls).get("__call__")
        self.modules = [m for den in dens for m in den.modules()]
        self.forwards = [vars(m).get("forward") for m in self.modules]
        self.keys = [set(vars(den)) for den in dens]
        self.children = [[n for n, _ in den.named_children()] for den in dens]
        self.stand_ins = {}
        for den in dens:
            fwd = vars(den).get("forward")
            if fwd is not None and not isinstance(fwd, types.MethodType):
                den.forward = types.MethodType(_through(fwd, reached), den)
                self.stand_ins[id(den)] = den.forward

    def __call__(self) -> None:
        for m, fwd in zip(self.modules, self.forwards):
            if fwd is not None:
                m.forward = fwd
            elif "forward" in vars(m):
                del m.forward
        for den, keys, children in zip(self.dens, self.keys, self.children):
            for k in set(vars(den)) - keys:
                if not isinstance(vars(den)[k], HookRegistry):  # diffusers' own hook registry stays
                    delattr(den, k)
            if [n for n, _ in den.named_children()] != children:
                _reorder(den, children)
        if self.call is None and "__call__" in vars(self.cls):
            delattr(self.cls, "__call__")


def _reorder(module: torch.nn.Module, names: list[str]) -> None:
    """Register the module's children again in the order `names` (cache-dit swaps block lists in with
    unittest.mock.patch.object, which deletes and re-sets them: they move to the end of the registration order,
    that of named_modules and state_dict)."""
    for name in names:
        child = getattr(module, name)
        delattr(module, name)
        setattr(module, name, child)


def _through(forward, reached):
    """A bound-method stand-in for a forward that is not one (a diffusers hook's), so that cache-dit can restore
    it through `__get__`; it marks each call as having reached the hooked forward."""
    def call(self, *args, **kwargs):
        reached.flag = True
        return forward(*args, **kwargs)
    return call


@contextmanager
def cache_dit_peer(pipe, **options):
    """cache-dit's DBCache on `pipe` for the `with` block, at cache-dit's defaults (`options`: DBCacheConfig
    fields over them, e.g. enable_separate_cfg=True for Flux with true CFG); yields a CacheDitPeer. On exit
    (also on an exception) cache-dit is disabled and the pipeline runs exactly as before."""
    cd = _cache_dit()
    dens = denoisers_of(pipe)
    config = _config(cd, options)
    _check(cd, pipe, config, dens)
    peer = CacheDitPeer(pipe, config, dens)
    restore = _Restore(pipe, dens, peer.reached)
    peer.stand_ins = set(restore.stand_ins)
    try:
        _enable(cd, pipe, config)
        peer.handles = [h for den in dens for h in (
            den.register_forward_pre_hook(peer.check_call, with_kwargs=True),
            den.register_forward_hook(peer.check_reached, with_kwargs=True, prepend=True))]
        yield peer
    finally:
        for h in peer.handles:
            h.remove()
        try:
            cd.disable_cache(pipe)
        finally:
            restore()
