"""FID for real models: torchmetrics' FrechetInceptionDistance on torch-fidelity's FID Inception v3,
with the Inception weights read from a file the user supplies (nothing is downloaded).

    from shapefirst.fid import fid, Fid, load_inception
    value = fid(real_images, fake_images, "inception-2015-12-05.safetensors")   # [N, H, W, 3] in [0, 1]

The extractor is torchmetrics' `NoTrainInceptionV3` (a subclass of torch-fidelity's
`FeatureExtractorInceptionV3`), 2048-d pool features, exactly what `FrechetInceptionDistance(feature=2048)`
builds. Images are quantised like torchmetrics' `normalize=True` path (`(x * 255).byte()`) and resized
to 299 inside the network. `antialias=True` (the default) is torchmetrics' default resize; `antialias=False`
is torch-fidelity's TF1-compatible bilinear resize, the one behind the published FID numbers.

Sample count caveat: FID is biased upwards at small n (the bias shrinks roughly like 1/n and depends on
the model), so values are only comparable at equal n, and at n <= 2048 per side the 2048x2048
covariance is rank-deficient. Report n (per side) with every FID number, e.g. "FID 23.4 (n=500 vs
500)", and compare settings at the same n. FID needs n >= 2 per side to be defined at all.

Getting the weights file offline. The weights are torch-fidelity's conversion of the TF Inception
graph of 2015-12-05, released as
https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth
(torch.hub caches it as ~/.cache/torch/hub/checkpoints/weights-inception-2015-12-05-6726825d.pth after
any torch-fidelity/torchmetrics FID run; pytorch-fid's pt_inception-2015-12-05-6726825d.pth carries the
same hash prefix and should load the same way, untested). Download it on any machine with network
access, then convert it once:

    import torch; from safetensors.torch import save_file
    sd = torch.load("weights-inception-2015-12-05-6726825d.pth", map_location="cpu", weights_only=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, "inception-2015-12-05.safetensors")

`.pth`/`.pt`/`.bin` files are pickles (they can run code when loaded): `load_inception` refuses them
unless `allow_pickle=True`, and even then reads them with `torch.load(weights_only=True)`.
"""
from __future__ import annotations

import importlib
import importlib.util
import io
import sys
from pathlib import Path

import numpy as np
import torch

from .errors import ShapefirstError
from .models import PICKLE_SUFFIXES

WEIGHTS_URL_NAME = "weights-inception-2015-12-05-6726825d.pth"
NUM_FEATURES = 2048
_CONVERT_FIX = (f"download {WEIGHTS_URL_NAME} (torch-fidelity v0.2.0 release) and convert it to .safetensors "
                "with the 3-line snippet in the shapefirst.fid docstring")
_SKIP_KEY = "__shapefirst_skip_load__"  # construction-time placeholder: weights are loaded afterwards


# ---------------------------------------------------------------------------------------------- imports

def _torchmetrics_fid():
    """torchmetrics.image.fid with torch-fidelity importable, or a ShapefirstError saying what to install.

    torchmetrics' FrechetInceptionDistance takes the feature network publicly (`feature=` a module, which
    `Fid` uses), but its module imports torch-fidelity's Inception at import time, and the network itself
    is torch-fidelity's. The one shim is `_import_fidelity_inception` (see there)."""
    install = "pip install torchmetrics && pip install --no-deps torch-fidelity"
    if importlib.util.find_spec("torchmetrics") is None:
        raise ShapefirstError("FID needs torchmetrics, which is not installed", install)
    spec = importlib.util.find_spec("torch_fidelity")
    if spec is None:
        raise ShapefirstError("FID needs torch-fidelity (the FID Inception v3), which is not installed", install)
    try:
        _import_fidelity_inception(spec)
        tm_fid = importlib.import_module("torchmetrics.image.fid")
    except ImportError as e:
        raise ShapefirstError(f"cannot import torchmetrics' FID ({type(e).__name__}: {e})", install) from e
    if not hasattr(tm_fid, "NoTrainInceptionV3") or not hasattr(tm_fid, "FrechetInceptionDistance"):
        raise ShapefirstError("this torchmetrics has no NoTrainInceptionV3 / FrechetInceptionDistance", install)
    return tm_fid


