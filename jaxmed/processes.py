"""Several JAX processes (one per host of a pod): start-up, and process 0 deciding for all.

Global computations (training, sampling over the global mesh) run on every process in
lockstep; host-side work (writing files, metrics on host arrays) runs on process 0 alone.
Whatever steers a global computation (which images are still missing, which models are
unfinished, whether a finished fine-tuning run is reused) must be the same on every
process, so process 0 decides it from its view of the files and the others take its
answer: `on_main` runs a function on process 0 and hands its JSON result to every
process through the distributed runtime's key-value store. A process waiting there gives
up after a timeout (``$JAXMED_PEER_TIMEOUT`` seconds) with a message saying what it
waited for, and raises process 0's error if process 0 failed (`abort_peers_on_error`).
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
from jax._src import distributed

log = logging.getLogger("jaxmed.processes")

# Process 0's host-side phases between two global ones (a study model's evaluation and
# downstream classifiers) can take hours on the paper preset; a dead peer is noticed
# sooner by the runtime's heartbeats.
DEFAULT_TIMEOUT_S = 6 * 3600.0
_POLL_S = 2.0
_NOTE_EVERY_S = 300.0
_ABORT = "jaxmed/abort"
_calls: collections.Counter = collections.Counter()


class PeerError(RuntimeError):
    """Process 0 failed, or did not answer in time, while this process waited for it."""


def is_main() -> bool:
    return jax.process_index() == 0


def timeout_s() -> float:
    return float(os.environ.get("JAXMED_PEER_TIMEOUT") or DEFAULT_TIMEOUT_S)


def on_main(what: str, fn: Callable[[], Any] | None = None, *,
            timeout: float | None = None) -> Any:
    """``fn()`` on process 0; every other process gets its result, JSON-encoded (so tuples
    arrive as lists), or a `PeerError` carrying process 0's error. Every process must make
    the same sequence of calls with the same ``what`` (the others may pass ``fn=None``).
    One process: just ``fn()``."""
    if jax.process_count() == 1:
        return fn() if fn is not None else None
    _calls[what] += 1
    key = f"jaxmed/{what}/{_calls[what]}"
    client = _client()
    if is_main():
        try:
            value = fn() if fn is not None else None
        except BaseException as err:
            client.key_value_set(key, json.dumps({"error": _describe(err)}))
            raise
        client.key_value_set(key, json.dumps({"value": value}, default=str))
        return value
    got = _wait(client, key, what, timeout_s() if timeout is None else timeout)
    if "error" in got:
        raise PeerError(f"process 0 failed at '{what}': {got['error']}")
    return got["value"]


@contextlib.contextmanager
def abort_peers_on_error() -> Iterator[None]:
    """On process 0: an exception inside tells every process waiting in `on_main` (for
    any key) to stop with process 0's message instead of waiting for its timeout."""
    try:
        yield
    except BaseException as err:
        if jax.process_count() > 1 and is_main():
            with contextlib.suppress(Exception):
                _client().key_value_set(_ABORT, _describe(err), allow_overwrite=True)
        raise


def _describe(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}".strip()


def _client():
    client = distributed.global_state.client
    if client is None:  # several processes without the runtime: cannot happen via initialize
        raise RuntimeError("jax runs several processes but jax.distributed has no client")
    return client


def _wait(client, key: str, what: str, timeout: float) -> dict:
    me = jax.process_index()
    start = time.monotonic()
    noted = start
    while True:
        try:
            return json.loads(client.blocking_key_value_get(key, int(_POLL_S * 1000)))
        except Exception as err:  # noqa: BLE001 - the runtime raises XlaRuntimeError
            if "DEADLINE_EXCEEDED" not in str(err):
                raise PeerError(f"process {me} lost process 0 while waiting for '{what}': "
                                f"{err}") from err
        try:
            abort = client.key_value_try_get(_ABORT)
        except Exception:  # noqa: BLE001 - NOT_FOUND: process 0 has not stopped
            abort = None
        if abort is not None:
            raise PeerError(f"process 0 stopped ({abort}) while process {me} waited for "
                            f"'{what}'")
        now = time.monotonic()
        if now - start > timeout:
            raise PeerError(
                f"process {me} waited {timeout:.0f}s for process 0 to finish '{what}' and "
                "gave up: process 0 is stuck or gone (its log says which). If that step "
                "legitimately takes longer, raise $JAXMED_PEER_TIMEOUT (seconds).")
        if now - noted > _NOTE_EVERY_S:
            noted = now
            log.info("process %d: still waiting for process 0 to finish '%s' (%.0f s)",
                     me, what, now - start)

