"""Load a text-to-image pipeline: "embedded" (the shipped shapes world), a local diffusers folder,
or a hub id; detect its family; refuse what shapefirst does not support, with a one-line fix.

The families are declared in shapefirst.families (SD 1.x/2.x, SDXL, PixArt-alpha/sigma, SD3, and the transformer,
video and separate-call families since). Schedulers per family (FAMILY_SCHEDULERS): all of SCHEDULERS for the
DDPM-type families, only "euler" (flow matching) for SD3, none for the families that keep their own."""
from __future__ import annotations

from contextlib import contextmanager

import json
import os
from pathlib import Path

import torch

from .errors import ShapefirstError
from .schedules import DEFAULT_SHAPE_TOLERANCE
from .families import (  # noqa: F401 (public here too)
    DECLARED,
    FAMILIES,
    SUPPORTED,
    family_by_structure,
    family_of,
    family_of_pipe,
    listed_family,
)
from .devices import device as checked
from . import world

PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")


def embedded_model_path() -> Path:
    """The folder of the shipped shapes-world model (a plain diffusers StableDiffusionPipeline)."""

    return world.model_path()


def _embedded_dit() -> Path:
    """The shipped transformer world's folder; a one-line error while it is not shipped (issue #17)."""

    path = world.dit_model_path()
    if not (path / "model_index.json").exists():
        raise ShapefirstError("the shapes world on a diffusion transformer (embedded-dit) "
                              "is not shipped in this version",
                              "train it with `shapefirst train --arch dit --dest DIR` and pass --model DIR")
    return path


def world_folder(model: str) -> Path | None:
    """The folder of a shapes-world model: the shipped one ("embedded"), or one `shapefirst train` wrote
    (UNet or --arch dit: its recipe.json beside the world CLIP in clip/); None for any other model. A
    shapes-world model gets the world's prompts, judge, CLIP and recommended settings."""
    if model == "embedded":
        return embedded_model_path()
    if model == "embedded-dit":
        return _embedded_dit()
    folder = Path(model).expanduser()
    if (folder / "recipe.json").is_file() and (folder / "clip" / "config.json").is_file():
        return folder
    return None


def world_clip(model: str) -> Path | None:
    """The world CLIP folder of a shapes-world model (its own clip/, else the embedded model's: the same CLIP,
    so a shipped transformer world need not carry a copy); None for any other model. It carries its own
    tokenizer (a transformer world's tokenizer/ is T5)."""
    folder = world_folder(model)
    if folder is None:
        return None
    return folder / "clip" if (folder / "clip" / "config.json").is_file() else embedded_model_path() / "clip"


def pick_device(device: str | None = None) -> str:
    """The device asked for (checked: shapefirst.devices.device), else the best this machine has."""

    device = checked(device)
    if device is not None:
        return device
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def pick_dtype(dtype: str | None, device: str) -> torch.dtype:
    if dtype in (None, "auto"):
        return torch.float16 if device.startswith("cuda") else torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype not in table:
        raise ShapefirstError(f"unknown dtype {dtype!r}", f"use one of {sorted(table)}")
    return table[dtype]