def _import_fidelity_inception(spec):
    """Import torch_fidelity.feature_extractor_inceptionv3 (the FID Inception), which needs only torch.

    THE SHIM (the only one): torch-fidelity's package __init__ eagerly imports its CLIP/DINOv2/dataset
    modules, which need torchvision. Where torchvision is missing or broken (e.g. a CPU-only torch with no
    matching torchvision wheel) and `import torch_fidelity` fails, the real package is registered in
    sys.modules from its own spec and path WITHOUT running its __init__, so that its submodule can be
    imported; nothing else is replaced and no attribute of torchmetrics is read or written."""
    if "torch_fidelity" not in sys.modules:
        try:
            import torch_fidelity  # noqa: F401
        except Exception:  # torchvision missing/broken: register the bare package
            pkg = importlib.util.module_from_spec(spec)  # the real package's spec, its __init__ not executed
            pkg.__path__ = list(spec.submodule_search_locations or [])
            sys.modules["torch_fidelity"] = pkg
    return importlib.import_module("torch_fidelity.feature_extractor_inceptionv3")


_CLASS = None


def _inception_class():
    """NoTrainInceptionV3 that can be constructed without weights (and so without a download)."""
    global _CLASS
    if _CLASS is None:
        tm_fid = _torchmetrics_fid()

        class FidInceptionV3(tm_fid.NoTrainInceptionV3):
            """torchmetrics' NoTrainInceptionV3: uint8 [N, 3, H, W] -> float32 [N, 2048]."""

            num_features = NUM_FEATURES

            def load_state_dict(self, state_dict, *args, **kwargs):
                if list(state_dict.keys()) == [_SKIP_KEY]:
                    return None  # called by torch-fidelity's __init__; real weights come afterwards
                return super().load_state_dict(state_dict, *args, **kwargs)

        _CLASS = FidInceptionV3
    return _CLASS


def _build(antialias: bool):
    buf = io.BytesIO()
    torch.save({_SKIP_KEY: torch.zeros(())}, buf)  # torch-fidelity torch.load()s this; we made it
    buf.seek(0)
    return _inception_class()(name="inception-v3-compat", features_list=[str(NUM_FEATURES)],
                              feature_extractor_weights_path=buf, antialias=antialias)


def random_inception(seed: int = 0, antialias: bool = True):
    """The FID Inception v3 with random weights (He-normal convs, so features keep a usable scale).

    For tests and for listing the expected state-dict keys; never for reported numbers."""
    model = _build(antialias)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Conv2d):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
            elif isinstance(m, torch.nn.BatchNorm2d):
                m.weight.copy_(1 + 0.1 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
            elif isinstance(m, torch.nn.Linear):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) / m.in_features ** 0.5)
                m.bias.zero_()
    return model


# ------------------------------------------------------------------------------------------ weights

