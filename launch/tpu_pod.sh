#!/usr/bin/env bash
# Create a Cloud TPU VM (one host or a multi-host pod slice), install jaxmed on every worker
# and run jaxmed there, detached, one log per worker.
#
#   export TPU=jaxmed-v5e ZONE=us-west4-a          # PROJECT=my-project (optional)
#   export BUCKET=gs://my-jaxmed-runs              # shared storage, mounted at /mnt/runs
#   bash launch/tpu_pod.sh create                  # v5litepod-8 (see ACCELERATOR_TYPE)
#   bash launch/tpu_pod.sh bucket                  # creates $BUCKET in the TPU's region
#   bash launch/tpu_pod.sh setup                   # clone + venv + jax[tpu] on all workers
#   bash launch/tpu_pod.sh check                   # every worker sees every chip
#   bash launch/tpu_pod.sh exec bash -c 'sudo mkdir -p /mnt/runs && sudo chown "$USER" /mnt/runs && gcsfuse --implicit-dirs my-jaxmed-runs /mnt/runs'
#   bash launch/tpu_pod.sh train configs/finetune.py:lora,sd15 /mnt/runs/lora \
#       --config.cache.dir=/tmp/jaxmed-cache --config.mesh.fsdp=8 \
#       --config.data.kind=chexpert --config.data.csv=/data/chexpert/train.csv
#   bash launch/tpu_pod.sh logs                    # last lines of each worker's log
#   bash launch/tpu_pod.sh logs -f                 # follow them (Ctrl-C stops following only)
#   bash launch/tpu_pod.sh stop                    # kill the run on every worker
#   bash launch/tpu_pod.sh delete                  # delete the TPU VM (gcloud asks first)
#
# Commands
#   create [GCLOUD_FLAGS...]     gcloud compute tpus tpu-vm create $TPU with
#                                ACCELERATOR_TYPE and RUNTIME_VERSION; extra flags are passed
#                                on (e.g. --spot, --service-account=...).
#   bucket                       gcloud storage buckets create $BUCKET in $ZONE's region.
#   setup                        on every worker: clone (or pull) REPO@BRANCH into ~/REMOTE_DIR,
#                                make .venv there (installing python3-venv or virtualenv when
#                                the image lacks `python3 -m venv`), pip install JAX_SPEC,
#                                EXTRA_PIP and jaxmed (editable).
#   check                        every worker initialises jax.distributed and prints its
#                                process index and local/global device counts (foreground).
#   train|study CONFIG WORKDIR [--config.x.y=v ...]
#                                python -m jaxmed.<tool> --config CONFIG --workdir WORKDIR ...
#   sample [FLAGS...]            python -m jaxmed.sample FLAGS... (e.g. --model "$BUCKET/lora"
#                                --combinations combos.csv --out "$BUCKET/lora/synth")
#   evaluate [FLAGS...]          python -m jaxmed.evaluate FLAGS..., on worker 0 only (see
#                                EVAL_PLATFORMS).
#                                Runs start detached (setsid nohup) on the workers: a dropped
#                                ssh connection does not stop them. Each worker logs to
#                                ~/LOG_DIR/<RUN>.<hostname>.log. A worker with a live run
#                                refuses a second one (the chips serve one process).
#   logs [-f] [RUN]              the last lines of each worker's log of RUN (default: the
#                                latest run), with its state; -f follows them.
#   stop [RUN]                   SIGTERM (then SIGKILL after 30 s) the run's process group on
#                                every worker.
#   exec CMD [ARGS...]           run CMD in ~/REMOTE_DIR with the venv, on every worker, in the
#                                foreground (short commands: ls, nvidia-smi-like checks).
#   ssh [WORKER]                 an interactive shell on one worker (default 0).
#   delete                       gcloud compute tpus tpu-vm delete $TPU (gcloud asks first).
#
# Environment (defaults in brackets)
#   TPU, ZONE                    required: the TPU VM's name and zone.
#   PROJECT                      the Google Cloud project [gcloud's configured project].
#   ACCELERATOR_TYPE             [v5litepod-8]; e.g. v5litepod-16 (4 hosts), v6e-8, v4-32.
#   RUNTIME_VERSION              the TPU software version matching the accelerator
#                                [v2-alpha-tpuv5-lite]: v6e -> v2-alpha-tpuv6e, v5p ->
#                                v2-alpha-tpuv5, v4 and older -> tpu-ubuntu2204-base
#                                (`gcloud compute tpus tpu-vm versions list --zone $ZONE`).
#   BUCKET                       gs://... for workdirs (only `bucket` reads it): pass
#                                $BUCKET/<run> as a train WORKDIR; study needs it mounted.
#   REPO, BRANCH                 [https://github.com/jaxmed/jaxmed.git, main]
#   REMOTE_DIR                   the checkout on each worker, relative to ~ [jaxmed]
#   LOG_DIR                      logs and pid files on each worker, relative to ~ [jaxmed-logs]
#   JAX_SPEC                     [jax[tpu]] (jax's install guide for Cloud TPU VMs); pin it
#                                e.g. JAX_SPEC='jax[tpu]==0.10.2' to match a tested version.
#   EXTRA_PIP                    [etils[epath-gcs]]: gcsfs, so gs:// paths resolve.
#   RUN                          the run's name [<tool>-<UTC date>-<time>]; [A-Za-z0-9._-].
#   WORKERS                      which workers run it: all, 0, 0-3, 1,4 [all; evaluate: 0]
#   EVAL_PLATFORMS               JAX_PLATFORMS for evaluate [cpu]: one worker alone cannot
#                                start the TPU runtime of a multi-host slice. On a single-host
#                                slice (v5litepod-8, v6e-8, v4-8) set EVAL_PLATFORMS= (empty)
#                                to evaluate on its chips.
#   DRY_RUN=1                    print every gcloud command (shell-quoted) instead of running.
#
# Every worker runs the same program with JAXMED_DISTRIBUTED=1, which makes jaxmed call
# jax.distributed.initialize(); the ('data', 'fsdp', 'tensor') mesh then spans every chip of
# the slice and each host reads only its share of every batch. Storage: the workdir (config,
# metrics, orbax checkpoints, export) must be one directory every worker sees: for train a
# gs:// URL (WORKDIR=$BUCKET/lora; jaxmed writes it through etils epath and gcsfs, see
# jaxmed/storage.py); for study the bucket mounted at the same path on every worker with
# Cloud Storage FUSE (install gcsfuse per Google's guide, then `exec gcsfuse --implicit-dirs
# BUCKET_NAME /mnt/runs`, then WORKDIR=/mnt/runs/s). The VM's service account needs write
# access to the bucket (`create` asks for the cloud-platform scope; the project's default
# compute service account has it through its role). The latent/text cache is per host on
# local disk (with a gs:// workdir by default, under ~/.cache/jaxmed/runs; or
# --config.cache.dir=/tmp/jaxmed-cache). Data (CSV + images) must be at the same path on every
# worker (copy it to each, e.g. `exec gcloud storage cp -r gs://.../chexpert /tmp/`).
# Relative paths are relative to ~/REMOTE_DIR on the workers.
set -euo pipefail

