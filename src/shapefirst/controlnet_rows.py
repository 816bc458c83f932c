"""ControlNet rows: under a guidance stop, the pipeline's ControlNet (which runs before the denoiser on
the same CFG batch) computes only the rows the denoiser will run.

From a run's second call on (once its RunState knows the batch), a CFG call of the ControlNet runs the
rows of the call's RowLayout, and its residuals come back for the whole CFG batch (a dropped row holds
its kept row's values), which the guidance hook slices again like every CFG-batch input. Anything else
(a run's first call, diffusers' guess_mode, which calls the ControlNet with the conditional rows only,
return_dict=True, a call outside a scheduled pipeline call) runs untouched."""
from __future__ import annotations

import torch
from diffusers.hooks import ModelHook

from .pipeline import latent_input
from .rows import expand_rows, rows_of
from .session import Session

CONTROLNET_HOOK = "shapefirst_controlnet_rows"


class ControlNetRows(ModelHook):
    """On a ControlNet (or MultiControlNet) of a pipeline with a guidance schedule (see the module docstring)."""

    def __init__(self, session: Session):
        super().__init__()
        self.session = session

    @torch.compiler.disable
    def _state(self, sample, kwargs):
        if self.session is None or kwargs.get("return_dict", True):
            return None
        return self.session.state_for(sample, create=False)

    def new_forward(self, module, *args, **kwargs):
        forward, sample = self.fn_ref.original_forward, latent_input(args, kwargs)
        st = self._state(sample, kwargs)
        if st is None:
            return forward(*args, **kwargs)
        self.session.enter(st, sample)
        lay, rows = st.layout, sample.shape[0]
        try:
            if lay.full:
                return forward(*args, **kwargs)
            out = forward(*rows_of(args, rows, lay.run_dev), **rows_of(kwargs, rows, lay.run_dev))
        except BaseException:  # as the guidance hook does: the next run must begin afresh
            self.session.leave(st, ok=False)
            raise
        return expand_rows(out, len(lay.run), lay.src)


def apply_controlnet_rows(pipe, session: Session) -> None:
    """Put the ControlNetRows hook on `pipe.controlnet` (a ControlNet or MultiControlNet), if it has one."""
    net = getattr(pipe, "controlnet", None)
    if isinstance(net, torch.nn.Module):
        session.add_hook(net, ControlNetRows(session), CONTROLNET_HOOK)
