"""`accelerate launch` with 2 CPU processes: the merged sweep equals the single-process sweep
(same batch makeup, so the same numbers; only the timings differ)."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

TIMING = {"time_ratio_median", "time_ratios", "saved_latency", "load"}  # load: when the row was timed


def rows(path: Path) -> dict:
    out = {}
    for line in path.read_text().splitlines():
        r = json.loads(line)
        out[r["key"]] = {k: v for k, v in r.items() if k not in TIMING}
    return out


@pytest.mark.heavy
def test_two_process_sweep_equals_single_process(tiny_folder, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\na blue square\na green cross\na yellow triangle\n")
    args = ["sweep", "--model", str(tiny_folder), "--prompts", str(prompts), "--n", "4", "--stops", "0.5",
            "--schedulers", "ddim", "--steps", "4", "--batch", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run([sys.executable, "-m", "shapefirst", *args, "--out", str(tmp_path / "single")],
                            capture_output=True, text=True, env=env)
    assert single.returncode == 0, single.stderr[-2000:]
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or "accelerate"
    multi = subprocess.run([accelerate, "launch", "--cpu", "--num_processes", "2", "--num_machines", "1",
                            "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "shapefirst", *args,
                            "--out", str(tmp_path / "multi")], capture_output=True, text=True, env=env)
    assert multi.returncode == 0, multi.stderr[-3000:]
    a, b = rows(tmp_path / "single" / "sweep.jsonl"), rows(tmp_path / "multi" / "sweep.jsonl")
    assert a.keys() == b.keys() and len(a) == 3
    assert a == b
    # each process wrote its own batches' reference images; together they are the single run's
    assert sorted(p.name for p in (tmp_path / "multi").glob("ref_*.safetensors")) == \
        sorted(p.name for p in (tmp_path / "single").glob("ref_*.safetensors"))
