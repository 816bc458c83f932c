"""The one place shapefirst reflects over diffusers' hook internals, for the transformer caches
(shapefirst.transformer_cache) on pipelines that do not open diffusers' `cache_context` themselves.

diffusers' cache hooks (FirstBlockCache, TaylorSeer, MagCache, ...) keep their state in StateManagers
(`diffusers.hooks.hooks`) that need a CacheContext set before every denoiser call; the pipelines that
support them do it through `CacheMixin.cache_context`. Here: the StateManagers a hook holds (found
among its attributes) and the context they all get. Tested on diffusers TESTED (pinned in pyproject);
tests/test_transformer_cache.py fails first if a release changes them."""
from __future__ import annotations

from diffusers.hooks.hooks import CacheContext, StateManager

TESTED = ">=0.42.1,<0.43"


def state_managers(hooks) -> list[StateManager]:
    """The StateManagers that diffusers' cache hooks keep among their attributes."""
    return [v for h in hooks for v in vars(h).values() if isinstance(v, StateManager)]


def open_context(managers: list[StateManager], name: str = "cond_uncond") -> None:
    """Set the cache context of one denoiser call (diffusers' name for a batched [uncond, cond] call)."""
    context = CacheContext(name)
    for sm in managers:
        sm.set_context(context)
