#!/usr/bin/env bash
# Run jaxmed on one host with NVIDIA GPUs, detached, with a log.
#
#   bash launch/gpu.sh setup                       # venv + jax[cuda12] + jaxmed (editable)
#   bash launch/gpu.sh check                       # the GPUs jax sees
#   bash launch/gpu.sh train configs/finetune.py:lora,sd15 /data/runs/lora \
#       --config.mesh.fsdp=8 --config.data.kind=chexpert --config.data.csv=/data/chexpert/train.csv
#   bash launch/gpu.sh logs                        # the last lines of the latest run's log
#   bash launch/gpu.sh logs -f                     # follow it (Ctrl-C stops following only)
#   bash launch/gpu.sh stop                        # SIGTERM, then SIGKILL after 30 s
#
# One process drives every GPU of the host: jax sees them all as local devices and the
# ('data', 'fsdp', 'tensor') mesh spans them, so there is no jax.distributed here (no
# JAXMED_DISTRIBUTED). Pick GPUs with CUDA_VISIBLE_DEVICES=0,1,...
#
# Commands
#   setup                        check nvidia-smi; make VENV (installing python3-venv or
#                                virtualenv when `python3 -m venv` is missing); pip install
#                                JAX_SPEC, EXTRA_PIP and this checkout (editable).
#   check                        nvidia-smi -L, then the devices jax sees (foreground).
#   train|study CONFIG WORKDIR [--config.x.y=v ...]
#                                python -m jaxmed.<tool> --config CONFIG --workdir WORKDIR ...
#   sample [FLAGS...]            python -m jaxmed.sample FLAGS...
#   evaluate [FLAGS...]          python -m jaxmed.evaluate FLAGS...
#                                Runs start detached (setsid nohup): closing the terminal or
#                                a dropped ssh does not stop them. The log is
#                                LOG_DIR/<RUN>.log; a second run is refused while one is live
#                                (jax reserves most of each GPU's memory per process).
#   logs [-f] [RUN]              the last lines of RUN's log (default: the latest run); -f
#                                follows it.
#   stop [RUN]                   SIGTERM (then SIGKILL after 30 s) the run's process group.
#
# Environment (defaults in brackets)
#   VENV                         the virtual environment, relative to the checkout [.venv]
#   JAX_SPEC                     [jax[cuda12]] (pip wheels that bring CUDA and cuDNN; needs an
#                                NVIDIA driver for CUDA 12). With a driver for CUDA 13, use
#                                JAX_SPEC='jax[cuda13]'. Pin e.g. 'jax[cuda12]==0.10.2'.
#   EXTRA_PIP                    [etils[epath-gcs]]: gcsfs, for gs:// workdirs.
#   LOG_DIR                      [~/jaxmed-logs]
#   RUN                          the run's name [<tool>-<UTC date>-<time>]; [A-Za-z0-9._-].
#   DRY_RUN=1                    print every command (shell-quoted) instead of running it.
#
# Relative paths (CONFIG, WORKDIR, data) are relative to the checkout.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${VENV:-.venv}
[[ $VENV == /* ]] || VENV=$ROOT/$VENV
JAX_SPEC=${JAX_SPEC:-jax[cuda12]}
EXTRA_PIP=${EXTRA_PIP-etils[epath-gcs]}
LOG_DIR=${LOG_DIR:-$HOME/jaxmed-logs}
SELF="bash $(printf %q "${BASH_SOURCE[0]}")"
PROG=gpu.sh
# shellcheck source=launch/common.sh
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"

do_() {
  if [[ ${DRY_RUN:-0} == 1 ]]; then
    show "$@"
    echo
  else
    "$@"
  fi
}

need_gpu() {
  if [[ ${DRY_RUN:-0} == 1 ]]; then
    do_ nvidia-smi -L
    return
  fi
  command -v nvidia-smi >/dev/null \
    || die "nvidia-smi not found: this host has no NVIDIA driver (install the driver; the jax wheels bring CUDA)"
  nvidia-smi -L >&2 || die "nvidia-smi -L failed: the driver sees no GPU"
}

alive() {
  kill -0 "$1" 2>/dev/null && ! ps -o stat= -p "$1" | grep -q Z
}

pick_run() {
  if [[ -n ${1:-} ]]; then
    valid_run_name "$1"
    run=$1
  else
    [[ -s $LOG_DIR/latest ]] || die "no run in $LOG_DIR"
    run=$(<"$LOG_DIR/latest")
  fi
}

make_venv() {
  local py=python3
  if python3 -m venv "$VENV"; then
    return
  fi
  rm -rf "$VENV"
  if command -v apt-get >/dev/null; then
    local sudo=()
    [[ $(id -u) == 0 ]] || sudo=(sudo)
    if "${sudo[@]}" apt-get update -qq \
      && "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv \
      && "$py" -m venv "$VENV"; then
      return
    fi
    rm -rf "$VENV"
  fi
  "$py" -m pip install -q --user virtualenv && "$py" -m virtualenv -q "$VENV"
}

setup() {
  need_gpu
  cd "$ROOT"
  if [[ ! -x $VENV/bin/pip ]]; then
    if [[ ${DRY_RUN:-0} == 1 ]]; then
      do_ python3 -m venv "$VENV"
    else
      rm -rf "$VENV"
      make_venv
    fi
  fi
  local pip=("$VENV/bin/python" -m pip install -q -U)
  do_ "${pip[@]}" pip
  local pkgs=(-e "$ROOT" "$JAX_SPEC")
  if [[ -n $EXTRA_PIP ]]; then
    pkgs+=("$EXTRA_PIP")
  fi
  do_ "${pip[@]}" "${pkgs[@]}"
  check_jax
}

check_jax() {
  do_ "$VENV/bin/python" -c 'import jax; d = jax.devices(); print("jax", jax.__version__, len(d), "devices:", d); assert d[0].platform == "gpu", "jax sees no GPU: is JAX_SPEC a CUDA build matching the driver?"'
}

launch() {
  local tool=$1
  shift
  need_gpu
  local run=${RUN:-$tool-$(date -u +%Y%m%d-%H%M%S)}
  valid_run_name "$run"
  local log=$LOG_DIR/$run.log pidfile=$LOG_DIR/$run.pid f
  for f in "$LOG_DIR"/*.pid; do
    if [[ -s $f ]] && alive "$(<"$f")"; then
      die "run $(basename "$f" .pid) is still running (pid $(<"$f")): $SELF stop first"
    fi
  done
  # The wrapper stamps the log with the start and the exit status; it gets the program as
  # its arguments, so no word of it is ever re-parsed by a shell.
  # shellcheck disable=SC2016  # expanded by the wrapper's bash
  local wrapper='echo "[gpu.sh] $(date -u +%FT%TZ) $(hostname): $*"; "$@"; rc=$?; echo "[gpu.sh] $(date -u +%FT%TZ) exit status $rc"; exit $rc'
  local argv=(setsid nohup bash -c "$wrapper" "jaxmed-$tool"
             "$VENV/bin/python" -m "jaxmed.$tool" "$@")
  if [[ ${DRY_RUN:-0} == 1 ]]; then
    echo "cd $(show "$ROOT") && PYTHONUNBUFFERED=1 $(show "${argv[@]}") > $(show "$log") 2>&1 < /dev/null &"
  else
    mkdir -p "$LOG_DIR"
    (cd "$ROOT" && export PYTHONUNBUFFERED=1 && exec "${argv[@]}" >"$log" 2>&1 </dev/null) &
    echo $! >"$pidfile"
    echo "$run" >"$LOG_DIR/latest"
    info "started $run (pid $!), log $log"
  fi
  info "  last lines:  $SELF logs $run"
  info "  follow:      $SELF logs -f $run     (or: tail -f $(show "$log"))"
  info "  stop:        $SELF stop $run"
}

cmd=${1:-}
case "$cmd" in
  -h|--help|help) usage; exit 0 ;;
  "") usage >&2; exit 2 ;;
  setup|check|train|study|sample|evaluate|logs|stop) shift ;;
  *) die "unknown command '$cmd' (setup | check | train | study | sample | evaluate | logs | stop; --help for more)" ;;
esac

case "$cmd" in
  setup) setup ;;
  check)
    need_gpu
    check_jax
    ;;
  train|study)
    [[ $# -ge 2 ]] || die "usage: gpu.sh $cmd CONFIG WORKDIR [--config.x.y=v ...]"
    config=$1 workdir=$2
    shift 2
    launch "$cmd" --config "$config" --workdir "$workdir" "$@"
    ;;
  sample|evaluate) launch "$cmd" "$@" ;;
  logs)
    follow=()
    if [[ ${1:-} == -f ]]; then
      follow=(-F)
      shift
    fi
    pick_run "${1:-}"
    state=finished
    if [[ -s $LOG_DIR/$run.pid ]] && alive "$(<"$LOG_DIR/$run.pid")"; then
      state=running
    fi
    echo "== run $run ($state), $LOG_DIR/$run.log"
    do_ tail -n "${TAIL_LINES:-20}" "${follow[@]}" "$LOG_DIR/$run.log"
    ;;
  stop)
    pick_run "${1:-}"
    pidfile=$LOG_DIR/$run.pid
    if [[ -s $pidfile ]] && p=$(<"$pidfile") && alive "$p"; then
      do_ kill -TERM -- "-$p"
      for _ in $(seq 30); do
        alive "$p" || break
        sleep 1
      done
      if alive "$p"; then
        do_ kill -KILL -- "-$p"
      fi
      echo "stopped $run (pid $p)"
    else
      echo "$run is not running"
    fi
    ;;
esac
