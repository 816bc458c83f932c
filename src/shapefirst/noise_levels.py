"""The noise level of each denoiser call of a run: what a guidance window in noise level (GuidanceSchedule's
stop_sigma / start_sigma) is mapped through, for whatever scheduler and step count runs.

sigma = sqrt((1 - alpha_bar) / alpha_bar) at the call's timestep for epsilon and v models (the sigma of
k-diffusion, AUTOMATIC1111 and Guidance Interval; Euler-type solvers interpolate it between training
timesteps, as here), the flow time s in [0, 1] (x_t = (1 - s) x0 + s eps) for flow matching. A run's calls are
the last n_calls entries of the scheduler's timesteps (img2img starts late in the schedule). Read once per run
on the host: the scheduler's timesteps are copied back once (a run with a noise-level window only)."""
from __future__ import annotations

import torch

from .trace import alpha_bar_at, flow_sigma, is_flow_matching


def sigma_at(scheduler, t: float) -> float:
    """The noise level at timestep t (see the module docstring)."""
    if is_flow_matching(scheduler):
        return float(flow_sigma(scheduler, float(t)))
    ab = alpha_bar_at(scheduler, float(t))
    return ((1.0 - ab) / ab) ** 0.5


def run_noise_levels(scheduler, n_calls: int | None) -> list[float]:
    """The noise level of each of the run's n_calls calls, from the scheduler's timesteps."""
    ts = getattr(scheduler, "timesteps", None)
    if ts is None or n_calls is None:
        return []
    ts = ts.detach().to("cpu", torch.float64).tolist() if isinstance(ts, torch.Tensor) else [float(t) for t in ts]
    return [sigma_at(scheduler, t) for t in ts[len(ts) - n_calls:]]