def _read_state_dict(path: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    if not path.exists():
        raise ShapefirstError(f"Inception weights file {path} does not exist", _CONVERT_FIX)
    if path.is_dir():
        raise ShapefirstError(f"Inception weights path {path} is a folder, not a file",
                              "pass the .safetensors file itself")
    with open(path, "rb") as f:
        head = f.read(8)
    # torch.save writes a zip ("PK\x03\x04"); the legacy format is a raw pickle ("\x80" + protocol 2-5).
    # A safetensors file starts with its 8-byte header length, so "\x80" alone is ambiguous: try it first.
    if path.suffix.lower() in PICKLE_SUFFIXES or head[:4] == b"PK\x03\x04":
        return _read_pickle(path, allow_pickle)
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as e:  # safetensors raises its own error types
        if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
            return _read_pickle(path, allow_pickle)
        raise ShapefirstError(f"Inception weights {path} are not a readable safetensors file "
                              f"({type(e).__name__}: {str(e)[:80]})", _CONVERT_FIX) from e


def _read_pickle(path: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    if not allow_pickle:
        raise ShapefirstError(f"Inception weights {path.name} are a pickle (torch.save) file, which can run "
                              "code when loaded",
                              "convert it to .safetensors with the 3-line snippet in the shapefirst.fid "
                              "docstring, or pass allow_pickle=True if you trust the file")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ShapefirstError(f"cannot read pickle weights {path} with torch.load(weights_only=True) "
                              f"({type(e).__name__})", _CONVERT_FIX) from e
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ShapefirstError(f"{path} does not hold a state dict of tensors", _CONVERT_FIX)
    return dict(sd)


def _match_keys(sd: dict, expected: dict, path: Path) -> dict:
    """Check names and shapes against the architecture; tolerate a 'module.'/'inception.' prefix and
    missing BatchNorm num_batches_tracked counters (unused in eval; older conversions omit them)."""
    def fits(d):
        keys = set(d)
        return keys <= set(expected) and all(k in keys for k in expected if not k.endswith("num_batches_tracked"))

    if not fits(sd):
        for prefix in ("module.", "inception.", "module.inception."):
            if all(k.startswith(prefix) for k in sd):
                stripped = {k[len(prefix):]: v for k, v in sd.items()}
                if fits(stripped):
                    sd = stripped
                    break
    missing = [k for k in expected if k not in sd and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in sd if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        raise ShapefirstError(f"{path.name} is not the FID Inception v3 state dict: keys {'; '.join(parts)}",
                              f"expected the {len(expected)} keys of torch-fidelity's FeatureExtractorInceptionV3 "
                              f"(Conv2d_1a_3x3.conv.weight ... Mixed_7c.branch_pool.bn.running_var, fc.weight, "
                              f"fc.bias) as in {WEIGHTS_URL_NAME}; {_CONVERT_FIX}")
    bad = [f"{k} {tuple(v.shape)} != {tuple(expected[k].shape)}" for k, v in sd.items()
           if tuple(v.shape) != tuple(expected[k].shape)]
    if bad:
        raise ShapefirstError(f"{path.name} has {len(bad)} tensors of the wrong shape (e.g. {bad[0]})",
                              f"this is a different network; {_CONVERT_FIX}")
    nonfloat = [k for k, v in sd.items() if not k.endswith("num_batches_tracked") and not v.is_floating_point()]
    if nonfloat:
        raise ShapefirstError(f"{path.name} has non-float weights (e.g. {nonfloat[0]})", _CONVERT_FIX)
    return sd


def load_inception(path: str | Path, allow_pickle: bool = False, antialias: bool = True):
    """torchmetrics' FID Inception v3 (torch-fidelity architecture) with weights from `path`.

    `path`: a .safetensors state dict (see the module docstring for making one); pickle files
    (.pth/.pt/.bin/.ckpt/.pkl, or torch.save content under any name) only with allow_pickle=True.
    Returns an eval-mode module mapping uint8 [N, 3, H, W] to float32 [N, 2048] (resized to 299
    inside). Raises ShapefirstError for a missing file, a pickle, a non-safetensors file, or wrong
    keys/shapes."""
    path = Path(path)
    sd = _read_state_dict(path, allow_pickle)  # check the file before building the network
    model = _build(antialias)
    sd = _match_keys(sd, model.state_dict(), path)
    model.load_state_dict(sd, strict=False)  # strictness checked above (num_batches_tracked optional)
    model.requires_grad_(False)
    return model.eval()


# ---------------------------------------------------------------------------------------------- FID

class _Float01(torch.nn.Module):
    """float [N, 3, H, W] in [0, 1] -> uint8 like torchmetrics' normalize=True -> Inception features.

    (torchmetrics skips its own uint8 conversion for a user-supplied feature module.)"""

    def __init__(self, inception):
        super().__init__()
        self.inception = inception
        self.num_features = NUM_FEATURES  # so torchmetrics does not probe with a dummy image

    def forward(self, x):
        return self.inception((x * 255).byte())


def _as_batch(images, side: str) -> torch.Tensor:
    x = np.asarray(images)
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ShapefirstError(f"{side} images have shape {x.shape}", "pass a float array [N, H, W, 3] in [0, 1]")
    if not np.issubdtype(x.dtype, np.floating):
        raise ShapefirstError(f"{side} images are {x.dtype}, not floats", "pass floats in [0, 1] (e.g. uint8 / 255)")
    if not np.isfinite(x).all():
        raise ShapefirstError(f"{side} images contain NaN or inf", "check the generator output")
    lo, hi = float(x.min(initial=0.0)), float(x.max(initial=0.0))
    if lo < -1e-3 or hi > 1 + 1e-3:
        raise ShapefirstError(f"{side} images range over [{lo:.3g}, {hi:.3g}], not [0, 1]",
                              "map them to [0, 1] first (e.g. (x + 1) / 2 for [-1, 1] images)")
    return torch.from_numpy(np.clip(x, 0.0, 1.0).astype(np.float32)).permute(0, 3, 1, 2)


class Fid:
    """FID accumulator: `update(images, real=...)` in any number of batches, then `compute()`.

    `weights`: a weights file (see `load_inception`) or an already loaded Inception module. Every
    number it returns should be reported with its n per side (`self.n_real`, `self.n_fake`)."""

    def __init__(self, weights, allow_pickle: bool = False, antialias: bool = True, batch_size: int = 32):
        tm_fid = _torchmetrics_fid()
        inception = weights if isinstance(weights, torch.nn.Module) else \
            load_inception(weights, allow_pickle=allow_pickle, antialias=antialias)
        self.inception = inception
        self.batch_size = int(batch_size)
        self.metric = tm_fid.FrechetInceptionDistance(feature=_Float01(inception), normalize=True,
                                                      reset_real_features=False)
        self.n_real = self.n_fake = 0

    @torch.no_grad()
    def update(self, images, real: bool) -> None:
        x = _as_batch(images, "real" if real else "fake")
        for i in range(0, len(x), self.batch_size):
            self.metric.update(x[i:i + self.batch_size], real=real)
        if real:
            self.n_real += len(x)
        else:
            self.n_fake += len(x)

    def compute(self) -> float:
        if self.n_real < 2 or self.n_fake < 2:
            raise ShapefirstError(f"FID needs at least 2 images per side (got {self.n_real} real, "
                                  f"{self.n_fake} fake)",
                                  "pass more images; FID is biased at small n, so report n with every number")
        return float(self.metric.compute())

    def reset_fake(self) -> None:
        """Forget the generated images, keep the real ones (one reference set, many configurations)."""
        self.metric.reset()
        self.n_fake = 0

    def reset(self) -> None:
        self.metric.reset_real_features = True
        try:
            self.metric.reset()
        finally:
            self.metric.reset_real_features = False
        self.n_real = self.n_fake = 0


def read_image_folder(folder: str | Path, size: int = 299) -> np.ndarray:
    """Every PNG/JPEG/WebP in `folder` (sorted), RGB, resized to size x size: [N, size, size, 3] in [0, 1]."""
    from PIL import Image

    folder = Path(folder)
    if not folder.is_dir():
        raise ShapefirstError(f"real-image folder {folder} does not exist or is not a folder",
                              "pass a folder of PNG/JPEG images with --real")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"))
    if len(files) < 2:
        raise ShapefirstError(f"real-image folder {folder} holds {len(files)} images; FID needs at least 2",
                              "put the reference images (PNG/JPEG) in it; report n with every FID")
    out = []
    for p in files:
        try:
            with Image.open(p) as im:
                out.append(np.asarray(im.convert("RGB").resize((size, size), Image.BICUBIC), np.float32) / 255.0)
        except OSError as e:
            raise ShapefirstError(f"cannot read image {p} ({e})", "remove or replace the file") from e
    return np.stack(out)


def fid(real_images, fake_images, weights, allow_pickle: bool = False, antialias: bool = True,
        batch_size: int = 32) -> float:
    """FID between two sets of float images [N, H, W, 3] in [0, 1] (n >= 2 each; report n with it)."""
    n_real, n_fake = len(np.asarray(real_images)), len(np.asarray(fake_images))
    if n_real < 2 or n_fake < 2:
        raise ShapefirstError(f"FID needs at least 2 images per side (got {n_real} real, {n_fake} fake)",
                              "pass more images; FID is biased at small n, so report n with every number")
    m = Fid(weights, allow_pickle=allow_pickle, antialias=antialias, batch_size=batch_size)
    m.update(real_images, real=True)
    m.update(fake_images, real=False)
    return m.compute()
