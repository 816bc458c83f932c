"""benchmarks/late_phase_reuse.py: the parts it times and what its table computes, on tiny UNet and transformer."""
import importlib.util
import statistics
from pathlib import Path

import pytest
import torch

from shapefirst.guidance import GuidanceSchedule, denoiser_of, guidance_schedule

ROOT = Path(__file__).resolve().parents[1]


def bench():
    spec = importlib.util.spec_from_file_location("late_phase_reuse", ROOT / "benchmarks" / "late_phase_reuse.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("kind", ["unet", "pixart"])
def test_every_part_is_recorded_per_call_and_the_change_is_the_relative_norm(kind, tiny_pipe):
    from shapefirst.tiny import tiny_pixart_pipeline

    mod = bench()
    pipe = tiny_pipe if kind == "unet" else tiny_pixart_pipeline()
    den = denoiser_of(pipe)
    parts = mod.parts_of(den)
    first, last = ("conv_in", "conv_out") if kind == "unet" else ("pos_embed", "proj_out")
    assert list(parts)[0] == first and list(parts)[-1] == last
    n_blocks = len(den.down_blocks) + len(den.up_blocks) + 1 if kind == "unet" else len(den.transformer_blocks)
    assert len(parts) == n_blocks + 2
    rec = mod.PartRecorder(den)
    extra = {"height": 64, "width": 64, "use_resolution_binning": False} if kind == "pixart" else {}
    with guidance_schedule(pipe, GuidanceSchedule(3.0, stop_step=2, after="cond")):
        pipe(["a red circle"], num_inference_steps=5, guidance_scale=3.0, output_type="latent",
             generator=torch.Generator().manual_seed(0), **extra)
    rec.close()
    assert len(rec.calls) == 5 and all(set(c["out"]) == set(parts) for c in rec.calls)
    assert rec.calls[1]["out"][last].shape[0] == 2 and rec.calls[2]["out"][last].shape[0] == 1  # the stop
    rows = {name: (share, change) for name, share, change in mod.late_table(rec.calls, 2)}
    assert list(rows) == list(parts) + ["attn2"]
    assert sum(share for name, (share, _) in rows.items() if name != "attn2") <= 1.0 + 1e-9
    ys = [rec.calls[i]["out"][last] for i in (2, 3, 4)]  # the late calls: each against the one before
    changes = [float((b - a).norm() / b.norm()) for a, b in zip(ys, ys[1:])]
    assert rows[last][1] == pytest.approx(statistics.median(changes))
    pipe(["a red circle"], num_inference_steps=2, guidance_scale=3.0, output_type="latent", **extra)
    assert len(rec.calls) == 5  # closed: its hooks are gone
