"""One JAX process of a multi-process training run on this machine (tests/test_multiprocess.py).

    python tests/mp_worker.py PROCESS_ID NUM_PROCESSES PORT STRATEGY MODEL CSV WORKDIR OUT.npz \
        [key=value ...]     ("{pid}" in a value: this process's id)

Each process sees the CPU devices XLA_FLAGS gives it (``--xla_force_host_platform_device_count``)
and, with NUM_PROCESSES > 1, joins the others through ``jax.distributed.initialize`` on
localhost:PORT (cross-process CPU collectives: gloo). All processes train on the same workdir
(shared storage) with a data=2 x fsdp=4 mesh over the global devices. Process 0 writes OUT.npz:
the final trainable parameters (gathered from every process) under ``params/...``.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback

import jax

jax.config.update("jax_compilation_cache_dir", os.path.abspath(os.environ.get(
    "JAXMED_COMPILATION_CACHE", os.path.join(os.path.dirname(__file__), "..", ".jax_cache"))))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_default_matmul_precision", "highest")
# Collectives between the CPU processes (the default in jax 0.10; set so an older default
# of "none" cannot turn the run into a hang).
jax.config.update("jax_cpu_collectives_implementation", "gloo")

import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

from jaxmed import train  # noqa: E402
from jaxmed.strategies.base import flatten  # noqa: E402
from tests.train_worker import config  # noqa: E402


def main(argv):
    pid, nproc, port = int(argv[0]), int(argv[1]), int(argv[2])
    strategy, model, csv, workdir, out = argv[3:8]
    # "{pid}" in a value stands for this process's id (e.g. a cache folder per process).
    overrides = dict(a.replace("{pid}", str(pid)).split("=", 1) for a in argv[8:])
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("jaxmed.cache").setLevel(logging.INFO)
    if nproc > 1:
        jax.distributed.initialize(coordinator_address=f"localhost:{port}",
                                   num_processes=nproc, process_id=pid,
                                   initialization_timeout=120)
    assert jax.device_count() == 8, f"expected 8 global devices, got {jax.device_count()}"
    c = config(strategy, model, csv, **{"mesh.data": 2, "mesh.fsdp": 4,
                                        "train.per_device_batch": 1, "log.every_steps": 1,
                                        **overrides})
    trainer = train.Trainer(c, workdir)
    trainer.run()
    # Every process joins the gather; each leaf comes back whole on every process.
    flat = flatten(multihost_utils.process_allgather(trainer.state.trainable, tiled=True))
    if jax.process_index() == 0:
        np.savez(out, **{"params/" + "/".join(p): np.asarray(v) for p, v in flat.items()})
    print(f"[mp_worker {pid}/{nproc}] done", flush=True)
    return 0


if __name__ == "__main__":
    try:
        rc = main(sys.argv[1:])
    except BaseException:  # noqa: BLE001 - fail now: the distributed shutdown would wait
        traceback.print_exc()  # for the other processes (minutes) before exiting
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
    sys.exit(rc)
