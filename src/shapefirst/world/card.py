"""A shapes-world model folder's card (README.md): its first ```python block shows how to use the folder in
plain diffusers, and is written here, so that every (re)shipped or trained folder gets a snippet that runs.

`torch_dtype=torch.float32`: the folders store weights in float16 (the UNet, VAE and transformer; the shipped
T5 too) and the text encoders as saved; without it diffusers loads its models in float32 while transformers 5
keeps a float16 text encoder ("auto" dtype), and the call fails on the mixed dtypes.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

PLACEHOLDER = "path/to/this/folder"
PROMPT = "a large red striped circle on the left"
DEFAULT_SCALE = 7.5  # diffusers' default, for a trained folder that has no recommended scale yet
_CALL_KWARGS = {  # what a pipeline class needs beyond prompt and scale at the world's 64x64
    "StableDiffusionPipeline": "",
    "PixArtAlphaPipeline": ", height=64, width=64,\n             use_resolution_binning=False, clean_caption=False",
    "WanPipeline": "",  # its call arguments come from recipe.json's recommended.call
}
_OUTPUT = {"WanPipeline": ("video", "frames", "a large red striped circle on the left, moving up")}
_BLOCK = re.compile(r"```python\n.*?```", re.S)


def snippet(folder: str | Path, guidance: float | None = None) -> str:
    """The card's ```python block for the model folder (its pipeline class from model_index.json); `guidance`:
    the recommended scale, shown as such (None: diffusers' default)."""
    cls = json.loads((Path(folder) / "model_index.json").read_text())["_class_name"]
    if cls not in _CALL_KWARGS:
        raise ValueError(f"no card snippet for {cls}: add its call to shapefirst.world.card._CALL_KWARGS")
    scale, note = (DEFAULT_SCALE, "diffusers' default") if guidance is None else (guidance, "its recommended scale")
    name, attr, prompt = _OUTPUT.get(cls, ("image", "images", PROMPT))
    call = _recommended_call(folder)
    kwargs = _CALL_KWARGS[cls] + "".join(f", {k}={v!r}" for k, v in call.items())
    return ("```python\n"
            "import torch\n"
            f"from diffusers import {cls}\n"
            f'pipe = {cls}.from_pretrained("{PLACEHOLDER}", torch_dtype=torch.float32)'
            "  # no shapefirst import needed\n"
            f'{name} = pipe("{prompt}", guidance_scale={float(scale)!r}{kwargs}).{attr}[0]  # {note}\n'
            "```")


def _recommended_call(folder) -> dict:
    """recipe.json's recommended.call (the arguments a clip needs: height, width, num_frames, ...), or {}."""
    path = Path(folder) / "recipe.json"
    return json.loads(path.read_text()).get("recommended", {}).get("call", {}) if path.is_file() else {}


def with_snippet(card: str | None, block: str, title: str) -> str:
    """`card` with its first ```python block replaced by `block`; a short new card when there is none."""
    if card and _BLOCK.search(card):
        return _BLOCK.sub(lambda _: block, card, count=1)
    return f"# {title}\n\nA plain diffusers folder:\n\n{block}\n" + (f"\n{card}" if card else "")


def write_card(folder: str | Path, guidance: float | None = None, keep: str | Path | None = None,
               title: str = "A shapes-world model") -> Path:
    """Write folder/README.md: the card at `keep` (if it is a file: e.g. the card of the folder being
    replaced) with its snippet made anew, else a short card with the snippet."""
    folder = Path(folder)
    old = Path(keep).read_text(encoding="utf-8") if keep is not None and Path(keep).is_file() else None
    path = folder / "README.md"
    path.write_text(with_snippet(old, snippet(folder, guidance), title), encoding="utf-8")
    return path
