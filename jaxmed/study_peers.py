"""The study under several JAX processes: what every process but 0 does.

A study alternates global phases, which every process must join in the same order
(fine-tuning: `jaxmed.train`; synthesis: `jaxmed.sample.synthesize` over all devices), with
host-side ones that process 0 does alone (the phantom data, the judge and downstream
classifiers, the evaluation, done.json, the results files). The others follow process 0's
plan (`jaxmed.processes.on_main`): the models still to run, then for each one they wait
until process 0 starts it (it may spend hours on the previous model's evaluation; the
wait's timeout is ``$JAXMED_PEER_TIMEOUT``), fine-tune it with process 0 (or load the same
finished run: process 0 decides) and synthesise its images, and finally return process 0's
results summary. Every file is written by process 0; the others read only what process 0
finished before answering (the fine-tuning export, the combination CSV), so the workdir
must be shared storage, as orbax checkpoints already require.
"""

from __future__ import annotations

from typing import Any

from jaxmed import processes
from jaxmed.eval.tables import BASE

PLAN = "study: the models to run"
RESULTS = "study: the results files"


def start(name: str) -> str:
    return f"study {name}: start"


def run_peer(study: Any) -> dict:
    """A process other than 0 through ``study`` (a `jaxmed.study.Study`): its share of every
    global computation of the models process 0 runs; returns process 0's results summary."""
    for name in processes.on_main(PLAN):
        processes.on_main(start(name))
        params = study.base_model()[1] if name == BASE else study.train_model(name)[0]
        study.synthesize_model(name, params)
        del params
    return processes.on_main(RESULTS)
