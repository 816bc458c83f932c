"""benchmarks/peers.py's Pareto plot: one curve per method, only configurations with both a quality
row and a batch-8 timing, Wilson 95% intervals of the all-five share."""
import importlib.util
from pathlib import Path

import pytest

from shapefirst.metrics import wilson

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def peers():
    spec = importlib.util.spec_from_file_location("peers", ROOT / "benchmarks" / "peers.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def rows(acc: dict[str, float], n: int = 1000) -> dict:
    return {name: {"n": n, "accuracy": {"all": a}} for name, a in acc.items()}


def test_points_group_by_method_sort_by_saving_and_skip_untimed(peers, tmp_path):
    q = rows({"full": 0.9, "shapefirst stop=0.3 uncond +mean": 0.87, "shapefirst stop=0.5 uncond": 0.89,
              "shapefirst stop_step=25 uncond + DeepCache interval=3": 0.86, "T-GATE gate_step=25 (tgate)": 0.88,
              "Step AG 0.5 (stop=0.5 cond)": 0.885, "diffusers SDCFGCutoffCallback(0.5)": 0.88})
    t = {"full": {"saved_latency": 0.0}, "shapefirst stop=0.5 uncond": {"saved_latency": 0.21},
         "shapefirst stop=0.3 uncond +mean": {"saved_latency": 0.45}, "T-GATE gate_step=25 (tgate)": {"saved_latency": 0.3},
         "shapefirst stop_step=25 uncond + DeepCache interval=3": {"saved_latency": 0.5},
         "diffusers SDCFGCutoffCallback(0.5)": {"saved_latency": 0.2}}  # a batch-1 row: not on this axis
    pts = peers.pareto_points(q, t)
    assert set(pts) == {"full guidance", "shapefirst stop (+ late caches)", "T-GATE (tgate)", "shapefirst stop + DeepCache"}
    ours = pts["shapefirst stop (+ late caches)"]
    assert [p[4] for p in ours] == ["shapefirst stop=0.5 uncond", "shapefirst stop=0.3 uncond +mean"]
    assert ours[0][2:4] == pytest.approx(wilson(890, 1000))
    assert peers.pareto_plot(q, t, tmp_path / "p.png").stat().st_size > 0
    assert peers.pareto_plot(q, {}, tmp_path / "none.png") is None and not (tmp_path / "none.png").exists()