ACCELERATOR_TYPE=${ACCELERATOR_TYPE:-v5litepod-8}
RUNTIME_VERSION=${RUNTIME_VERSION:-v2-alpha-tpuv5-lite}
REPO=${REPO:-https://github.com/jaxmed/jaxmed.git}
BRANCH=${BRANCH:-main}
REMOTE_DIR=${REMOTE_DIR:-jaxmed}
LOG_DIR=${LOG_DIR:-jaxmed-logs}
JAX_SPEC=${JAX_SPEC:-jax[tpu]}
EXTRA_PIP=${EXTRA_PIP-etils[epath-gcs]}
EVAL_PLATFORMS=${EVAL_PLATFORMS-cpu}
SCOPES=https://www.googleapis.com/auth/cloud-platform
SELF="bash $(printf %q "${BASH_SOURCE[0]}")"
PROG=tpu_pod.sh
# shellcheck source=launch/common.sh
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"

# The shell-quoted words, joined by spaces: safe to paste into a remote shell command.
quote() {
  local out
  printf -v out '%q ' "$@"
  printf '%s' "${out% }"
}

gcloud_do() {
  if [[ ${DRY_RUN:-0} == 1 ]]; then
    show gcloud "$@"
    echo
  else
    gcloud "$@"
  fi
}

need_tpu() {
  [[ -n ${TPU:-} ]] || die "set TPU to the TPU VM's name, e.g. TPU=jaxmed-v5e ZONE=us-west4-a bash launch/tpu_pod.sh $cmd"
  [[ -n ${ZONE:-} ]] || die "set ZONE to the TPU VM's zone, e.g. ZONE=us-west4-a"
  target=("$TPU" "--zone=$ZONE")
  if [[ -n ${PROJECT:-} ]]; then
    target+=("--project=$PROJECT")
  fi
}

# A path on the workers, relative to the remote $HOME unless absolute, as remote shell text.
remote_path() {
  if [[ $1 == /* ]]; then
    quote "$1"
  else
    # shellcheck disable=SC2016  # $HOME is the worker's
    printf '"$HOME"/%s' "$(quote "$1")"
  fi
}

# Run the shell command text $1 on WORKERS (all by default) of the slice.
ssh_workers() {
  gcloud_do compute tpus tpu-vm ssh "${target[@]}" "--worker=${WORKERS:-all}" "--command=$1"
}

# The remote shell text that picks the run: $1 if given, else the worker's latest run.
pick_run() {
  local logs
  logs=$(remote_path "$LOG_DIR")
  if [[ -n ${1:-} ]]; then
    valid_run_name "$1"
    printf 'run=%s' "$(quote "$1")"
  else
    # shellcheck disable=SC2016  # expanded on the worker
    printf 'run=$(cat %s/latest 2>/dev/null) || { echo "$(hostname): no jaxmed run here yet" >&2; exit 1; }' \
      "$logs"
  fi
}

# Remote shell text: `alive PID` is true while PID runs (a zombie left by an init that does
# not reap, as in some containers, counts as ended).
# shellcheck disable=SC2016  # expanded on the worker
ALIVE='alive() { kill -0 "$1" 2>/dev/null && ! ps -o stat= -p "$1" | grep -q Z; }'

# Start `python -m jaxmed.$tool ARGS...` detached on every selected worker.
launch() {
  local tool=$1 envs=$2
  shift 2
  local run=${RUN:-$tool-$(date -u +%Y%m%d-%H%M%S)}
  valid_run_name "$run"
  local dir logs program wrapper
  dir=$(remote_path "$REMOTE_DIR")
  logs=$(remote_path "$LOG_DIR")
  program=$(quote .venv/bin/python -m "jaxmed.$tool" "$@")
  # The wrapper stamps the log with the start and the exit status; it gets the program as
  # its arguments, so the program's words are quoted exactly once.
  # shellcheck disable=SC2016  # expanded by the worker's bash
  wrapper='echo "[tpu_pod.sh] $(date -u +%FT%TZ) $(hostname): $*"; "$@"; rc=$?; echo "[tpu_pod.sh] $(date -u +%FT%TZ) exit status $rc"; exit $rc'
  local remote
  remote="set -e; $ALIVE; cd -- $dir; mkdir -p -- $logs; h=\$(hostname)"
  remote+="; for f in $logs/*.\$h.pid; do if [ -s \"\$f\" ] && alive \"\$(cat \"\$f\")\"; then echo \"\$h: run \$(basename \"\$f\" .\$h.pid) is still running (pid \$(cat \"\$f\")): stop it first (tpu_pod.sh stop)\" >&2; exit 1; fi; done"
  remote+="; log=$logs/$(quote "$run").\$h.log"
  remote+="; $envs PYTHONUNBUFFERED=1 setsid nohup bash -c $(show "$wrapper") jaxmed-$tool $program > \"\$log\" 2>&1 < /dev/null &"
  remote+=" echo \$! > $logs/$(quote "$run").\$h.pid; echo $(quote "$run") > $logs/latest"
  remote+="; echo \"\$h: started $(quote "$run") (pid \$!), log \$log\""
  ssh_workers "$remote"
  local again
  again="TPU=$(quote "$TPU") ZONE=$(quote "$ZONE")${PROJECT:+ PROJECT=$(quote "$PROJECT")}${WORKERS:+ WORKERS=$(quote "$WORKERS")} $SELF"
  info ""
  info "Started run $run, detached, on workers ${WORKERS:-all}; each logs to ~/$LOG_DIR/$run.<hostname>.log."
  info "  last lines:  $again logs $run"
  info "  follow:      $again logs -f $run"
  info "  one worker:  gcloud compute tpus tpu-vm ssh $(quote "$TPU") --zone=$(quote "$ZONE") --worker=0 $(show "--command=tail -f ~/$LOG_DIR/$run.*.log")"
  info "  stop:        $again stop $run"
}

warn_workdir() {
  case $1 in
    gs://*) [[ $cmd != study ]] || info "tpu_pod.sh: note: jaxmed.study needs a mounted workdir: mount the bucket on every worker (gcsfuse) and pass the mounted folder." ;;
    *) info "tpu_pod.sh: note: on a multi-host slice every worker must see the same workdir $1 (a mounted bucket or a shared filesystem) for checkpoints." ;;
  esac
}

cmd=${1:-}
case "$cmd" in
  -h|--help|help) usage; exit 0 ;;
  "") usage >&2; exit 2 ;;
  create|bucket|setup|check|train|study|sample|evaluate|logs|stop|exec|ssh|delete) shift ;;
  *) die "unknown command '$cmd' (create | bucket | setup | check | train | study | sample | evaluate | logs | stop | exec | ssh | delete; --help for more)" ;;
esac
need_tpu

case "$cmd" in
  create)
    gcloud_do compute tpus tpu-vm create "${target[@]}" \
      "--accelerator-type=$ACCELERATOR_TYPE" "--version=$RUNTIME_VERSION" \
      "--scopes=$SCOPES" "$@"
    ;;
  bucket)
    [[ ${BUCKET:-} == gs://* ]] || die "set BUCKET=gs://<globally-unique-name>"
    args=(storage buckets create "$BUCKET" "--location=${ZONE%-*}" --uniform-bucket-level-access)
    if [[ -n ${PROJECT:-} ]]; then
      args+=("--project=$PROJECT")
    fi
    gcloud_do "${args[@]}"
    ;;
  setup)
    dir=$(remote_path "$REMOTE_DIR")
    remote="set -e; if [ ! -d $dir/.git ]; then git clone -q --branch $(quote "$BRANCH") $(quote "$REPO") $dir; fi"
    remote+="; cd -- $dir; git fetch -q origin $(quote "$BRANCH"); git checkout -q $(quote "$BRANCH"); git pull -q --ff-only origin $(quote "$BRANCH")"
    # Some TPU VM images ship python3 without ensurepip: a failed `python3 -m venv` leaves a
    # .venv without pip behind, so it is removed before each fallback.
    remote+="; if [ ! -x .venv/bin/pip ]; then rm -rf .venv; python3 -m venv .venv || { rm -rf .venv; sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv && python3 -m venv .venv; } || { rm -rf .venv; python3 -m pip install -q --user virtualenv && python3 -m virtualenv -q .venv; }; fi"
    pip_args=(-e . "$JAX_SPEC")
    if [[ -n $EXTRA_PIP ]]; then
      pip_args+=("$EXTRA_PIP")
    fi
    remote+="; .venv/bin/python -m pip install -q -U pip; .venv/bin/python -m pip install -q -U $(quote "${pip_args[@]}")"
    remote+="; .venv/bin/python -c $(show 'import jax, jaxmed, socket; print(socket.gethostname(), "jax", jax.__version__, "ready")')"
    ssh_workers "$remote"
    ;;
  check)
    dir=$(remote_path "$REMOTE_DIR")
    probe='import jax, socket; jax.distributed.initialize(); print(socket.gethostname(), "process", jax.process_index(), "of", jax.process_count(), "local devices", jax.local_device_count(), "global devices", jax.device_count(), jax.devices()[0].device_kind)'
    ssh_workers "cd -- $dir && .venv/bin/python -c $(show "$probe")"
    ;;
  train|study)
    [[ $# -ge 2 ]] || die "usage: tpu_pod.sh $cmd CONFIG WORKDIR [--config.x.y=v ...]"
    config=$1 workdir=$2
    shift 2
    warn_workdir "$workdir"
    launch "$cmd" JAXMED_DISTRIBUTED=1 --config "$config" --workdir "$workdir" "$@"
    ;;
  sample)
    launch sample JAXMED_DISTRIBUTED=1 "$@"
    ;;
  evaluate)
    WORKERS=${WORKERS:-0}
    launch evaluate "${EVAL_PLATFORMS:+JAX_PLATFORMS=$(quote "$EVAL_PLATFORMS")}" "$@"
    ;;
  logs)
    follow=0
    if [[ ${1:-} == -f ]]; then
      follow=1
      shift
    fi
    logs=$(remote_path "$LOG_DIR")
    remote="$ALIVE; h=\$(hostname); $(pick_run "${1:-}"); log=$logs/\$run.\$h.log; pid=$logs/\$run.\$h.pid"
    remote+="; state=finished; if [ -s \"\$pid\" ] && alive \"\$(cat \"\$pid\")\"; then state=running; fi"
    remote+="; echo \"== \$h: run \$run (\$state), \$log\""
    if [[ $follow == 1 ]]; then
      remote+="; tail -n 5 -F \"\$log\" | sed -u \"s/^/[\$h] /\""
    else
      remote+="; tail -n $(quote "${TAIL_LINES:-20}") \"\$log\" | sed \"s/^/[\$h] /\""
    fi
    ssh_workers "$remote"
    ;;
  stop)
    logs=$(remote_path "$LOG_DIR")
    remote="$ALIVE; h=\$(hostname); $(pick_run "${1:-}"); pid=$logs/\$run.\$h.pid"
    remote+="; if [ -s \"\$pid\" ] && p=\$(cat \"\$pid\") && alive \"\$p\"; then kill -TERM -- \"-\$p\" 2>/dev/null || kill -TERM \"\$p\""
    remote+="; for i in \$(seq 30); do alive \"\$p\" || break; sleep 1; done"
    remote+="; kill -KILL -- \"-\$p\" 2>/dev/null || true; echo \"\$h: stopped \$run (pid \$p)\"; else echo \"\$h: \$run is not running\"; fi"
    ssh_workers "$remote"
    ;;
  exec)
    [[ $# -ge 1 ]] || die "usage: tpu_pod.sh exec CMD [ARGS...]"
    dir=$(remote_path "$REMOTE_DIR")
    ssh_workers "cd -- $dir && . .venv/bin/activate && $(quote "$@")"
    ;;
  ssh)
    gcloud_do compute tpus tpu-vm ssh "${target[@]}" "--worker=${1:-0}"
    ;;
  delete)
    gcloud_do compute tpus tpu-vm delete "${target[@]}"
    ;;
esac
