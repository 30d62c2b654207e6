"""Files written whole or not at all, and the small JSON / PNG helpers built on that.

Nothing half-written is ever taken for a checkpoint or a result (docs/STUDY.md is the
spec; this is the house rule): every writer here writes a temporary file beside the target
and renames it over the target, which POSIX makes atomic within one filesystem.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from typing import Any


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yield a temporary path beside ``path``; on success rename it to ``path``.

    The temporary name keeps ``path``'s extension (PIL and numpy pick formats by it) and
    carries the process id, so concurrent writers never share a temporary file. On error
    the temporary file is removed and ``path`` is left as it was.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    base, ext = os.path.splitext(os.path.basename(path))
    tmp = os.path.join(folder, f".{base}.tmp{os.getpid()}{ext}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write(path: str, data: str | bytes) -> str:
    """Write text (UTF-8, newlines as given) or bytes to ``path`` atomically; return path."""
    with atomic_path(path) as tmp:
        if isinstance(data, bytes):
            with open(tmp, "wb") as f:
                f.write(data)
        else:
            with open(tmp, "w", encoding="utf-8", newline="") as f:
                f.write(data)
    return path


def write_json(path: str, obj: Any, **kwargs: Any) -> str:
    """``obj`` as indented JSON (keys as given), written atomically."""
    kwargs.setdefault("indent", 2)
    return atomic_write(path, json.dumps(obj, **kwargs) + "\n")


def save_image(image: Any, path: str, **kwargs: Any) -> str:
    """Save a PIL image atomically, in the format ``path``'s extension names."""
    with atomic_path(path) as tmp:
        image.save(tmp, **kwargs)
    return path
