"""Checkpoint integrity: a SHA-256 manifest written last, checked before any resume.

A checkpoint folder can be cut short (the process or the machine died while it was being
written or copied), bit-rotted, or deleted by hand. The Trainer would then either fail deep
inside `torch.load`, or worse, resume from silently wrong weights (safetensors does not
check its data). So:

- `write_manifest(dir)` records the size and SHA-256 of every file, as the last file of the
  checkpoint, written atomically (temp file + rename): a folder without it was never finished.
- `verify(dir)` re-hashes the listed files and returns what is wrong, or None.
- `choose(candidates)` picks the newest checkpoint that verifies and says, for each one it
  skipped, why ("fallback" to an older checkpoint, or "restart" from step 0 when none is left).

Hashing costs about a second per GB of checkpoint (a 1B model's LoRA adapter with its
optimizer state is well under that). Nothing here imports torch.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterable, Optional

MANIFEST = "sweep_manifest.json"
_CHUNK = 1 << 20


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def _files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST
                  and not p.name.startswith(f".{MANIFEST}."))


def write_manifest(directory: str | os.PathLike) -> Path:
    """Hash every file under `directory` into its manifest (written last, atomically); return the manifest's path."""
    d = Path(directory)
    entries = {p.relative_to(d).as_posix(): {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in _files(d)}
    tmp = d / f".{MANIFEST}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump({"version": 1, "files": entries}, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, d / MANIFEST)
    return d / MANIFEST


def verify(directory: str | os.PathLike) -> Optional[str]:
    """None if every file the manifest lists is there with its size and SHA-256; else what is wrong."""
    d = Path(directory)
    if not d.is_dir():
        return "missing (deleted)"
    try:
        manifest = json.loads((d / MANIFEST).read_text())
        files = manifest["files"]
    except FileNotFoundError:
        return f"no {MANIFEST}: its writing never finished"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{MANIFEST} unreadable ({type(e).__name__})"
    if not files:
        return f"{MANIFEST} lists no files"
    for name, want in sorted(files.items()):
        p = d / name
        if not p.is_file():
            return f"{name} missing"
        size = p.stat().st_size
        if size != want["bytes"]:
            return f"{name} is {size} bytes, {want['bytes']} were written (truncated or overwritten)"
        if _sha256(p) != want["sha256"]:
            return f"{name} fails its SHA-256 check (corrupted)"
    return None


def choose(candidates: Iterable[str | os.PathLike]) -> tuple[Optional[Path], list[str]]:
    """The first of `candidates` (newest first) that verifies, and one note per checkpoint skipped.

    Returns (None, notes) when none verifies: the trial restarts from step 0.
    """
    notes: list[str] = []
    for c in candidates:
        problem = verify(c)
        if problem is None:
            return Path(c), notes
        notes.append(f"checkpoint {Path(c).name} rejected: {problem}")
    return None, notes
