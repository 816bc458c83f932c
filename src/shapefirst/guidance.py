"""Guidance schedules: classifier-free guidance only while it matters, one denoiser branch after.

The public names in one place; each concept lives in its own module:
- shapefirst.schedules: the configs (GuidanceSchedule, AdaptiveStop), checked when made;
- shapefirst.pipeline_call: which pipeline call a denoiser call belongs to;
- shapefirst.session / shapefirst.run_state: what each pipeline applied, and one RunState per pipeline call;
- shapefirst.rows: the row layouts of a CFG batch and the one row-labelling rule (`row_images`);
- shapefirst.guidance_hook: the hook, apply / remove / the `guidance_schedule` context;
- shapefirst.controlnet_rows: a ControlNet under a stop runs only the rows the denoiser will run.
"""
from __future__ import annotations

from .controlnet_rows import CONTROLNET_HOOK, ControlNetRows
from .guidance_hook import (HOOK_NAME, GuidanceHook, ScheduleHandle, apply_guidance_schedule, guidance_hook_of,
                            guidance_schedule, remove_guidance_schedule, run_state_of, session_of)
from .pipeline import cfg_active, denoiser_of, latent_input, timestep_input, timestep_value
from .pipeline_call import calls_of_run
from .rows import RowLayout, cfg_layout, plain_layout
from .run_state import RunState
from .schedules import (AFTER_CHOICES, CRITERIA, DEFAULT_PATIENCE, DEFAULT_SHAPE_TOLERANCE, AdaptiveStop,
                        GuidanceSchedule)
from .session import Binding, Session

__all__ = ["AFTER_CHOICES", "CONTROLNET_HOOK", "CRITERIA", "DEFAULT_PATIENCE", "DEFAULT_SHAPE_TOLERANCE", "HOOK_NAME",
           "AdaptiveStop", "Binding", "ControlNetRows", "GuidanceHook", "GuidanceSchedule", "RowLayout", "RunState",
           "ScheduleHandle", "Session", "apply_guidance_schedule", "calls_of_run", "cfg_active", "cfg_layout",
           "denoiser_of", "guidance_hook_of", "guidance_schedule", "latent_input", "plain_layout",
           "remove_guidance_schedule", "run_state_of", "session_of", "timestep_input", "timestep_value"]