def _check_folder(path: Path, allow_pickle: bool) -> str:
    """Validate a local diffusers folder; return its pipeline class name."""
    if not path.exists():
        raise ShapefirstError(f"model folder {path} does not exist",
                              "pass --model embedded, a diffusers folder or a hub id")
    if not path.is_dir():
        raise ShapefirstError(f"model path {path} is a file, not a diffusers folder",
                              "pass the folder that holds model_index.json")
    index = path / "model_index.json"
    if not index.exists():
        raise ShapefirstError(f"{path} is not a diffusers pipeline folder (no model_index.json)",
                              "pass the folder that holds model_index.json, e.g. one saved by pipe.save_pretrained()")
    try:
        cls = json.loads(index.read_text())["_class_name"]
    except (ValueError, KeyError) as e:
        raise ShapefirstError(f"{index} is not valid JSON with a _class_name",
                              "re-save the pipeline with save_pretrained()") from e
    _check_components(path, json.loads(index.read_text()))
    _check_widths(path)
    weights = [p for p in path.rglob("*")
               if p.is_file() and (p.suffix in PICKLE_SUFFIXES or p.suffix == ".safetensors")]
    safes = [p for p in weights if p.suffix == ".safetensors"]
    pickles = [p for p in weights if p.suffix in PICKLE_SUFFIXES]
    if pickles and not safes and not allow_pickle:
        raise ShapefirstError(f"{path} has only pickle weights ({pickles[0].name}), which can run code when loaded",
                              "convert them to safetensors, or pass --allow-pickle if you trust the source")
    for p in safes:
        _check_safetensors(p)
    return cls


# what a component's subfolder must hold, by the library class model_index.json names
_TOKENIZER_FILES = (("tokenizer.json",), ("vocab.json", "merges.txt"), ("spiece.model",), ("vocab.txt",),
                    ("tokenizer.model",))  # the last: SentencePiece models by that name (Kolors' ChatGLM tokenizer)


def _check_components(path: Path, index: dict) -> None:
    """Every component model_index.json lists has its subfolder and the files its loader reads."""
    for name, spec in index.items():
        if name.startswith("_") or not isinstance(spec, list) or len(spec) != 2 or spec[0] is None:
            continue
        lib, cls = spec
        sub = path / name
        if not sub.is_dir():
            raise ShapefirstError(f"model folder {path} has no {name}/ subfolder, "
                                  f"which model_index.json lists ({cls})",
                                  f"copy the {name}/ folder of the model into {path}, "
                                  "or re-save it with save_pretrained()")
        if "Tokenizer" in cls:
            if not any(all((sub / f).is_file() for f in files) for files in _TOKENIZER_FILES):
                raise ShapefirstError(f"{sub} holds no tokenizer files "
                                      "(needs tokenizer.json, or vocab.json and merges.txt)",
                                      f"copy the tokenizer files into {sub}")
            continue
        need = "scheduler_config.json" if "Scheduler" in cls else (
            "preprocessor_config.json" if "Processor" in cls or "FeatureExtractor" in cls else "config.json")
        if not (sub / need).is_file():
            raise ShapefirstError(f"{sub} has no {need} (the {cls} component's configuration)",
                                  f"copy {name}/{need} of the model into {sub}, or re-save it with save_pretrained()")


def _check_widths(path: Path) -> None:
    """SD 1.x/2.x folders: unet/config.json's cross_attention_dim is the text encoder's hidden_size (a UNet that
    projects the text states first, encoder_hid_dim_type, takes another width: not checked)."""
    try:
        unet = json.loads((path / "unet" / "config.json").read_text())
        te = json.loads((path / "text_encoder" / "config.json").read_text())
    except (OSError, ValueError):
        return
    if (path / "text_encoder_2").exists():
        return
    if unet.get("encoder_hid_dim_type") is not None:  # the UNet projects the text states first (Kolors: text_proj)
        return
    dim, width = unet.get("cross_attention_dim"), te.get("hidden_size", te.get("d_model"))
    if isinstance(dim, int) and isinstance(width, int) and dim != width:
        raise ShapefirstError(f"{path}/unet/config.json has cross_attention_dim {dim}, but text_encoder/config.json "
                              f"has hidden_size {width}",
                              f"set cross_attention_dim to the width the UNet's weights were saved with (the text "
                              f"encoder's {width} if they match it), "
                              "or use the text encoder the UNet was trained with")


