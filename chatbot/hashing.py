"""SHA-256 of files and checkpoints: the one place the project hashes file bytes (kernel: imports nothing of ours).

* :func:`sha256_file` -- one file (data sets, head base weights, the embedded GGUF), optionally cached per process;
* :func:`files_sha256` -- the concatenated bytes of several files in order (an adapter's weights);
* :func:`tree_sha256` -- the files under some paths with their names (an evaluation's document collection);
* :func:`model_fingerprint` -- a checkpoint folder's weight files with their names (the base model an
  adapter was trained on; the served model's must match it).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

_BLOCK = 1 << 22
_FILE_CACHE: dict[tuple[str, int, int], str] = {}
_FINGERPRINTS: dict[tuple, str] = {}


def _update(h, path: Path) -> None:
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_BLOCK), b""):
            h.update(block)


def sha256_file(path: str | Path, cache: bool = False) -> str:
    """SHA-256 hex digest of a file's bytes.

    Args:
        path: the file.
        cache: remember the digest per process, keyed by (path, size, modification time), for files
            hashed again and again (a head's base weights at every load).

    Raises:
        FileNotFoundError: the file does not exist (callers check first and raise their own error).
    """
    p = Path(path)
    key = None
    if cache:
        st = p.stat()
        key = (str(p), st.st_size, st.st_mtime_ns)
        if key in _FILE_CACHE:
            return _FILE_CACHE[key]
    h = hashlib.sha256()
    _update(h, p)
    digest = h.hexdigest()
    if key is not None:
        _FILE_CACHE[key] = digest
    return digest


def files_sha256(paths: Iterable[str | Path]) -> str:
    """SHA-256 over the bytes of ``paths`` one after the other (no names, no separators)."""
    h = hashlib.sha256()
    for p in paths:
        _update(h, Path(p))
    return h.hexdigest()


def tree_sha256(paths: Iterable[str | Path]) -> str:
    """SHA-256 over every file under ``paths`` (files or folders, recursively), sorted by path: for each file its
    name, a NUL, its :func:`sha256_file` and a newline. Renaming or editing any file changes it."""
    files = sorted(f for p in map(Path, paths) for f in ([p] if p.is_file() else p.rglob("*")) if f.is_file())
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.name}\0{sha256_file(f)}\n".encode())
    return h.hexdigest()


def model_fingerprint(path: str) -> str:
    """SHA-256 over a checkpoint's weight files (``*.safetensors`` / ``*.bin`` in name order, each name then its bytes).

    A hub id that is not a local folder is fingerprinted by its name (``"id:<name>"``).
    Results are cached per process by (path, sizes, modification times).
    """
    p = Path(path)
    if not p.is_dir():
        return f"id:{path}"
    files = sorted([*p.glob("*.safetensors"), *p.glob("*.bin")])
    key = (str(p.resolve()), tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files))
    if key not in _FINGERPRINTS:
        h = hashlib.sha256()
        for f in files:
            h.update(f.name.encode())
            _update(h, f)
        _FINGERPRINTS[key] = h.hexdigest()
    return _FINGERPRINTS[key]
