"""Result files that are never half-written: atomic writes, JSONL that resumes, result objects.

Every write goes to a temporary file in the same folder, is flushed and fsync'ed, then renamed
over the target (rename is atomic on POSIX), so a crash leaves the old file or the new one.
A result object is a folder: results.json (settings + scalars) and arrays.safetensors.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import ShapefirstError


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except (FileExistsError, NotADirectoryError) as e:
        raise ShapefirstError(f"cannot write {path}: a parent path is a file", "choose another output folder") from e
    except PermissionError as e:
        raise ShapefirstError(f"cannot write to {path.parent}: permission denied",
                              "choose a writable output folder") from e
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a written file gets the usual permissions
        os.replace(tmp, path)
    except OSError as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise ShapefirstError(f"writing {path} failed ({e.strerror or e})",
                              "free disk space or choose another output folder") from e
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def png_bytes(img) -> bytes:
    """A PIL image as PNG bytes (write them with atomic_write_bytes)."""
    import io

    bio = io.BytesIO()
    img.save(bio, format="PNG")
    return bio.getvalue()


def yerr(est, lo, hi):
    """matplotlib's yerr ([2, n]: below, above) for estimates with intervals, clipped at 0, so an
    interval whose bound falls on the wrong side of its estimate (a share of 100%, rounding) draws
    as no bar on that side instead of failing."""
    import numpy as np

    est, lo, hi = (np.asarray(v, dtype=float).reshape(-1) for v in (est, lo, hi))
    return np.stack([np.clip(est - lo, 0, None), np.clip(hi - est, 0, None)]) if est.size else None


def save_figure(fig, path: str | Path, dpi: int = 120) -> Path:
    """Render a matplotlib Figure (no pyplot, Agg) to PNG, written atomically."""
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    return atomic_write_bytes(Path(path), buf.getvalue())


def image_grid(images, row_titles: list[str], col_titles: list[str], path: Path, size: float = 1.4) -> Path:
    """images [rows, cols, H, W, 3] (uint8 or [0, 1] floats) -> a titled PNG grid."""
    import numpy as np
    from matplotlib.figure import Figure

    images = np.asarray(images)
    rows, cols = images.shape[:2]
    fig = Figure(figsize=(size * cols + 0.6, size * rows + 0.4))
    axes = np.asarray(fig.subplots(rows, cols, squeeze=False))
    for r in range(rows):
        for c in range(cols):
            ax = axes[r, c]
            ax.imshow(images[r, c], interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(col_titles[c], fontsize=7)
            if c == 0:
                ax.set_ylabel(row_titles[r], fontsize=6, rotation=0, ha="right", va="center")
    return save_figure(fig, path)


def spaced(n: int, k: int) -> list[int]:
    """k evenly spaced indices of range(n), first and last included (all of them when n <= k)."""
    if n <= k:
        return list(range(n))
    return sorted({int(round(i * (n - 1) / (k - 1))) for i in range(k)})


def finite(obj, path: str = "", nulls: dict | None = None):
    """obj with every NaN or infinite float replaced by None (JSON null); `nulls` collects the
    JSON path of each replacement and what the value was, so a reader learns why it is null."""
    import math

    if isinstance(obj, float) and not math.isfinite(obj):
        if nulls is not None:
            nulls[path or "."] = f"not a finite number ({obj})"
        return None
    if isinstance(obj, dict):
        return {k: finite(v, f"{path}.{k}" if path else str(k), nulls) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v, f"{path}[{i}]", nulls) for i, v in enumerate(obj)]
    return obj


def strict_dumps(obj, **kw) -> str:
    """JSON that any strict parser reads: no NaN or Infinity. Non-finite numbers become null, and a
    top-level dict gains "null_reasons" {path: why} for them."""
    obj = json.loads(json.dumps(obj, default=_jsonable))  # tensors, paths -> plain values
    nulls: dict = {}
    clean = finite(obj, "", nulls)
    if nulls and isinstance(clean, dict):
        clean["null_reasons"] = {**clean.get("null_reasons", {}), **nulls}
    return json.dumps(clean, allow_nan=False, **kw)


def append_jsonl(path: str | Path, record: dict) -> None:
    """Append one line; the whole file is rewritten atomically so no line is ever partial."""
    path = Path(path)
    old = path.read_bytes() if path.exists() else b""
    atomic_write_bytes(path, old + (strict_dumps(record, sort_keys=True) + "\n").encode("utf-8"))


def read_jsonl(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@dataclass
class Result:
    """A named result: JSON-able data + named tensors. Saves to and loads from a folder."""

    kind: str
    data: dict = field(default_factory=dict)
    arrays: dict[str, torch.Tensor] = field(default_factory=dict)

    def save(self, folder: str | Path) -> Path:
        from safetensors.torch import save as save_bytes

        folder = Path(folder)
        if self.arrays:
            atomic_write_bytes(folder / "arrays.safetensors",
                               save_bytes({k: v.detach().cpu().contiguous() for k, v in self.arrays.items()}))
        atomic_write_text(folder / "results.json", strict_dumps({"kind": self.kind, **self.data}, indent=2))
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> "Result":
        from safetensors.torch import load_file

        folder = Path(folder)
        if not (folder / "results.json").exists():
            raise ShapefirstError(f"{folder} holds no results.json", "point to a folder written by shapefirst")
        data = json.loads((folder / "results.json").read_text())
        kind = data.pop("kind")
        arrays = load_file(str(folder / "arrays.safetensors")) if (folder / "arrays.safetensors").exists() else {}
        return cls(kind, data, arrays)


def _jsonable(o):
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "to_dict"):
        return o.to_dict()
    raise TypeError(f"not JSON-serialisable: {type(o).__name__}")
