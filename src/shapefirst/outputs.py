"""Output folders a command owns, and the keys that say whether a saved result may be reused.

A command writes only into folders it created. Each such folder holds a marker file,
`.shapefirst.json`: the command, its reuse key (everything that changes the result), the package
version, and the entries (files and folders) the command wrote there. Rules (`OutputFolder.check`):

- a missing or empty folder is taken (created at the first write, never before);
- a folder that holds anything without this command's marker is refused: shapefirst never writes
  beside, or deletes, a user's own files;
- a folder with the marker and the same key is reused (resumable commands resume from it);
- a folder with the marker and another key is refused, unless `overwrite`: then only the entries
  the marker lists are removed, and the command starts afresh.

`check` runs before any work, together with a writability probe, so a read-only or impossible
output fails at once; `claim` writes the marker right before the first output file.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
from contextlib import contextmanager
from pathlib import Path

from .errors import ShapefirstError
from .checks import out_path
from .results import atomic_write_text
from .pipeline_call import CALL_DEFAULTS

MARKER = ".shapefirst.json"


def version() -> str:
    from importlib.metadata import PackageNotFoundError, version as v

    try:
        return v("shapefirst")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "0+unknown"


def read_marker(folder: Path) -> dict | None:
    p = Path(folder) / MARKER
    if not p.is_file():
        return None
    try:
        m = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return m if isinstance(m, dict) and m.get("tool") == "shapefirst" else None


def differences(old: dict | None, new: dict | None) -> str:
    old, new = old or {}, new or {}
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return ", ".join(keys[:6]) or "settings"


def probe_writable(folder: Path) -> None:
    """Create `folder` (and missing parents) and a temporary file in it, then remove what was made."""
    folder = Path(folder)
    made = []
    p = folder
    while not p.exists():
        made.append(p)
        p = p.parent
    if not p.is_dir():
        raise ShapefirstError(f"cannot create or write the output folder {folder}: {p} is a file",
                              "choose another --out folder")
    try:
        for d in reversed(made):
            d.mkdir()
        probe = folder / ".shapefirst-probe"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ShapefirstError(f"cannot create or write the output folder {folder} ({e.strerror or e})",
                              "choose a writable --out folder") from e
    finally:
        for d in made:
            try:
                d.rmdir()
            except OSError:
                pass


class OutputFolder:
    """One command's output folder (see the module docstring)."""

    def __init__(self, path: str | Path, command: str, key: dict | None = None, overwrite: bool = False,
                 reuse: bool = True):
        """key=None: any key of this command is accepted (a check before the key is known, or a
        folder that only holds keyed sub-folders). reuse=False: the command never resumes
        (generate), so any earlier output of its own is replaced only with overwrite."""

        self.path, self.command, self.key = out_path(path, "out"), command, key
        self.overwrite, self.reuse = overwrite, reuse
        self.reused = False

    def check(self, probe: bool = True, dry: bool = False) -> "OutputFolder":
        """Refuse what must not be touched; with overwrite, remove this command's old entries
        (dry=True: only check, remove nothing yet; for a check before the work, whose results
        replace the old ones only once they exist)."""
        p = self.path
        if p.exists() and not p.is_dir():
            what = "a file" if p.is_file() else "not a folder"
            raise ShapefirstError(f"output path {p} is {what}", "pass a folder path with --out")
        if p.is_dir() and any(p.iterdir()):
            m = read_marker(p)
            if m is None or m.get("command") != self.command:
                owner = "files shapefirst did not write" if m is None else f"the output of `{m.get('command')}`"
                raise ShapefirstError(f"output folder {p} already holds {owner}",
                                      "pass a fresh or empty --out folder "
                                      "(--overwrite replaces only this command's own outputs)")
            if not self.reuse or (self.key is not None and m.get("key") != _plain(self.key)):
                if not self.overwrite:
                    if not self.reuse:
                        raise ShapefirstError(f"output folder {p} already holds "
                                              f"the output of an earlier `{self.command}`",
                                              "pass --overwrite to replace it, or a fresh --out folder")
                    raise ShapefirstError(f"output folder {p} holds a result made with other settings "
                                          f"({differences(m.get('key'), _plain(self.key))})",
                                          "pass --overwrite to replace it, or a fresh --out folder")
                if not dry:
                    self.remove_own(m)
            else:
                self.reused = True
        if probe:
            probe_writable(p)
        return self

    def remove_own(self, marker: dict | None = None) -> None:
        """Remove the entries this command's marker lists (and the marker); nothing else."""
        m = marker or read_marker(self.path) or {}
        for name in m.get("entries", []):
            target = self.path / name
            if Path(name).is_absolute() or ".." in Path(name).parts:
                continue
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target, ignore_errors=True)
            elif target.exists() or target.is_symlink():
                target.unlink()
        (self.path / MARKER).unlink(missing_ok=True)
        self.reused = False

    def claim(self, entries=()) -> None:
        """Write (or extend) the marker: this command owns the folder and the named entries."""

        old = read_marker(self.path) or {}
        names = sorted(set(old.get("entries", [])) | {str(e) for e in entries})
        m = {"tool": "shapefirst", "command": self.command, "version": version(), "key": _plain(self.key),
             "entries": names}
        atomic_write_text(self.path / MARKER, json.dumps(m, indent=1, sort_keys=True))

    def forget(self, names) -> None:
        """Drop entries (already removed by the command) from the marker."""
        names = set(names)
        m = read_marker(self.path)
        if m is not None and names:

            m["entries"] = [e for e in m.get("entries", []) if e not in names]
            atomic_write_text(self.path / MARKER, json.dumps(m, indent=1, sort_keys=True))

    @contextmanager
    def claimed(self, entries=()):
        """Claim the folder for the work inside the block; if the work fails before writing anything
        else, the marker (and the folder, if this made it) is removed again: nothing half-written."""
        existed, had = self.path.exists(), read_marker(self.path) is not None
        self.claim(entries)
        try:
            yield self
        except BaseException:
            if not had and [p.name for p in self.path.iterdir()] == [MARKER]:
                (self.path / MARKER).unlink(missing_ok=True)
                if not existed:
                    self.path.rmdir()
            raise

    def entries(self) -> list[str]:
        return list((read_marker(self.path) or {}).get("entries", []))


