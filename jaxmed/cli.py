"""Config as code: ``python -m jaxmed.<tool> --config configs/<file>.py:<arg> --workdir DIR``.

A config file defines ``get_config(arg=None) -> ml_collections.ConfigDict``; ``--config.a.b=v``
overrides a field (the value is parsed as a Python literal and must fit the field's type).
The config is locked: an unknown key is an error that lists the valid keys at that level
and the closest match, never a silently ignored typo. (The syntax is ml_collections'
``config_flags``; the parsing is ours so the errors can say what to do.)

Every tool's ``main`` runs under `main_guard`: a user error (a config, a missing file,
unreadable images, a bad CSV or bad weights) prints one ``error:`` line and exits 2;
``--debug`` shows the traceback instead. Logging goes through `setup_logging`, one format
for every tool.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import importlib.util
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import jax
import ml_collections

from jaxmed import storage
from jaxmed.errors import UserError
from jaxmed.hostmem import keep_freed_memory_on_cpu


class ConfigError(UserError):
    """A config file, override or value is invalid."""


# What a user can fix: bad values (ConfigError, UserError and the readers' ValueErrors),
# files that are missing or unreadable (MissingComponentError is a FileNotFoundError).
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
               PermissionError)
LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"


def setup_logging(level: int = logging.INFO) -> None:
    """One log format for every tool: jaxmed's messages from ``level`` up, other libraries'
    (jax, orbax) from WARNING. Replaces the handler a library installs at import, which
    would print ``WARNING:jaxmed.cache:...`` in Python's default format."""
    logging.basicConfig(level=logging.WARNING, format=LOG_FORMAT, force=True)
    logging.getLogger("jaxmed").setLevel(level)


def main_guard(run: Callable[[list[str]], int], argv: Sequence[str] | None = None, *,
               extra_errors: tuple[type[BaseException], ...] = ()) -> int:
    """``run(argv)`` with user errors (`USER_ERRORS`, plus a tool's ``extra_errors``) as
    one ``error:`` line and exit status 2 (no traceback); ``--debug`` anywhere in ``argv``
    re-raises them. Any other exception is a bug and keeps its traceback; argparse's usage
    errors exit as argparse makes them."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    try:
        return run(argv)
    except USER_ERRORS + tuple(extra_errors) as err:
        if debug:
            raise
        msg = " ".join(str(err).split()) or type(err).__name__
        print(f"error: {msg}", file=sys.stderr)
        return 2


def add_debug_flag(ap: argparse.ArgumentParser) -> None:
    """List ``--debug`` in a tool's ``--help``; `main_guard` reads it (and takes it out of
    argv before the tool's parser runs)."""
    ap.add_argument("--debug", action="store_true",
                    help="show the traceback of an error instead of one error: line")


def load_config(spec: str) -> ml_collections.ConfigDict:
    """``path/to/file.py[:arg]`` -> the locked ConfigDict its get_config(arg) returns."""
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        here = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), path)
        if os.path.isfile(here):  # configs/ of a source checkout, from any cwd
            path = here
        else:
            raise ConfigError(f"config file {path!r} not found (from --config {spec!r})")
    mod_spec = importlib.util.spec_from_file_location(
        "jaxmed_config_" + os.path.basename(path)[:-3], path)
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{path} defines no get_config(arg=None)")
    config = module.get_config(arg) if arg else module.get_config()
    if not isinstance(config, ml_collections.ConfigDict):
        config = ml_collections.ConfigDict(config)
    config.lock()
    return config


