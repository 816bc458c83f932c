"""The one place shapefirst reflects over diffusers' hook internals, for the transformer caches
(shapefirst.transformer_cache), on pipelines that open diffusers' `cache_context` themselves or not.

diffusers' cache hooks (FirstBlockCache, TaylorSeer, MagCache, ...) keep their state in StateManagers
(`diffusers.hooks.hooks`) that need a CacheContext set before every denoiser call; the pipelines that
support them do it through `CacheMixin.cache_context`. Here: the StateManagers a hook holds (found
among its attributes), the context they all get, and the context a pipeline has set on them; and the
block metadata diffusers' block caches (First Block Cache, MagCache) read a transformer block's outputs
with (`TransformerBlockRegistry` in diffusers.hooks._helpers: where a block class returns its hidden
states and its text states), read for a class and declared for a class diffusers has none for. Tested on
diffusers TESTED (pinned in pyproject); tests/test_transformer_cache.py and tests/test_separate_caches.py
fail first if a release changes them."""
from __future__ import annotations

from diffusers.hooks._helpers import TransformerBlockMetadata, TransformerBlockRegistry
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


def declare_block(cls: type, hidden: int, encoder: int | None) -> None:
    """Give diffusers the metadata of a block class it has none for (never replaces diffusers' own): `forward`
    takes `hidden_states` (and `encoder_hidden_states` where `encoder` is not None) and returns them at these
    indices (one tensor where `encoder` is None)."""
    if block_outputs(cls) is None:
        TransformerBlockRegistry.register(cls, TransformerBlockMetadata(return_hidden_states_index=hidden,
                                                                        return_encoder_hidden_states_index=encoder))