def _shape_error(path: Path, e: Exception) -> ShapefirstError | None:
    """diffusers' "expected shape X, but got Y" for a weight -> which component, which weight, which shapes."""
    import re

    m = re.search(r"(\S+) expected shape torch\.Size\((\[[^\]]*\])\), but got torch\.Size\((\[[^\]]*\])\)", str(e))
    if m is None:
        return None
    name, want, got = m.groups()
    comp = "a component"
    from safetensors import safe_open

    for f in path.rglob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            if name in st.keys():
                comp = f"{f.parent.name}/"
                break
    return ShapefirstError(f"the weights of {comp} do not match its config.json: {name} is saved as {got}, but the "
                           f"config asks for {want}",
                           f"fix {comp}config.json to the saved shapes (or re-save the model)")


def check_text_width(pipe) -> None:
    """SD 1.x/2.x: the UNet's cross_attention_dim must be the text encoder's width (else the first
    call fails inside attention with a matrix-shape error)."""
    unet, te = getattr(pipe, "unet", None), getattr(pipe, "text_encoder", None)
    if unet is None or te is None or getattr(pipe, "text_encoder_2", None) is not None:
        return
    if unet.config.get("encoder_hid_dim_type") is not None:  # it projects the text states first (Kolors: text_proj)
        return
    dim = unet.config.get("cross_attention_dim")
    width = getattr(te.config, "hidden_size", None)
    if isinstance(dim, int) and isinstance(width, int) and dim != width:
        raise ShapefirstError(f"unet/config.json has cross_attention_dim {dim}, "
                              f"but the text encoder's hidden_size is {width}",
                              f"use a UNet trained with this text encoder (cross_attention_dim {width}), or the text "
                              f"encoder the UNet was trained with")


def _check_safetensors(p: Path) -> None:
    from safetensors import safe_open

    try:
        with safe_open(str(p), "pt") as f:
            f.keys()
    except Exception as e:  # safetensors raises its own error types
        raise ShapefirstError(f"weights file {p} is corrupt or not safetensors ({type(e).__name__})",
                              "re-download or re-save the model") from e


