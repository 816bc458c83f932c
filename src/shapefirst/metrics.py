"""Quality metrics: CLIP scores (text and image), L1/PSNR, Frechet/kernel distances, judged
accuracy with confidence intervals.

CLIP: any transformers CLIPModel folder (the shapes world ships its own in `<model>/clip`; for
real models the user passes a local CLIP folder). Images are [N, H, W, 3] floats in [0, 1].
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import ShapefirstError
from .world.judge import judge


@dataclass
class Clip:
    """A CLIP model + tokenizer + the image preprocessing it was trained with."""

    model: object
    tokenizer: object
    size: int
    mean: tuple
    std: tuple

    @classmethod
    def load(cls, folder: str | Path, tokenizer_folder: str | Path | None = None) -> "Clip":
        from transformers import CLIPModel, CLIPTokenizer

        folder = Path(folder)
        if not (folder / "config.json").exists():
            raise ShapefirstError(f"{folder} is not a CLIP model folder (no config.json)",
                                  "pass a folder saved by CLIPModel.save_pretrained()")
        model = CLIPModel.from_pretrained(folder, torch_dtype=torch.float32).eval()
        tok_dir = Path(tokenizer_folder) if tokenizer_folder else folder
        if not (tok_dir / "vocab.json").exists() and (folder.parent / "tokenizer" / "vocab.json").exists():
            tok_dir = folder.parent / "tokenizer"
        tokenizer = CLIPTokenizer.from_pretrained(str(tok_dir))
        pre = folder / "preprocessor_config.json"
        size, mean, std = model.config.vision_config.image_size, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
        if pre.exists():
            import json

            cfg = json.loads(pre.read_text())
            mean, std = tuple(cfg.get("image_mean", mean)), tuple(cfg.get("image_std", std))
        return cls(model, tokenizer, size, mean, std)

    @torch.no_grad()
    def image_features(self, images: np.ndarray, batch: int = 64) -> torch.Tensor:
        x = torch.as_tensor(np.asarray(images), dtype=torch.float32).permute(0, 3, 1, 2)
        if x.shape[-1] != self.size or x.shape[-2] != self.size:
            x = torch.nn.functional.interpolate(x, size=(self.size, self.size), mode="bicubic", align_corners=False)
        x = (x - torch.tensor(self.mean).view(1, 3, 1, 1)) / torch.tensor(self.std).view(1, 3, 1, 1)
        feats = [_emb(self.model.get_image_features(pixel_values=x[i:i + batch])) for i in range(0, len(x), batch)]
        return torch.nn.functional.normalize(torch.cat(feats), dim=-1)

    @torch.no_grad()
    def text_features(self, texts: list[str]) -> torch.Tensor:
        enc = self.tokenizer(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        return torch.nn.functional.normalize(_emb(self.model.get_text_features(input_ids=enc.input_ids)), dim=-1)

    def clip_score(self, images: np.ndarray, texts: list[str]) -> torch.Tensor:
        """Per-image CLIPScore = 100 * max(cos(image, text), 0)."""
        return 100 * (self.image_features(images) * self.text_features(texts)).sum(-1).clamp(min=0)

    def image_similarity(self, a: np.ndarray, b: np.ndarray) -> torch.Tensor:
        """Per-pair cosine of CLIP image embeddings ("Image-CLIPScore", x100)."""
        return 100 * (self.image_features(a) * self.image_features(b)).sum(-1)


def _emb(out):
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def l1(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).reshape(len(a), -1).mean(1)


def psnr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    mse = ((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2).reshape(len(a), -1).mean(1)
    return 10 * np.log10(1.0 / np.maximum(mse, 1e-12))


def frechet_distance(x: torch.Tensor, y: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to two feature sets [N, D] (FID's formula)."""
    from scipy import linalg

    _two_per_side(x, y, "the Frechet distance")
    x, y = x.double().numpy(), y.double().numpy()
    mu1, mu2 = x.mean(0), y.mean(0)
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    covmean = np.asarray(linalg.sqrtm(s1 @ s2)).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def _two_per_side(x, y, what: str) -> None:
    """Both feature sets hold at least 2 rows (a covariance, an unbiased MMD), else one ShapefirstError."""
    if len(x) < 2 or len(y) < 2:
        raise ShapefirstError(f"{what} needs at least 2 feature vectors per side (got {len(x)} and {len(y)})",
                              "pass more images; report n with every distance")


def kernel_distance(x: torch.Tensor, y: torch.Tensor) -> float:
    """KID: unbiased MMD^2 with the cubic polynomial kernel k(a,b) = (a.b/d + 1)^3."""
    _two_per_side(x, y, "KID")
    x, y = x.double(), y.double()
    d = x.shape[1]
    kxx = (x @ x.T / d + 1) ** 3
    kyy = (y @ y.T / d + 1) ** 3
    kxy = (x @ y.T / d + 1) ** 3
    m, n = len(x), len(y)
    return float((kxx.sum() - kxx.diag().sum()) / (m * (m - 1)) + (kyy.sum() - kyy.diag().sum()) / (n * (n - 1))
                 - 2 * kxy.mean())


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval for a proportion k/n, clipped to [0, 1] (at k=0 or k=n rounding would
    otherwise give -0.0 or 1.0000000000000002)."""
    if n == 0:
        return (float("nan"), float("nan"))
    p = k / n
    den = 1 + z * z / n
    c = (p + z * z / (2 * n)) / den
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return (max(0.0, c - h), min(1.0, c + h))


def mean_ci(x, z: float = 1.96) -> tuple[float, float, float]:
    """Mean and normal-approximation 95% interval (for paired differences pass a - b)."""
    x = np.asarray(x, dtype=np.float64)
    m = float(x.mean())
    h = z * float(x.std(ddof=1)) / math.sqrt(len(x)) if len(x) > 1 else float("nan")
    return m, m - h, m + h


def judged_accuracy(images: np.ndarray, targets: list[dict]) -> dict:
    """Per-attribute hits (0/1 arrays) of the world's judge against target labels, plus count == 1."""

    verdicts = [judge(im) for im in images]
    out = {a: np.array([v.labels.get(a) == t[a] for v, t in zip(verdicts, targets)], dtype=np.int8)
           for a in targets[0]}
    out["all"] = np.all(np.stack([out[a] for a in targets[0]]), axis=0).astype(np.int8)
    out["one_object"] = np.array([v.count == 1 for v in verdicts], dtype=np.int8)
    return out


# -- judged labels and shares (the token experiments) ------------------------------------------
def to_uint8(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy((np.clip(np.asarray(images, dtype=np.float32), 0, 1) * 255).round().astype(np.uint8))


def default_judge():
    return judge


def judged_labels(judge_fn, images) -> list[dict]:
    """Labels per image; judge_fn returns a dict of labels or an object with `.labels` (a Verdict)."""
    out = []
    for im in images:
        v = judge_fn(im)
        labels = v.labels if hasattr(v, "labels") else v
        out.append({str(k): str(x) for k, x in dict(labels or {}).items()})
    return out


def share(k: int, n: int) -> dict:
    lo, hi = wilson(int(k), int(n))
    return {"k": int(k), "n": int(n), "rate": (k / n) if n else float("nan"), "ci": [lo, hi]}


def ci_dict(x) -> dict:
    x = np.asarray(x, dtype=np.float64)
    m, lo, hi = mean_ci(x) if len(x) else (float("nan"),) * 3
    return {"mean": m, "ci": [lo, hi], "n": int(len(x))}