def _parse_value(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare string: --config.data.csv=/path/train.csv


def set_override(config: ml_collections.ConfigDict, dotted: str, text: str) -> None:
    """Apply ``dotted=text`` to a locked config, with errors naming the key and the fix."""
    keys = dotted.split(".")
    node = config
    for depth, key in enumerate(keys):
        where = ".".join(["config", *keys[:depth]])
        if not isinstance(node, ml_collections.ConfigDict):
            raise ConfigError(f"--config.{dotted}: {where} is a value, not a section")
        if key not in node:
            valid = sorted(node.keys())
            close = closest(key, valid)
            hint = f"; did you mean {where}.{close}?" if close else ""
            raise ConfigError(
                f"unknown config key --config.{dotted}: {where} has no field {key!r}{hint} "
                f"Valid fields of {where}: {', '.join(valid)}"
            )
        if depth == len(keys) - 1:
            _assign(node, key, _parse_value(text), dotted)
        else:
            node = node[key]


def closest(key: str, valid: Sequence[str]) -> str | None:
    """The valid name closest to a mistyped ``key`` (difflib), also matching a part of a
    compound name: ``stepz`` -> ``max_steps``."""
    def score(name: str) -> float:
        parts = [name, *name.split("_")]
        return max(difflib.SequenceMatcher(None, key.lower(), p.lower()).ratio()
                   for p in parts if p)
    best = max(valid, key=score, default=None)
    return best if best is not None and score(best) >= 0.6 else None


def _assign(node: ml_collections.ConfigDict, key: str, value: Any, dotted: str) -> None:
    current = node[key]
    if isinstance(current, ml_collections.ConfigDict):
        if not isinstance(value, dict):
            raise ConfigError(f"--config.{dotted} is a section; set its fields "
                              f"(--config.{dotted}.<field>=...) or give a dict literal")
        for k, v in value.items():
            _assign(current, k, v, f"{dotted}.{k}")
        return
    if isinstance(current, tuple) and isinstance(value, list | str):
        value = tuple(value) if isinstance(value, list) else (value,)
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if current is not None and value is not None and not isinstance(value, type(current)):
        if not (isinstance(current, str) and not isinstance(value, str | bytes)):
            raise ConfigError(
                f"--config.{dotted}={value!r}: expected {type(current).__name__} "
                f"(like the default {current!r}), got {type(value).__name__}"
            )
        value = str(value)
    try:
        with node.unlocked():
            node[key] = value
    except TypeError as err:
        raise ConfigError(f"--config.{dotted}={value!r}: {err}") from err


def parse(
    argv: Sequence[str] | None,
    prog: str,
    description: str = "",
    default_config: str | None = None,
    workdir_required: bool = True,
    extra: Sequence[tuple[str, dict]] = (),
    url_workdir: bool = True,
) -> tuple[ml_collections.ConfigDict, argparse.Namespace]:
    """Parse ``--config FILE[:ARG] --config.x.y=v ... --workdir DIR [extra flags]``. The
    workdir may be a storage URL (``gs://bucket/run``, `jaxmed.storage`) unless the tool
    says ``url_workdir=False``; it is checked here, so a missing gcsfs is one line now
    rather than a traceback after the model has loaded."""
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides, rest = [], []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a.startswith("--config."):
            if "=" in a:
                k, v = a[len("--config."):].split("=", 1)
            elif i + 1 < len(argv):
                k, v = a[len("--config."):], argv[i + 1]
                i += 1
            else:
                raise ConfigError(f"{a} needs a value (--config.x.y=value)")
            overrides.append((k, v))
        else:
            rest.append(a)
        i += 1
    ap = argparse.ArgumentParser(prog=prog, description=description)
    ap.add_argument("--config", default=default_config, required=default_config is None,
                    help="config file and argument, e.g. configs/finetune.py:lora")
    ap.add_argument("--workdir", required=workdir_required,
                    help="where checkpoints, logs, samples and exports go")
    add_debug_flag(ap)
    for name, kw in extra:
        ap.add_argument(name, **kw)
    args = ap.parse_args(rest)
    if args.workdir:
        check_workdir(args.workdir, prog.split()[-1], url_ok=url_workdir)
    config = load_config(args.config)
    for k, v in overrides:
        set_override(config, k, v)
    return config, args


def to_json(config: ml_collections.ConfigDict) -> str:
    return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=str)


