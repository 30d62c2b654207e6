"""Paths that may be storage URLs (``gs://bucket/run``), for what jaxmed writes: workdirs,
checkpoints, exports, samples.

A local path goes through ``os`` exactly as before (made absolute, folders created on
demand). A URL is never passed through ``os.path.abspath`` (which turns ``gs://b/x`` into
a local ``./gs:/b/x``): it is kept as given, minus a trailing ``/``, and read and written
through etils ``epath``, the layer orbax uses for its checkpoints, so the workdir, the
checkpoints and the export of a run live in one bucket that every host of a pod sees.

What cannot live in an object store stays on local disk: the latent and text caches are
memory-mapped (`jaxmed.cache`), and a dataset generated on first use (the phantom) is
written image by image. A run whose workdir is a URL keeps them in `local_twin`, a folder
of this host under ``$JAXMED_CACHE`` (default ``~/.cache/jaxmed``): one copy per host,
built by each host from its own devices, as for any per-host cache.

Writes that must be whole or absent (`jaxmed.files`) write a local temporary file and
upload it with one object write (`upload`): an object store publishes an object only once
its upload completes, so readers never see half of it, while a rename there is a copy and
a delete, neither atomic nor cheap. Folders written by other libraries (a diffusers
export) are written to a local staging folder and uploaded file by file (`staged_dir`).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from typing import IO

from etils import epath

# scheme://... (gs://, s3://, memory://): a storage URL, not a local path.
URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
# The schemes epath reads and writes, and the package each needs (tensorflow also serves).
SCHEMES = {"gs": "gcsfs", "s3": "s3fs", "az": "adlfs"}
_CHUNK = 16 << 20


def is_url(path: str) -> bool:
    return bool(URL.match(str(path)))


def check_url(path: str, what: str = "path") -> None:
    """ValueError (one line: what to do) unless ``path`` is local or a URL jaxmed can use
    here: a scheme epath supports, with the package that reaches it installed."""
    if not is_url(path):
        return
    scheme = str(path).split("://", 1)[0].lower()
    if scheme not in SCHEMES:
        raise ValueError(f"{what} {path}: {scheme}:// is not a storage jaxmed can write to; "
                         f"use a local folder or {', '.join(s + '://' for s in SCHEMES)}")
    need = SCHEMES[scheme]
    if not any(importlib.util.find_spec(m) for m in (need, "tensorflow")):
        raise ValueError(f"{what} {path}: reaching {scheme}:// needs the {need} package "
                         f"(pip install {need}), which is not installed")


def absolute(path: str) -> str:
    """A local path made absolute; a URL as given (no trailing ``/``)."""
    path = os.fspath(path)
    return path.rstrip("/") if is_url(path) else os.path.abspath(path)


def join(path: str, *parts: str) -> str:
    return os.path.join(path, *parts)  # POSIX joining keeps gs://bucket/... intact


def makedirs(path: str) -> None:
    """The folder and its parents (on an object store, folders are implicit: nothing to
    create where the backend has none)."""
    if is_url(path):
        epath.Path(path).mkdir(parents=True, exist_ok=True)
    else:
        os.makedirs(path, exist_ok=True)


def exists(path: str) -> bool:
    return epath.Path(path).exists() if is_url(path) else os.path.exists(path)


def isfile(path: str) -> bool:
    return epath.Path(path).is_file() if is_url(path) else os.path.isfile(path)


def isdir(path: str) -> bool:
    return epath.Path(path).is_dir() if is_url(path) else os.path.isdir(path)


def open_file(path: str, mode: str = "r") -> IO:
    """``open`` for a local path; epath's (the object store's) for a URL."""
    if is_url(path):
        return epath.Path(path).open(mode)
    return open(path, mode)


def read_bytes(path: str) -> bytes:
    with open_file(path, "rb") as f:
        return f.read()


def upload(local: str, url: str) -> None:
    """Copy the local file ``local`` to ``url`` in one object write, streamed."""
    with open(local, "rb") as src, epath.Path(url).open("wb") as dst:
        shutil.copyfileobj(src, dst, _CHUNK)


def upload_tree(local_dir: str, url: str) -> None:
    """Every file under ``local_dir`` to the same relative path under ``url``."""
    for root, _, names in os.walk(local_dir):
        rel = os.path.relpath(root, local_dir)
        for name in names:
            upload(os.path.join(root, name),
                   join(url, name) if rel == "." else join(url, rel, name))


@contextlib.contextmanager
def staged_dir(path: str) -> Iterator[str]:
    """A local folder to write ``path``'s files into: ``path`` itself when local; for a
    URL a temporary folder, uploaded under ``path`` when the block succeeds and removed
    either way."""
    if not is_url(path):
        os.makedirs(path, exist_ok=True)
        yield path
        return
    tmp = tempfile.mkdtemp(prefix="jaxmed-staging-")
    try:
        yield tmp
        upload_tree(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def local_twin(workdir: str) -> str:
    """A local folder for what a run cannot keep in its workdir (see the module docstring):
    the workdir itself when local; for a URL, ``$JAXMED_CACHE/runs/<name>-<hash>``, the
    same folder on every host and at every restart of the run."""
    if not is_url(workdir):
        return workdir
    root = os.environ.get("JAXMED_CACHE") or os.path.expanduser("~/.cache/jaxmed")
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", workdir.rstrip("/").rsplit("/", 1)[-1])
    digest = hashlib.sha1(workdir.encode()).hexdigest()[:10]
    return os.path.join(root, "runs", f"{name}-{digest}")


def require_local(path: str, what: str) -> None:
    """ValueError (one line) if ``path`` is a URL where only a local folder will do."""
    if is_url(path):
        raise ValueError(
            f"{what} {path}: this folder must be local or mounted (it is memory-mapped or "
            f"written file by file), not a storage URL; mount the bucket (gcsfuse) or use a "
            f"local folder")
