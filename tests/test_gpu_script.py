"""benchmarks/gpu.py (#33 item 4) runs end to end at tiny sizes on the CPU: every model and setting is measured,
the evaluation counts are the schedules' own, and the table is written."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def test_the_gpu_script_runs_at_tiny_sizes(tmp_path, capsys):
    import gpu

    import torch

    out, threads = tmp_path / "gpu.json", torch.get_num_threads()
    rows = gpu.main(["--size", "tiny", "--device", "cpu", "--steps", "4", "--repeats", "1", "--batches", "1,2",
                     "--out", str(out), "--allow-busy"])  # the tests run beside each other: flagged, not refused
    assert torch.get_num_threads() == threads  # the caller's thread count is back
    got = {(r["model"], r["batch"], r["setting"]): r["evaluations_per_image"] for r in rows}
    for model in ("sd15", "sdxl", "wan", "flux"):
        for batch in (1, 2):
            assert got[(model, batch, "plain")] == got[(model, batch, "hook, no stop")] == 8
            assert got[(model, batch, "stop 0.5 cond")] == 2 * 2 + 2
    assert got[("sd15", 1, "stop 0.4 cond +kept+deep3")] == 2 * 2 + 2  # round(0.4 * 4) = 2 guided calls
    saved = json.loads(out.read_text())
    assert saved["size"] == "tiny" and len(saved["rows"]) == len(rows) and saved["notes"]["wan"]["sync"]
    assert "| model | batch | setting |" in capsys.readouterr().out
