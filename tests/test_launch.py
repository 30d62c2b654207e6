"""launch/tpu_pod.sh and launch/gpu.sh: quoting, detached runs, logs, stop, errors.

No network and no accelerator: DRY_RUN=1 prints the gcloud commands, and the remote command
is then run here by bash with HOME set to a scratch folder that plays a TPU worker (its
``jaxmed/.venv/bin/python`` is a stub that logs its arguments and sleeps). gpu.sh runs for
real against a fake ``nvidia-smi`` and the same stub.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers import ROOT

TPU_POD = ROOT / "launch" / "tpu_pod.sh"
GPU = ROOT / "launch" / "gpu.sh"

# An argument that breaks any unquoted or twice-parsed command line: a space, a quote, a
# variable, a glob, a command substitution and a semicolon.
NASTY = "--config.data.csv=/data/a b.csv"
NASTY2 = "--config.data.image_root=$HOME/it's *;$(touch /tmp/jaxmed-launch-pwned)"

STUB = """#!/usr/bin/env bash
for a in "$@"; do printf 'ARG<%s>\\n' "$a"; done
echo "JAXMED_DISTRIBUTED=${JAXMED_DISTRIBUTED:-}"
echo "JAX_PLATFORMS=${JAX_PLATFORMS:-}"
echo READY
exec sleep 30
"""


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("TPU", "ZONE", "PROJECT", "RUN", "WORKERS", "DRY_RUN", "BUCKET")}
    env.update(extra)
    return env


def _run(script: Path, *args: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(script), *args], env=_env(**env), capture_output=True,
                          text=True, timeout=60)


def _tpu_dry(*args: str, **env) -> tuple[list[str], subprocess.CompletedProcess]:
    """(argv of the one printed gcloud command, the process)."""
    p = _run(TPU_POD, *args, DRY_RUN="1", TPU="my tpu", ZONE="us-west4-a", **env)
    assert p.returncode == 0, p.stderr
    lines = [ln for ln in p.stdout.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("gcloud "), p.stdout
    return shlex.split(lines[0]), p


def _remote(argv: list[str]) -> str:
    (command,) = [a for a in argv if a.startswith("--command=")]
    return command[len("--command="):]


def _make_worker(home: Path, checkout: str = "jaxmed") -> None:
    py = home / checkout / ".venv" / "bin" / "python"
    py.parent.mkdir(parents=True)
    py.write_text(STUB)
    py.chmod(0o755)


def _on_worker(remote: str, home: Path) -> subprocess.CompletedProcess:
    """Run a remote command as sshd would on a worker: `bash -c COMMAND` in its home."""
    return subprocess.run(["bash", "-c", remote], env=_env(HOME=str(home)), cwd=home,
                          capture_output=True, text=True, timeout=60)


def _wait_for(path: Path, text: str, timeout: float = 20) -> str:
    end = time.time() + timeout
    while time.time() < end:
        if path.exists() and text in path.read_text():
            return path.read_text()
        time.sleep(0.1)
    raise AssertionError(f"{text!r} not in {path}: "
                         f"{path.read_text() if path.exists() else 'missing'}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] == "Z")


@pytest.fixture
def cleanup():
    """Kill every process group whose pid file a test left behind."""
    folders = []
    yield folders.append
    for folder in folders:
        for pidfile in Path(folder).rglob("*.pid"):
            try:
                os.killpg(int(pidfile.read_text()), signal.SIGKILL)
            except (ProcessLookupError, ValueError, PermissionError):
                pass


@pytest.mark.parametrize("script", [TPU_POD, GPU], ids=lambda p: p.name)
def test_bash_syntax(script):
    subprocess.run(["bash", "-n", str(script)], check=True)


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
def test_shellcheck_clean():
    # -x follows the `. common.sh` both scripts source (the path is relative to the repo).
    p = subprocess.run(["shellcheck", "-x", str(TPU_POD), str(GPU),
                        str(TPU_POD.parent / "common.sh")], capture_output=True, text=True,
                       cwd=TPU_POD.parent.parent)
    assert p.returncode == 0, p.stdout + p.stderr


@pytest.mark.parametrize("script", [TPU_POD, GPU], ids=lambda p: p.name)
def test_unknown_subcommand_exits_2(script):
    p = _run(script, "frobnicate", DRY_RUN="1", TPU="t", ZONE="z")
    assert p.returncode == 2
    assert "unknown command 'frobnicate'" in p.stderr
    assert p.stdout == ""


@pytest.mark.parametrize("script", [TPU_POD, GPU], ids=lambda p: p.name)
def test_help(script):
    p = _run(script, "--help")
    assert p.returncode == 0 and "train|study CONFIG WORKDIR" in p.stdout
    assert _run(script).returncode == 2  # no command: usage on stderr


def test_tpu_missing_tpu_or_zone_is_a_clear_error():
    p = _run(TPU_POD, "train", "configs/finetune.py:lora", "gs://b/run", DRY_RUN="1",
             ZONE="us-west4-a")
    assert p.returncode != 0 and "set TPU" in p.stderr and p.stdout == ""
    p = _run(TPU_POD, "setup", DRY_RUN="1", TPU="t")
    assert p.returncode != 0 and "set ZONE" in p.stderr and p.stdout == ""


def test_tpu_train_quotes_each_argument_once_and_detaches():
    argv, p = _tpu_dry("train", "configs/finetune.py:lora,sd15", "gs://b/run", NASTY, NASTY2)
    assert argv[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my tpu"]
    assert "--zone=us-west4-a" in argv and "--worker=all" in argv
    words = shlex.split(_remote(argv))
    i = words.index("jaxmed.train")
    assert words[i - 2:i] == [".venv/bin/python", "-m"]
    assert words[i + 1:i + 7] == ["--config", "configs/finetune.py:lora,sd15",
                                  "--workdir", "gs://b/run", NASTY, NASTY2]
    assert "setsid" in words and "nohup" in words  # detached: survives a dropped ssh
    assert "JAXMED_DISTRIBUTED=1" in words
    # One log per worker, named for the worker's host, in ~/jaxmed-logs.
    logs = [w for w in words if w.startswith("log=$HOME/jaxmed-logs/train-")
            and w.endswith(".$h.log;")]
    assert logs and "h=$(hostname);" in words
    assert "logs" in p.stderr and "stop" in p.stderr  # how to follow and stop it


def test_tpu_run_on_a_simulated_worker(tmp_path, cleanup):
    """The printed remote commands, run by bash as a worker would: launch, refuse a second
    run, logs, stop -- and every argument reaches Python exactly as typed."""
    home = tmp_path / "worker"
    _make_worker(home)
    cleanup(home)
    pwned = Path("/tmp/jaxmed-launch-pwned")
    pwned.unlink(missing_ok=True)
    argv, _ = _tpu_dry("train", "configs/finetune.py:lora,sd15", "gs://b/run", NASTY, NASTY2,
                       RUN="r1")
    p = _on_worker(_remote(argv), home)
    assert p.returncode == 0, p.stderr
    assert "started r1" in p.stdout
    host = subprocess.run(["hostname"], capture_output=True, text=True).stdout.strip()
    log = home / "jaxmed-logs" / f"r1.{host}.log"
    text = _wait_for(log, "READY")
    args = [ln[4:-1] for ln in text.splitlines() if ln.startswith("ARG<")]
    assert args == ["-m", "jaxmed.train", "--config", "configs/finetune.py:lora,sd15",
                    "--workdir", "gs://b/run", NASTY, NASTY2]
    assert "JAXMED_DISTRIBUTED=1" in text and "[tpu_pod.sh]" in text
    assert not pwned.exists()
    pid = int((home / "jaxmed-logs" / f"r1.{host}.pid").read_text())
    assert _alive(pid) and os.getpgid(pid) == pid  # its own process group: stop kills it all
    assert (home / "jaxmed-logs" / "latest").read_text().strip() == "r1"

    # The chips serve one process: a second run on the worker is refused.
    argv, _ = _tpu_dry("study", "configs/study.py:ci", "gs://b/s", RUN="r2")
    p = _on_worker(_remote(argv), home)
    assert p.returncode != 0 and "r1 is still running" in p.stderr
    assert not (home / "jaxmed-logs" / f"r2.{host}.log").exists()

    argv, _ = _tpu_dry("logs")
    p = _on_worker(_remote(argv), home)
    assert p.returncode == 0, p.stderr
    assert f"== {host}: run r1 (running)" in p.stdout
    assert f"[{host}] ARG<{NASTY}>" in p.stdout

    argv, _ = _tpu_dry("stop")
    p = _on_worker(_remote(argv), home)
    assert p.returncode == 0, p.stderr
    assert f"{host}: stopped r1" in p.stdout
    assert not _alive(pid)
    argv, _ = _tpu_dry("logs", "r1")
    assert "run r1 (finished)" in _on_worker(_remote(argv), home).stdout
    argv, _ = _tpu_dry("stop", "r1")
    assert "r1 is not running" in _on_worker(_remote(argv), home).stdout


def test_tpu_create_setup_and_evaluate_commands():
    argv, _ = _tpu_dry("create", "--spot")
    assert argv[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "my tpu"]
    assert "--accelerator-type=v5litepod-8" in argv
    assert "--version=v2-alpha-tpuv5-lite" in argv and argv[-1] == "--spot"
    argv, _ = _tpu_dry("create", ACCELERATOR_TYPE="v6e-8", RUNTIME_VERSION="v2-alpha-tpuv6e",
                       PROJECT="p")
    assert {"--accelerator-type=v6e-8", "--version=v2-alpha-tpuv6e", "--project=p"} <= set(argv)

    argv, _ = _tpu_dry("setup", BRANCH="dev branch")
    setup = _remote(argv)
    words = shlex.split(setup)
    assert "dev branch" in words  # quoted
    assert "python3-venv" in words and "virtualenv" in words  # the venv fallbacks
    assert "jax[tpu]" in words and "-e" in words

    argv, _ = _tpu_dry("evaluate", "--generated", "gs://b/s", "--real", "/d/t t.csv",
                       "--out", "/tmp/e")
    assert "--worker=0" in argv  # one process, not the whole slice
    words = shlex.split(_remote(argv))
    assert "JAX_PLATFORMS=cpu" in words and "JAXMED_DISTRIBUTED=1" not in words
    i = words.index("jaxmed.evaluate")
    assert words[i + 1:i + 7] == ["--generated", "gs://b/s", "--real", "/d/t t.csv",
                                  "--out", "/tmp/e"]

    p = _run(TPU_POD, "train", "c", "rel/dir", DRY_RUN="1", TPU="t", ZONE="z", RUN="bad name")
    assert p.returncode == 2 and "RUN=bad name" in p.stderr
    p = _run(TPU_POD, "train", "c", DRY_RUN="1", TPU="t", ZONE="z")
    assert p.returncode == 2 and "CONFIG WORKDIR" in p.stderr


def _fake_gpu_path(tmp_path: Path, with_driver: bool) -> str:
    """PATH with (or without) a fake nvidia-smi and without any real one."""
    fake = tmp_path / "fakebin"
    fake.mkdir(exist_ok=True)
    if with_driver:
        smi = fake / "nvidia-smi"
        smi.write_text("#!/bin/sh\necho 'GPU 0: Fake H100 (UUID: GPU-0)'\n")
        smi.chmod(0o755)
    dirs = [d for d in os.environ["PATH"].split(os.pathsep)
            if d and not os.path.exists(os.path.join(d, "nvidia-smi"))]
    return os.pathsep.join([str(fake), *dirs])


def test_gpu_dry_run_quotes_and_detaches(tmp_path):
    p = _run(GPU, "train", "configs/finetune.py:lora,sd15", "gs://b/run", NASTY, NASTY2,
             DRY_RUN="1", LOG_DIR=str(tmp_path / "logs dir"), RUN="g1")
    assert p.returncode == 0, p.stderr
    (line,) = [ln for ln in p.stdout.splitlines() if "jaxmed.train" in ln]
    words = shlex.split(line)
    i = words.index("jaxmed.train")
    assert words[i + 1:i + 7] == ["--config", "configs/finetune.py:lora,sd15",
                                  "--workdir", "gs://b/run", NASTY, NASTY2]
    assert "setsid" in words and "nohup" in words and words[-1] == "&"
    assert words[words.index(">") + 1] == str(tmp_path / "logs dir" / "g1.log")
    assert "JAXMED_DISTRIBUTED=1" not in line  # one process drives every local GPU


def test_gpu_needs_a_driver(tmp_path):
    p = _run(GPU, "train", "c", "w", PATH=_fake_gpu_path(tmp_path, with_driver=False),
             LOG_DIR=str(tmp_path / "logs"))
    assert p.returncode != 0 and "nvidia-smi not found" in p.stderr


def test_gpu_run_logs_stop(tmp_path, cleanup):
    venv = tmp_path / "venv"
    py = venv / "bin" / "python"
    py.parent.mkdir(parents=True)
    py.write_text(STUB)
    py.chmod(0o755)
    logs = tmp_path / "logs"
    cleanup(logs)
    env = dict(PATH=_fake_gpu_path(tmp_path, with_driver=True), VENV=str(venv),
               LOG_DIR=str(logs))
    p = _run(GPU, "train", "configs/finetune.py:lora,sd15", str(tmp_path / "w d"), NASTY,
             NASTY2, RUN="g2", **env)
    assert p.returncode == 0, p.stderr
    text = _wait_for(logs / "g2.log", "READY")
    args = [ln[4:-1] for ln in text.splitlines() if ln.startswith("ARG<")]
    assert args == ["-m", "jaxmed.train", "--config", "configs/finetune.py:lora,sd15",
                    "--workdir", str(tmp_path / "w d"), NASTY, NASTY2]
    assert "JAXMED_DISTRIBUTED=\n" in text
    pid = int((logs / "g2.pid").read_text())
    assert _alive(pid) and os.getpgid(pid) == pid

    p = _run(GPU, "sample", "--model", "x", RUN="g3", **env)
    assert p.returncode != 0 and "g2 is still running" in p.stderr

    p = _run(GPU, "logs", **env)
    assert p.returncode == 0 and "run g2 (running)" in p.stdout and f"ARG<{NASTY}>" in p.stdout
    p = _run(GPU, "stop", **env)
    assert p.returncode == 0 and "stopped g2" in p.stdout, p.stderr
    assert not _alive(pid)
    assert "run g2 (finished)" in _run(GPU, "logs", "g2", **env).stdout
