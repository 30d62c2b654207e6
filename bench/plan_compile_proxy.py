"""What drives the TPU compile time of a train step: the test-architecture UNet step compiled
for TPU topologies (libtpu, no TPU) in variants, reporting CPU seconds of lower() and
compile() (on a shared machine steadier than wall time), the StableHLO size and what the
compiled program needs. The variants turn attention, remat, the topology, the image size
(compile time grows with it) and `train.compile_effort` (XLA's
exec_time_optimization_effort).

    python bench/plan_compile_proxy.py > proxy.jsonl
"""

from __future__ import annotations

import json
import resource
import time

from jaxmed import plan, plan_topologies, sharding
from jaxmed.cli import load_config, set_override

# (attention, remat, topology, resolution, compile effort); the first is repeated last to
# show the run-to-run spread
VARIANTS = [("auto", "True", "v5e-8", 32, 0.0), ("einsum", "True", "v5e-8", 32, 0.0),
            ("auto", "False", "v5e-8", 32, 0.0), ("auto", "True", "v5e-1", 32, 0.0),
            ("auto", "True", "v5e-8", 32, -1.0), ("auto", "True", "v5e-8", 128, 0.0),
            ("auto", "True", "v5e-8", 256, 0.0), ("auto", "True", "v5e-8", 256, -1.0),
            ("auto", "True", "v5e-8", 32, 0.0)]


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main() -> None:
    plan_topologies.prepare_environment(plan_topologies.get("v5e-8"))
    for attention, remat, name, resolution, effort in VARIANTS:
        c = load_config("configs/finetune.py:unet")
        for k, v in {"model.path": "random:test@32", "data.resolution": str(resolution),
                     "optim.grad_accum": "2", "train.per_device_batch": "1", "mesh.data": "1",
                     "mesh.fsdp": "-1", "model.dtype": "bfloat16", "model.remat": remat,
                     "model.attention": attention, "train.compile_effort": str(effort)}.items():
            set_override(c, k, v)
        topo = plan_topologies.get(name)
        step = plan.make_step(c, topo, plan_topologies.devices(topo))
        w0, c0 = time.perf_counter(), _cpu()
        with sharding.activation_sharding(step.mesh):
            lowered = step.jitted.trace(*step.args).lower()
        w1, c1 = time.perf_counter(), _cpu()
        compiled = lowered.compile()
        w2, c2 = time.perf_counter(), _cpu()
        print(json.dumps({
            "attention": attention, "remat": remat, "topology": name,
            "resolution": resolution, "compile_effort": effort,
            "lower_wall": round(w1 - w0, 1), "lower_cpu": round(c1 - c0, 1),
            "compile_wall": round(w2 - w1, 1), "compile_cpu": round(c2 - c1, 1),
            "stablehlo_lines": lowered.as_text().count("\n"),
            "temp": compiled.memory_analysis().temp_size_in_bytes,
            "code": compiled.memory_analysis().generated_code_size_in_bytes,
            "load": open("/proc/loadavg").read().split()[0]}), flush=True)


if __name__ == "__main__":
    main()
