"""shapefirst: explain and accelerate text-to-image diffusion models.

Shape first, details later: the low-frequency layout of an image is decided in the first
denoising calls, mostly by the prompt's [EOS] tokens; after that, classifier-free guidance can be
switched off. The public names:
"""
from .cache import LateCache, apply_late_cache, late_cache, remove_late_cache
from .errors import ShapefirstError
from .generate import GenerationResult, generate
from .guidance import (AdaptiveStop, GuidanceHook, GuidanceSchedule, RunState, apply_guidance_schedule,
                       guidance_schedule, remove_guidance_schedule, run_state_of)
from .models import default_guidance, embedded_model_path, load_pipeline, set_scheduler
from .trace import Trajectory, TrajectoryRecorder

__version__ = "0.2.0"

__all__ = [
    "AdaptiveStop", "GenerationResult", "GuidanceHook", "GuidanceSchedule", "LateCache", "ShapefirstError",
    "Trajectory", "TrajectoryRecorder", "apply_guidance_schedule", "apply_late_cache", "late_cache",
    "remove_late_cache", "embedded_model_path", "generate", "guidance_schedule",
    "load_pipeline", "remove_guidance_schedule", "set_scheduler", "RunState", "run_state_of", "default_guidance",
]
