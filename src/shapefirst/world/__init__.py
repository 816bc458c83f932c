"""The shapes world: a synthetic text-to-image world whose images can be judged exactly."""
from pathlib import Path


def model_path() -> Path:
    """Folder of the shipped shapes-world model: `StableDiffusionPipeline.from_pretrained(model_path())`."""
    return Path(__file__).parent / "model"


def dit_model_path() -> Path:
    """Folder of the shapes world on a diffusion transformer (`--model embedded-dit`, shapefirst train --arch dit):
    `PixArtAlphaPipeline.from_pretrained(dit_model_path())`. Not shipped while its folder is absent."""
    return Path(__file__).parent / "model_dit"
