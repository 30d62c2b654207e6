"""jaxmed.cli: joining a multi-process run from the environment (one clear line on what to
set when no cluster says where the coordinator is), and storage URLs passed through."""

import os
import socket
import subprocess
import sys

_DISTRIBUTED = r"""
import os
from jaxmed.cli import ConfigError, start_distributed
import jax

os.environ["JAXMED_DISTRIBUTED"] = "1"
for env in ({}, {"JAX_COORDINATOR_ADDRESS": "localhost:1"},
            {"JAX_COORDINATOR_ADDRESS": "localhost:1", "JAXMED_NUM_PROCESSES": "two"}):
    os.environ.update(env)
    try:
        start_distributed()
        raise SystemExit(f"no error with {env}")
    except ConfigError as err:
        print(str(err).replace("\n", " "))
os.environ.update(JAX_COORDINATOR_ADDRESS=f"localhost:{PORT}", JAXMED_NUM_PROCESSES="1",
                  JAXMED_PROCESS_ID="0")
start_distributed()
print("joined", jax.process_count(), jax.process_index())
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_distributed_without_a_cluster_says_what_to_set():
    env = {k: v for k, v in os.environ.items()
           if k not in ("JAX_COORDINATOR_ADDRESS", "JAXMED_NUM_PROCESSES", "JAXMED_PROCESS_ID")}
    out = subprocess.run([sys.executable, "-c", _DISTRIBUTED.replace("PORT", str(_free_port()))],
                         capture_output=True, text=True, timeout=300,
                         env={**env, "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 4, out.stdout
    for line in lines[:2]:  # no coordinator, then no process count: the same advice
        assert line.startswith("JAXMED_DISTRIBUTED=1 but jax could not join"), line
        for var in ("JAX_COORDINATOR_ADDRESS=HOST:PORT", "JAXMED_NUM_PROCESSES=N",
                    "JAXMED_PROCESS_ID=i", "unset JAXMED_DISTRIBUTED"):
            assert var in line, (var, line)
    assert "coordinator_address" in lines[0] and "Number of processes" in lines[1]
    assert lines[2] == "JAXMED_NUM_PROCESSES='two': expected a whole number"
    # With the three variables set it joins (here a run of one process).
    assert lines[3] == "joined 1 0"
