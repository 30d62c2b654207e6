"""jaxmed.cli: joining a multi-process run from the environment (one clear line on what to
set when no cluster says where the coordinator is), and one error path for every tool
(`main_guard`: a user error is one ``error:`` line and exit 2, ``--debug`` or a bug shows the
traceback). The tools run in-process and fail before loading any model."""

import logging
import os
import socket
import subprocess
import sys

import pytest

from jaxmed import counts, evaluate, plan, sample, study, train
from jaxmed.cli import ConfigError
from jaxmed.data import corpus

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


@pytest.fixture
def root_logging():
    """Tools set the root handler and jaxmed's level (`cli.setup_logging`); put them back."""
    root, ours = logging.getLogger(), logging.getLogger("jaxmed")
    handlers, level, our_level = root.handlers[:], root.level, ours.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    ours.setLevel(our_level)


def _user_errors(tmp) -> dict:
    """tool -> (main, argv, what the one line says): each a mistake a user makes."""
    lora = ["--config", "configs/finetune.py:lora"]
    return {
        "train": (train.main, ["--config", "configs/nope.py", "--workdir", f"{tmp}/wd"],
                  "config file 'configs/nope.py' not found"),
        "study": (study.main, ["--config", "configs/study.py", "--workdir", f"{tmp}/wd",
                               "--config.sead=1"], "did you mean config.seed?"),
        "evaluate": (evaluate.main, ["--generated", f"{tmp}/gen", "--real", f"{tmp}/real.csv",
                                     "--out", f"{tmp}/out", "--no-inception", "--no-vendi"],
                     f"CSV file not found: {tmp}/real.csv"),
        "evaluate fid": (evaluate.main, ["fid", f"{tmp}/a", f"{tmp}/b"],
                         f"{tmp}/a: no such folder"),
        "sample": (sample.main, ["--model", "jaxmed:tiny-sd", "--combinations",
                                 f"{tmp}/combos.csv", "--out", f"{tmp}/out"],
                   f"combination CSV {tmp}/combos.csv not found"),
        "plan": (plan.main, [*lora, "--topology", "v5z-8"], "unknown topology 'v5z-8'"),
        "counts": (counts.main, [*lora, "--config.strategy.rnak=4"],
                   "did you mean config.strategy.rank?"),
        "corpus": (corpus.main, [f"{tmp}/corpus", "--n", "0"],
                   "a corpus needs at least 1 image of at least 8 px; got 0 images of 128 px"),
    }


@pytest.mark.parametrize("tool", ["train", "study", "evaluate", "evaluate fid", "sample",
                                  "plan", "counts", "corpus"])
def test_user_error_is_one_line_and_exit_2(tool, tmp_path, capsys, root_logging):
    main, argv, says = _user_errors(tmp_path)[tool]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.splitlines() == [err.strip()], err[-3000:]
    assert err.startswith("error: ") and says in err, err


def test_debug_shows_the_traceback_and_bugs_keep_theirs(tmp_path, capsys, monkeypatch,
                                                         root_logging):
    main, argv, says = _user_errors(tmp_path)["counts"]
    with pytest.raises(ConfigError, match=says):  # raised out of main: Python prints it
        main([*argv, "--debug"])
    with pytest.raises(FileNotFoundError, match="no such folder"):  # before the subcommand
        evaluate.main(["--debug", "fid", str(tmp_path / "a"), str(tmp_path / "b")])

    def bug(config):
        raise KeyError("a bug, not a user error")

    monkeypatch.setattr(counts, "report", bug)
    with pytest.raises(KeyError, match="a bug"):
        counts.main(argv[:2])
    # argparse's own usage errors stay argparse's: usage and exit status 2
    with pytest.raises(SystemExit) as exit_:
        sample.main(["--out", str(tmp_path / "out")])
    assert exit_.value.code == 2 and "usage: python -m jaxmed.sample" in capsys.readouterr().err
