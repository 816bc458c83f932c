"""A sweep killed with SIGKILL mid-run: every file it left parses, and the rerun resumes without
recomputing what was finished."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file


@pytest.mark.heavy
def test_sigkilled_sweep_resumes_and_leaves_no_corrupt_file(tiny_folder, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(["a red circle", "a blue square", "a green cross", "a yellow triangle"] * 2))
    out = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "shapefirst", "sweep", "--model", str(tiny_folder), "--prompts", str(prompts),
           "--n", "8", "--stops", "0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9", "--schedulers", "ddim", "--steps", "30",
           "--batch", "2", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    jsonl = out / "sweep.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if jsonl.exists() and len(jsonl.read_text().splitlines()) >= 3:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the sweep ended before it could be killed: " + proc.stderr.read().decode()[-500:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = jsonl.read_text().splitlines()
    assert 3 <= len(before) < 19
    for line in before:
        json.loads(line)
    for f in out.glob("*.safetensors"):
        load_file(str(f))
    # (a write cut by the kill can leave a hidden ".name.XXXX.tmp" file: never a target name, ignored on rerun)
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    after = jsonl.read_text().splitlines()
    assert len(after) == 19
    assert after[:len(before)] == before  # finished configurations were not recomputed (timings would differ)
    assert len({json.loads(x)["key"] for x in after}) == 19
