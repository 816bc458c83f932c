"""The exact judge of the shapes world: an image -> its attributes and object count.

Analytic, no training: the background is gray (chroma 0) and every object color is saturated,
so the object is where the chroma is high. Generated pixels are noisy, so the judge filters
first (3x3 median of the chroma) and then decides:
- count: connected components of at least MIN_AREA pixels;
- color: chroma-weighted circular mean of the hue, nearest of the six hues;
- position: center of the bounding box, nearest anchor;
- size: bounding-box side, threshold halfway between the two extents;
- shape: the mask cropped to its bounding box, resized to 24x24, best IoU with the four templates;
- texture: within the eroded object, the mean absolute chroma step between vertical and
  horizontal neighbours (stripes are horizontal: vertical steps only; dots: both; plain: neither).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from .render import ANCHORS, COLORS, EXTENT, HUES, SHAPES, shape_mask

CHROMA_THRESHOLD = 0.15
MIN_AREA = 12
TEX_PLAIN = 0.06  # both texture amplitudes below: plain
TEX_RATIO = 0.4  # x amplitude below this fraction of the y amplitude: striped (horizontal stripes)
_T = 24


@dataclass
class Verdict:
    count: int
    labels: dict[str, str] = field(default_factory=dict)  # empty when count == 0
    center: tuple[float, float] | None = None  # the object's bounding-box center, pixels at 64 px (x, y)

    def matches(self, target: dict[str, str]) -> dict[str, bool]:
        return {k: self.labels.get(k) == v for k, v in target.items()}


def _templates() -> dict[str, np.ndarray]:
    c = np.arange(_T * 4, dtype=np.float32) / 4 + 0.125
    xx, yy = np.meshgrid(c, c)
    out = {}
    for s in SHAPES:
        m = shape_mask(s, _T / 2, _T / 2, _T, xx, yy).astype(np.float32)
        out[s] = m.reshape(_T, 4, _T, 4).mean(axis=(1, 3)) > 0.5
    return out


_TEMPLATES = _templates()


def _to_hwc01(image) -> np.ndarray:
    """Accept PIL images, HxWx3 uint8/float [0,1] arrays, or 3xHxW tensors/arrays in [-1, 1]."""
    if hasattr(image, "convert"):  # PIL
        return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    arr = np.asarray(image.detach().cpu() if hasattr(image, "detach") else image, dtype=np.float32)
    if arr.ndim != 3:
        raise ValueError(f"judge expects one image (3 dims), got shape {arr.shape}")
    if arr.shape[0] == 3 and arr.shape[-1] != 3:
        arr = (arr.transpose(1, 2, 0) + 1.0) / 2.0
    elif arr.max() > 1.5:
        arr = arr / 255.0
    return np.clip(arr, 0.0, 1.0)


def _resize_bool(mask: np.ndarray, size: int) -> np.ndarray:
    h, w = mask.shape
    ys = ((np.arange(size) + 0.5) * h / size).astype(int)
    xs = ((np.arange(size) + 0.5) * w / size).astype(int)
    return mask[np.ix_(ys, xs)]


def texture_amplitudes(chroma: np.ndarray, inner: np.ndarray, k: float = 1.0) -> tuple[float, float]:
    """Amplitude of the texture period (4 px at 64 px) along y and along x within the object.

    Phase-free (the magnitude of one Fourier coefficient), so a shifted pattern counts the same."""
    ys, xs = np.nonzero(inner)
    if ys.size < 4:
        return 0.0, 0.0
    c = chroma[ys, xs] - chroma[ys, xs].mean()
    w = 2 * np.pi / (4.0 * k)
    amp_y = 2 * abs((c * np.exp(-1j * w * ys)).mean())
    amp_x = 2 * abs((c * np.exp(-1j * w * xs)).mean())
    return float(amp_y), float(amp_x)


def judge(image) -> Verdict:
    img = _to_hwc01(image)
    res = img.shape[0]
    k = res / 64.0
    raw = img.max(axis=2) - img.min(axis=2)
    smooth = ndimage.gaussian_filter(raw, sigma=0.8 * k)
    mask = smooth > CHROMA_THRESHOLD
    lab, n = ndimage.label(mask)
    if n == 0:
        return Verdict(0)
    areas = ndimage.sum(mask, lab, index=np.arange(1, n + 1))
    big = [i + 1 for i, a in enumerate(areas) if a >= MIN_AREA * k * k]
    if not big:
        return Verdict(0)
    main = max(big, key=lambda i: areas[i - 1])
    # refine the outline at half the object's own chroma (sharper than the detection threshold)
    near = ndimage.binary_dilation(lab == main, iterations=2)
    obj = ndimage.binary_fill_holes(near & (smooth > 0.5 * np.median(smooth[lab == main])))
    ys, xs = np.nonzero(obj)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1

    # color: chroma-weighted circular mean of hue over the object
    r, g, b = (img[..., i][obj] for i in range(3))
    mx, mn = np.maximum(np.maximum(r, g), b), np.minimum(np.minimum(r, g), b)
    hue = np.degrees(np.arctan2(np.sqrt(3) * (g - b), 2 * r - g - b))
    wgt = mx - mn
    mean_hue = np.degrees(np.arctan2((wgt * np.sin(np.radians(hue))).sum(), (wgt * np.cos(np.radians(hue))).sum()))
    dist = [abs((mean_hue - h + 180) % 360 - 180) for h in HUES]
    color = COLORS[int(np.argmin(dist))]

    cx, cy = (x0 + x1) / 2 / k, (y0 + y1) / 2 / k
    position = min(ANCHORS, key=lambda p: (ANCHORS[p][0] - cx) ** 2 + (ANCHORS[p][1] - cy) ** 2)
    side = max(x1 - x0, y1 - y0) / k
    size = "small" if side < (EXTENT["small"] + EXTENT["large"]) / 2 else "large"

    crop = _resize_bool(obj[y0:y1, x0:x1], _T)
    ious = {s: (crop & t).sum() / max((crop | t).sum(), 1) for s, t in _TEMPLATES.items()}
    shape = max(ious, key=ious.get)

    sy, sx = texture_amplitudes(raw, ndimage.binary_erosion(obj, iterations=max(2, int(round(2 * k)))), k)
    if max(sy, sx) < TEX_PLAIN:
        texture = "plain"
    elif sx < TEX_RATIO * sy:
        texture = "striped"
    else:
        texture = "dotted"
    labels = {"shape": shape, "color": color, "position": position, "size": size, "texture": texture}
    return Verdict(len(big), labels, (float(cx), float(cy)))


def degrade(img: np.ndarray, rng: np.random.Generator, noise: float = 0.05, blur: float = 0.6) -> np.ndarray:
    """HxWx3 [0,1] -> slightly blurred, noisy copy (the judge's robustness check)."""
    out = ndimage.gaussian_filter(img, sigma=(blur, blur, 0))
    out = out + rng.normal(0.0, noise, out.shape).astype(np.float32)
    return np.clip(out, 0.0, 1.0)
