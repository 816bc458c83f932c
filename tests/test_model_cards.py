"""Each shipped model card's first ```python block runs exactly as written in plain diffusers (a fresh
interpreter, no shapefirst import) and gives a 64x64 image; the card generator (world.card, used by
train's model folders and train_dit.ship) writes that same block, so a re-ship keeps a working snippet."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

WORLD = Path(__file__).resolve().parents[1] / "src" / "shapefirst" / "world"
CARDS = [WORLD / "model", WORLD / "model_dit"]


def first_python_block(folder: Path) -> str:
    m = re.search(r"```python\n(.*?)```", (folder / "README.md").read_text(), re.S)
    assert m, f"{folder / 'README.md'} has no ```python block"
    return m.group(1)


@pytest.mark.parametrize("folder", CARDS, ids=lambda f: f.name)
def test_card_snippet_runs_as_written_without_shapefirst(folder):
    code = first_python_block(folder)
    assert code.count("path/to/this/folder") == 1
    code = code.replace('"path/to/this/folder"', repr(str(folder)))
    code += ("\nimport sys\n"
             "assert 'shapefirst' not in sys.modules, 'the card imported shapefirst'\n"
             "print('size', image.size)\n")
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH="")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=folder,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "size (64, 64)" in r.stdout


@pytest.mark.parametrize("folder", CARDS, ids=lambda f: f.name)
def test_card_generator_writes_the_shipped_block(folder, tmp_path):
    """A re-ship (write_card keeping the old card) gives the shipped card back, its tested block included."""
    from shapefirst.world.card import write_card

    for name in ("model_index.json", "README.md"):
        (tmp_path / name).write_bytes((folder / name).read_bytes())
    scale = json.loads((folder / "recipe.json").read_text())["recommended"]["guidance_scale"]
    (tmp_path / "README.md").write_text("# old\n\n```python\nbroken()\n```\n")
    card = write_card(tmp_path, scale, keep=folder / "README.md")
    assert card.read_text() == (folder / "README.md").read_text()


def test_card_generator_replaces_a_broken_snippet_and_writes_a_new_card(tmp_path):
    from shapefirst.world.card import write_card

    (tmp_path / "model_index.json").write_bytes((WORLD / "model_dit" / "model_index.json").read_bytes())
    old = tmp_path / "old.md"
    old.write_text("# card\n\n```python\npipe = PixArtAlphaPipeline.from_pretrained('x')\n```\n\nmore text\n")
    text = write_card(tmp_path, 2.5, keep=old).read_text()
    assert "torch_dtype=torch.float32" in text and "guidance_scale=2.5" in text and "from_pretrained('x')" not in text
    assert text.startswith("# card") and text.endswith("more text\n")
    fresh = write_card(tmp_path, None).read_text()
    assert "torch_dtype=torch.float32" in fresh and "guidance_scale=7.5" in fresh and fresh.startswith("# ")


def test_a_reship_keeps_the_card_and_writes_a_snippet_that_runs(tmp_path):
    """train_dit.ship over a folder whose card has the old, failing snippet: the card's text stays, its snippet is
    made anew, and it runs as written on the shipped copy (float16 T5 and transformer)."""
    from shapefirst.world.train_dit import DitRecipe, ship, train_dit

    model = train_dit(tmp_path / "train", DitRecipe.tiny())
    dest = tmp_path / "model_dit"
    dest.mkdir()
    old = (WORLD / "model_dit" / "README.md").read_text()
    old = re.sub(r"```python\n.*?```", '```python\nfrom diffusers import PixArtAlphaPipeline\n'
                 'pipe = PixArtAlphaPipeline.from_pretrained("path/to/this/folder")\n```', old, count=1, flags=re.S)
    (dest / "README.md").write_text(old)
    ship(model, dest, {"guidance_scale": 2.5})
    card = (dest / "README.md").read_text()
    assert card.split("```python")[0] == old.split("```python")[0] and card.endswith(old.split("```")[-1])
    assert "guidance_scale=2.5" in card and "torch_dtype=torch.float32" in card
    test_card_snippet_runs_as_written_without_shapefirst(dest)