def check_workdir(workdir: str, tool: str, *, url_ok: bool = True) -> None:
    """A storage-URL workdir (`jaxmed.storage`) is reachable (one line now rather than a
    traceback after the model has loaded), or refused for a tool that needs a local one."""
    if not storage.is_url(workdir):
        return
    if not url_ok:
        raise ConfigError(
            f"--workdir {workdir}: {tool} needs a local or mounted workdir (storage URLs "
            "work for jaxmed.train); mount the bucket on every host (e.g. gcsfuse) and pass "
            "the mounted folder")
    try:
        storage.check_url(workdir, "--workdir")
    except ValueError as err:
        raise ConfigError(str(err)) from None


def enable_compilation_cache() -> None:
    """What every command-line tool calls first: keeps freed host memory in the process when
    jax will run on the CPU (`jaxmed.hostmem`), which must happen before jax starts its
    backend, then `use_compilation_cache`. It starts no backend, so `start_distributed` may
    follow. A notebook kernel calls `jaxmed.api.setup` instead: malloc settings made for one
    command's process do not belong in a long-lived kernel."""
    keep_freed_memory_on_cpu()
    use_compilation_cache()


def use_compilation_cache() -> str:
    """JAX's persistent compilation cache: a rerun (a resumed study, a second strategy of
    the same shape) loads compiled steps instead of compiling. ``$JAXMED_COMPILATION_CACHE``,
    else ``$JAXMED_CACHE/xla`` (default ``~/.cache/jaxmed``); returns the folder."""
    d = os.environ.get("JAXMED_COMPILATION_CACHE") or os.path.join(
        os.environ.get("JAXMED_CACHE", os.path.expanduser("~/.cache/jaxmed")), "xla")
    try:
        jax.config.update("jax_compilation_cache_dir", d)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    except Exception as e:  # noqa: BLE001 - a cache is an optimisation only
        logging.getLogger("jaxmed").warning("no persistent compilation cache: %s", e)
    return d


def start_distributed() -> None:
    """With ``JAXMED_DISTRIBUTED=1``, join the run's other processes
    (``jax.distributed.initialize``) before anything starts jax's backend. On a TPU VM, a
    SLURM or Open MPI job or Kubernetes jax finds the coordinator itself; elsewhere set
    ``JAX_COORDINATOR_ADDRESS=host:port`` (process 0's machine, the same on every process),
    ``JAXMED_NUM_PROCESSES`` and ``JAXMED_PROCESS_ID`` (0 .. N-1, a different one per
    process). Raises ConfigError (one line: what to set) when they are missing or wrong."""
    if os.environ.get("JAXMED_DISTRIBUTED") != "1" or jax.distributed.is_initialized():
        return  # a one-process run, or a caller (a test, a notebook) joined already
    kwargs = {}
    for key, env in (("num_processes", "JAXMED_NUM_PROCESSES"),
                     ("process_id", "JAXMED_PROCESS_ID")):
        text = os.environ.get(env, "").strip()
        if text:
            if not text.isdigit():
                raise ConfigError(f"{env}={text!r}: expected a whole number")
            kwargs[key] = int(text)
    try:
        jax.distributed.initialize(**kwargs)
    except (ValueError, TypeError) as err:
        raise ConfigError(
            f"JAXMED_DISTRIBUTED=1 but jax could not join the processes ({err}). No TPU VM, "
            "SLURM, Open MPI or Kubernetes job was detected to say where they are: on every "
            "process set JAX_COORDINATOR_ADDRESS=HOST:PORT (process 0's machine and a free "
            "port, the same everywhere), JAXMED_NUM_PROCESSES=N and JAXMED_PROCESS_ID=i "
            "(0 on the coordinator's machine, a different i < N on each other one); or unset "
            "JAXMED_DISTRIBUTED for a one-process run") from None
