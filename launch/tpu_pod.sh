#!/usr/bin/env bash
# Run a jaxmed command on every worker of a Cloud TPU VM (single host or pod slice).
#
#   TPU=my-v4-32 ZONE=us-central2-b bash launch/tpu_pod.sh setup
#   TPU=my-v4-32 ZONE=us-central2-b bash launch/tpu_pod.sh train configs/finetune.py:lora,sd15 \
#       gs-or-local-workdir --config.mesh.fsdp=8 --config.data.csv=/data/chexpert/train.csv
#   TPU=my-v4-32 ZONE=us-central2-b bash launch/tpu_pod.sh study configs/study.py:paper WORKDIR
#
# Every worker runs the same program; JAXMED_DISTRIBUTED=1 makes it call
# jax.distributed.initialize(), after which the ('data', 'fsdp', 'tensor') mesh spans all
# chips of the slice. Each host reads only its share of every batch. The workdir must be on
# storage all hosts see (a mounted bucket or filestore) for checkpoints; the latent cache
# is per host (cache.dir on local disk is fine).
set -euo pipefail
: "${TPU:?set TPU to the TPU VM name}"
: "${ZONE:?set ZONE to its zone}"
REPO=${REPO:-https://github.com/jaxmed/jaxmed.git}
BRANCH=${BRANCH:-main}
ssh_all() {
  gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all --command "$1"
}
cmd=${1:?usage: tpu_pod.sh setup|train|study|run ...}
shift
case "$cmd" in
  setup)
    ssh_all "set -e; [ -d jaxmed ] || git clone -b $BRANCH $REPO jaxmed; cd jaxmed && git pull -q; \
python3 -m venv .venv && . .venv/bin/activate && pip install -q -U pip && \
pip install -q 'jax[tpu]' -f https://storage.googleapis.com/jax-releases/libtpu_releases.html && \
pip install -q -e ."
    ;;
  train|study)
    config=${1:?config}; workdir=${2:?workdir}; shift 2
    ssh_all "cd jaxmed && . .venv/bin/activate && JAXMED_DISTRIBUTED=1 \
python -m jaxmed.$cmd --config $config --workdir $workdir $*"
    ;;
  run)
    ssh_all "cd jaxmed && . .venv/bin/activate && JAXMED_DISTRIBUTED=1 $*"
    ;;
  *) echo "unknown command $cmd (setup | train | study | run)" >&2; exit 2 ;;
esac
