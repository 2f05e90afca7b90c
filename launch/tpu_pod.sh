#!/bin/bash
# Run stages (pairs, train, export) on every host of a Cloud TPU pod slice (one process per host).
#   launch/tpu_pod.sh TPU_NAME ZONE configs/sdxl.py --config.teacher.path=/gcs-fuse/sdxl ...
# Paths (teacher, prompts, workdir) must be visible to every host (e.g. a shared bucket mount).
set -euo pipefail
TPU=${1:?usage: launch/tpu_pod.sh TPU_NAME ZONE CONFIG [--config.x=...]}
ZONE=${2:?zone}
CONFIG=${3:?config}
shift 3
ARGS=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all --command \
  "cd ~/d2g_jax && python -m d2g_jax.main --config $CONFIG --config.distributed=True \
   --config.teacher.dtype=bfloat16 $ARGS"
