"""The shapes world: a synthetic text-to-image world whose images can be judged exactly."""
from pathlib import Path


def model_path() -> Path:
    """Folder of the shipped shapes-world model: `StableDiffusionPipeline.from_pretrained(model_path())`."""
    return Path(__file__).parent / "model"