def load_pipeline(model: str = "embedded", device: str | None = None, dtype: str | None = None,
                  allow_pickle: bool = False, scheduler: str | None = None):
    """Load a supported text-to-image pipeline, ready for shapefirst.

    model: "embedded", a local diffusers folder, or a hub id ("org/name", needs network or cache).
    Weights load from safetensors only unless allow_pickle=True."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    dev = pick_device(device)
    dt = pick_dtype(dtype, dev)
    if model == "embedded":
        path = embedded_model_path()
        if not (path / "model_index.json").exists():
            raise ShapefirstError("the embedded shapes-world model is not in this installation",
                                  "train it with `shapefirst train` or pass --model PATH")
        model = str(path)
    elif model == "embedded-dit":
        model = str(_embedded_dit())
    local = Path(model).expanduser()
    looks_local = local.exists() or model.startswith((".", "/", "~")) or model.count("/") != 1
    if looks_local:
        cls_name = _check_folder(local, allow_pickle)
        family_of(cls_name)
        source = str(local)
    else:
        source = model
        cls_name = None
    # SD 1.x/2.x carry a safety checker component; the other families have none (would warn)
    no_checker = {} if cls_name is not None and family_of(cls_name) != "sd" else \
        {"safety_checker": None, "requires_safety_checker": False}
    try:
        pipe = diffusers.DiffusionPipeline.from_pretrained(source, dtype=dt, use_safetensors=not allow_pickle,
                                                           **no_checker)
    except (OSError, ValueError, EnvironmentError) as e:
        if not looks_local:
            offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
            why = "HF_HUB_OFFLINE is set" if offline else "no network or cache"
            raise ShapefirstError(f"cannot load hub model {model!r} ({why})",
                                  "download it once with network access (it is then cached) or pass a local folder; "
                                  "HF_HUB_OFFLINE=1 uses only the cache") from e
        shape = _shape_error(local, e)
        if shape is not None:
            raise shape from e
        first = " ".join(str(e).split())
        raise ShapefirstError(f"cannot load {model}: {first if len(first) <= 300 else first[:297] + '...'}",
                              "check that the folder is a complete diffusers pipeline") from e
    family_of_pipe(pipe)
    check_text_width(pipe)
    pipe.to(dev)
    pipe.set_progress_bar_config(disable=True)
    return pipe


SCHEDULERS = {
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}),
    "dpm++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "unipc": ("UniPCMultistepScheduler", {}),
}


# Per family: the short names that make sense (families.Family.schedulers), and family-specific classes for a
# name. SD3 is a flow-matching (rectified flow) model: the VP/DDPM schedulers above would integrate the wrong
# ODE, so only "euler" (FlowMatchEulerDiscreteScheduler) is offered there.
FAMILY_SCHEDULERS = {f.name: f.schedulers for f in DECLARED}
FAMILY_SCHEDULER_CLASSES = {
    "sd3": {"euler": ("FlowMatchEulerDiscreteScheduler", {})},
}


def schedulers_for(pipe) -> tuple[str, ...]:
    """Scheduler short names available for this pipeline's family (all of SCHEDULERS for a
    pipeline of no known family)."""
    try:
        fam = family_of_pipe(pipe)
    except ShapefirstError:
        return tuple(SCHEDULERS)
    return FAMILY_SCHEDULERS[fam]


@contextmanager
def scheduler_for(pipe, name: str | None):
    """The pipeline with scheduler `name` inside the block (set_scheduler), its own scheduler back after."""
    kept = pipe.scheduler
    try:
        yield set_scheduler(pipe, name)
    finally:
        pipe.scheduler = kept


def set_scheduler(pipe, name: str | None):
    """Swap the pipeline's scheduler by short name, keeping its noise schedule and prediction type.

    The names allowed depend on the family (FAMILY_SCHEDULERS): SD3 takes only "euler"."""
    if name is None:
        return pipe
    if name not in SCHEDULERS:
        raise ShapefirstError(f"unknown scheduler {name!r}", f"use one of: {', '.join(SCHEDULERS)}")
    import diffusers

    try:
        fam = family_of_pipe(pipe)
    except ShapefirstError:
        fam = None
    if fam is not None and name not in FAMILY_SCHEDULERS[fam]:
        names = FAMILY_SCHEDULERS[fam]
        raise ShapefirstError(f"scheduler {name} is not available for the {fam} family",
                              f"use: {', '.join(names)}" if names else "drop the scheduler: this family runs its own")
    cls_name, extra = FAMILY_SCHEDULER_CLASSES.get(fam, {}).get(name, SCHEDULERS[name])
    cls = getattr(diffusers, cls_name)
    pipe.scheduler = cls.from_config(pipe.scheduler.config, **extra)
    return pipe


DIFFUSERS_GUIDANCE = 7.5  # diffusers' Stable Diffusion default, for a user's own model


def recommended(model: str = "embedded") -> dict:
    """A shapes-world model's recommended settings (recipe.json's "recommended": guidance scale and the
    rule that chose it); {} for any other model, or a world model that has none yet."""
    folder = world_folder(model)
    if folder is None:
        return {}
    try:
        return dict(json.loads((folder / "recipe.json").read_text()).get("recommended") or {})
    except (OSError, ValueError):
        return {}


def default_guidance(model: str) -> float:
    """The guidance scale used when the user gives none: the embedded model's recommended scale
    (chosen from its guidance curve, stored in its folder), else diffusers' 7.5."""
    return float(recommended(model).get("guidance_scale", DIFFUSERS_GUIDANCE))


def default_shape_tolerance(model: str) -> float:
    """The shape-settled adaptive stop's tolerance for `--adaptive-shape auto`: the embedded model's calibrated
    one (recipe.json's recommended "adaptive_shape_tolerance", beside its guidance scale), else
    schedules.DEFAULT_SHAPE_TOLERANCE."""
    return float(recommended(model).get("adaptive_shape_tolerance", DEFAULT_SHAPE_TOLERANCE))
