"""README's lead example runs as written on the embedded model and prints what its comment says."""
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_lead_example_runs_and_its_comment_is_true(tmp_path, capsys, monkeypatch):
    code = README.read_text().split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    claimed = re.search(r"print\(hook\.evaluations_per_image\(\)\)\s+# (\[\d+\])", code).group(1)
    assert printed == claimed
    assert (tmp_path / "circle.png").stat().st_size > 0
