"""CPU seconds per phase of a cold `jaxmed.study` run (where a first run's time goes).

    python bench/bench_study_phases.py --config configs/study.py:demo --workdir /tmp/ph \
        --config.strategies="('lora',)" --config.log.progress=False

Runs `jaxmed.study` with every cache cold (a fresh XLA persistent compilation cache and
C++ kernel folder under the workdir, unless ``JAXMED_COMPILATION_CACHE`` /
``JAXMED_KERNEL_DIR`` are set) and prints, at each of the study's stage lines, the process
CPU seconds (self + children, so the kernels' C++ builds count) spent since the previous
stage and the number of XLA compiles. CPU seconds, unlike wall time, stay meaningful on a
machine shared with other work. A reduced model list (base + one strategy) gives the
one-time costs and one model's costs; multiply the per-model ones out for the full preset.
"""

from __future__ import annotations

import os
import resource
import sys
import time

import jax
import jax.monitoring

from jaxmed import study

COMPILE = "/jax/core/compile/backend_compile_duration"
_compiles = [0]


def _on_duration(event: str, secs: float, **kw) -> None:
    if event == COMPILE:
        _compiles[0] += 1


def cpu_seconds() -> float:
    a = resource.getrusage(resource.RUSAGE_SELF)
    b = resource.getrusage(resource.RUSAGE_CHILDREN)
    return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime


def main(argv: list[str]) -> int:
    if "--workdir" in argv:
        wd = os.path.abspath(argv[argv.index("--workdir") + 1])
        os.environ.setdefault("JAXMED_COMPILATION_CACHE", os.path.join(wd, "_cold", "xla"))
        os.environ.setdefault("JAXMED_KERNEL_DIR", os.path.join(wd, "_cold", "kernels"))
    jax.monitoring.register_event_duration_secs_listener(_on_duration)
    last = {"cpu": cpu_seconds(), "n": 0, "msg": "start-up", "t": time.perf_counter()}
    stage = study.Study.stage

    def close_phase(msg: str) -> None:
        c = cpu_seconds()
        print(f"[phase] {c - last['cpu']:7.1f} cpu s  {_compiles[0] - last['n']:3d} compiles  "
              f"{time.perf_counter() - last['t']:7.1f} wall s  <- {last['msg'][:70]}",
              flush=True)
        last.update(cpu=c, n=_compiles[0], msg=msg, t=time.perf_counter())

    def timed_stage(self, msg: str) -> None:
        close_phase(msg)
        stage(self, msg)

    study.Study.stage = timed_stage
    try:
        return study.main(argv)
    finally:
        close_phase("end")
        print(f"[phase] total {cpu_seconds():.1f} cpu s, {_compiles[0]} compiles", flush=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
