#!/bin/bash
# Stages on every host of a Cloud TPU pod slice: one process per host (TPU VM worker), each
# running the same command; JAX finds the other hosts itself (docs/many_hosts.md).
#
#   launch/tpu_pod.sh TPU_NAME ZONE NUM_HOSTS CONFIG [--config.x=... ...]
#   launch/tpu_pod.sh --dry-run my-v5p-64 us-east5-a 8 configs/sdxl.py --config.workdir=gs://b/run
#
# NUM_HOSTS: the slice's TPU VM workers (v5p-64: 8; `gcloud compute tpus tpu-vm describe`).
# Every host must see the same teacher, prompts and workdir (a bucket, or the same paths on
# every VM). --dry-run prints each host's exact command line and runs nothing. Each host's
# output is prefixed with its index; the script exits 0 only when every host does.
set -uo pipefail
DRY_RUN=0
if [[ "${1:-}" == "--dry-run" ]]; then DRY_RUN=1; shift; fi
if [[ $# -lt 4 ]]; then
  echo "usage: launch/tpu_pod.sh [--dry-run] TPU_NAME ZONE NUM_HOSTS CONFIG [--config.x=...]" >&2
  exit 2
fi
TPU=$1 ZONE=$2 HOSTS=$3 CONFIG=$4
shift 4
[[ "$HOSTS" =~ ^[1-9][0-9]*$ ]] || { echo "tpu_pod.sh: NUM_HOSTS must be a positive integer, got '$HOSTS'" >&2; exit 2; }
# The repository's checkout on each VM; $HOME is expanded there.
REMOTE_DIR=${D2G_REMOTE_DIR:-'$HOME/d2g_jax'}
REMOTE="cd $REMOTE_DIR &&"$(printf ' %q' python3 -m d2g_jax.main --config "$CONFIG" "$@" \
  --config.distributed.enabled=True)

host_command() {  # the command that runs worker $1's process, as one shell line
  local quoted=${REMOTE//\'/\'\\\'\'}
  echo "gcloud compute tpus tpu-vm ssh $TPU --zone $ZONE --worker=$1 --command '$quoted'"
}

if (( DRY_RUN )); then
  for ((i = 0; i < HOSTS; i++)); do host_command "$i"; done
  exit 0
fi
PIDS=()
trap 'kill -TERM "${PIDS[@]}" 2>/dev/null' TERM INT
for ((i = 0; i < HOSTS; i++)); do
  gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" "--worker=$i" --command "$REMOTE" \
    > >(sed -u "s/^/[$i] /") 2>&1 &
  PIDS+=($!)
done
FAILED=0
for ((i = 0; i < HOSTS; i++)); do
  wait "${PIDS[$i]}" || { echo "tpu_pod.sh: host $i failed (status $?)" >&2; FAILED=1; }
done
exit $FAILED
