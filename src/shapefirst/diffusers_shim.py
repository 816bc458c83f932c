"""The one place shapefirst reflects over diffusers' hook internals, for the transformer caches
(shapefirst.transformer_cache), on pipelines that open diffusers' `cache_context` themselves or not.

diffusers' cache hooks (FirstBlockCache, TaylorSeer, MagCache, ...) keep their state in StateManagers
(`diffusers.hooks.hooks`) that need a CacheContext set before every denoiser call; the pipelines that
support them do it through `CacheMixin.cache_context`. Here: the StateManagers a hook holds (found
among its attributes), the context they all get, and the context a pipeline has set on them; and the
block metadata diffusers' block caches (First Block Cache, MagCache) read a transformer block's outputs
with (`TransformerBlockRegistry` in diffusers.hooks._helpers: where a block class returns its hidden
states and its text states), read only: shapefirst never adds to diffusers' process-wide registry, so a block class
diffusers has no metadata for is refused for the block caches. Tested on
diffusers TESTED (pinned in pyproject); tests/test_transformer_cache.py and tests/test_separate_caches.py
fail first if a release changes them."""
from __future__ import annotations

from diffusers.hooks._helpers import TransformerBlockRegistry
from diffusers.hooks.hooks import CacheContext, StateManager

TESTED = ">=0.42.1,<0.43"


def state_managers(hooks) -> list[StateManager]:
    """The StateManagers that diffusers' cache hooks keep among their attributes."""
    return [v for h in hooks for v in vars(h).values() if isinstance(v, StateManager)]


def open_context(managers: list[StateManager], name: str = "cond_uncond") -> CacheContext:
    """Set the cache context of one denoiser call (diffusers' name for a batched [uncond, cond] call); returns it."""
    return set_context(managers, CacheContext(name))


def set_context(managers: list[StateManager], context: CacheContext) -> CacheContext:
    """Set `context` on the StateManagers (again, after a reset cleared the one a pipeline had set)."""
    for sm in managers:
        sm.set_context(context)
    return context


def current_context(managers: list[StateManager]) -> CacheContext | None:
    """The cache context set on the hooks' StateManagers now (a pipeline's own `cache_context`, or the last one
    open_context set), through StateManager's public `context` property; None when none is set (or no manager)."""
    for sm in managers:
        try:
            return sm.context
        except ValueError:  # diffusers: "No cache context is set"
            return None
    return None


def block_outputs(cls: type) -> tuple[int, int | None] | None:
    """Where diffusers' block caches read a block class's outputs: (index of its hidden states, index of its
    text states or None for a block returning one tensor); None when diffusers has no metadata for the class."""
    try:
        meta = TransformerBlockRegistry.get(cls)
    except ValueError:  # diffusers: "Model class ... not registered."
        return None
    return meta.return_hidden_states_index, meta.return_encoder_hidden_states_index
