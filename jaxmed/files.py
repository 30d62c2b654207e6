"""Files written whole or not at all, and the small JSON / PNG helpers built on that.

Nothing half-written is ever taken for a checkpoint or a result (docs/STUDY.md is the
spec; this is the house rule): every writer here writes a temporary file beside the target
and renames it over the target, which POSIX makes atomic within one filesystem. A target
that is a storage URL (``gs://...``) is written to a local temporary file and uploaded
with one object write, which the store publishes whole or not at all (`jaxmed.storage`).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from typing import Any

from jaxmed import storage


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yield a temporary path beside ``path``; on success rename it to ``path``.

    The temporary name keeps ``path``'s extension (PIL and numpy pick formats by it) and
    carries the process id, so concurrent writers never share a temporary file. On error
    the temporary file is removed and ``path`` is left as it was.
    """
    if storage.is_url(path):
        with _uploaded(path) as tmp:
            yield tmp
        return
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


@contextlib.contextmanager
def _uploaded(url: str) -> Iterator[str]:
    """A local temporary file (``url``'s extension), uploaded to ``url`` on success."""
    fd, tmp = tempfile.mkstemp(prefix=".jaxmed-upload-", suffix=os.path.splitext(url)[1])
    os.close(fd)
    try:
        yield tmp
        storage.upload(tmp, url)
    finally:
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