def _plain(key):
    """A key as it reads back from JSON (tuples -> lists), so saved and new keys compare equal."""
    return None if key is None else json.loads(json.dumps(key, sort_keys=True, default=str))


def check_regular_file(path: Path, what: str) -> None:
    """Refuse FIFOs, devices and sockets as input files (reading them can block forever)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return
    if not stat.S_ISREG(mode) and not stat.S_ISDIR(mode):
        raise ShapefirstError(f"{what} file {path} is not a regular file (a FIFO, device or socket)",
                              "pass the path of a text file")


def text_digest(values) -> str:
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode("utf-8")).hexdigest()[:16]


def _tensor_digest(h, name: str, module) -> None:
    import torch

    stats = []
    with torch.no_grad():
        for pname, t in module.state_dict().items():
            h.update(f"{name}.{pname}{tuple(t.shape)}{t.dtype}".encode())
            d = t.detach().to(torch.float64)
            stats.append(torch.stack([d.sum(), (d * d).sum()]))
    if stats:  # 9 significant digits: the same weights give the same text on any thread count
        h.update(" ".join(f"{v:.9e}" for v in torch.stack(stats).cpu().flatten().tolist()).encode())


def module_fingerprint(module) -> str:
    """A digest of one torch module's weights (see model_fingerprint)."""
    h = hashlib.sha256(type(module).__name__.encode())
    _tensor_digest(h, "", module)
    return h.hexdigest()[:16]


def model_fingerprint(pipe) -> str:
    """A digest of a pipeline's identity: its class, scheduler config, the call arguments its class gives every
    call (`CALL_DEFAULTS`, e.g. a video's size; see report.page.with_call_defaults) and every weight tensor
    (name, shape, dtype, sum and sum of squares). Two models with other weights, also a LoRA fused
    into the same base, get other fingerprints. One pass over the weights (~0.3 s per GB on a CPU)."""
    import torch

    h = hashlib.sha256(type(pipe).__name__.encode())
    # `_use_default_values` lists a set's items, in an order that changes with each process's string hashing
    config = {k: v for k, v in pipe.scheduler.config.items() if k != "_use_default_values"}
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    defaults = getattr(type(pipe), CALL_DEFAULTS, None)
    if defaults:  # a pipeline whose calls default to other arguments (a size) makes other results
        h.update(json.dumps(defaults, sort_keys=True, default=str).encode())
    for name, comp in sorted(pipe.components.items()):
        if isinstance(comp, torch.nn.Module):
            _tensor_digest(h, name, comp)
    return h.hexdigest()[:16]
