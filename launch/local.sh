#!/usr/bin/env bash
# A multi-host run rehearsed on one machine: NUM_PROCESSES JAX processes of
# `python -m d2g_jax.main ARGS...`, each with DEVICES_PER_PROCESS CPU devices, their
# collectives over gloo, the coordinator on a free loopback port.
#
#   launch/local.sh 2 2 -- --config configs/demo.py --config.workdir=/tmp/d2g_2x2
#   launch/local.sh --dry-run 2 2 -- --config configs/demo.py      # print the commands only
#
# Each process's output is prefixed with its index ("[0] ...", "[1] ..."). The script exits 0
# only when every process does; otherwise it names each failed process and how it ended, and
# exits 1. SIGTERM and SIGINT are forwarded to every process (SIGTERM to one process alone
# also stops them all at one step: docs/many_hosts.md). Environment: PYTHON (default
# python3), D2G_LOCAL_PORT (default a free port); PYTHONUNBUFFERED=1 is set so that the
# processes' lines come out as they are written.
set -uo pipefail

usage() {
  echo "usage: launch/local.sh [--dry-run] NUM_PROCESSES DEVICES_PER_PROCESS -- ARGS..." >&2
  exit 2
}
DRY_RUN=0
if [[ "${1:-}" == "--dry-run" ]]; then DRY_RUN=1; shift; fi
[[ $# -ge 3 && "$3" == "--" ]] || usage
N=$1
D=$2
shift 3
[[ "$N" =~ ^[1-9][0-9]*$ ]] || { echo "local.sh: NUM_PROCESSES must be a positive integer, got '$N'" >&2; exit 2; }
[[ "$D" =~ ^[1-9][0-9]*$ ]] || { echo "local.sh: DEVICES_PER_PROCESS must be a positive integer, got '$D'" >&2; exit 2; }
PYTHON=${PYTHON:-python3}
PORT=${D2G_LOCAL_PORT:-$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}

# XLA_FLAGS as given, with our device count instead of any other.
FLAGS=$(printf '%s' "${XLA_FLAGS:-}" | sed -E 's/--xla_force_host_platform_device_count=[0-9]+//g')
FLAGS="$FLAGS --xla_force_host_platform_device_count=$D"
FLAGS=${FLAGS# }

command_line() {  # the exact command of process $1 (then its ARGS), shell-quoted
  local i=$1
  shift
  printf 'JAX_PLATFORMS=cpu JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo XLA_FLAGS=%q ' "$FLAGS"
  printf 'D2G_COORDINATOR_ADDRESS=127.0.0.1:%s D2G_NUM_PROCESSES=%s D2G_PROCESS_ID=%s ' "$PORT" "$N" "$i"
  printf '%q ' "$PYTHON" -m d2g_jax.main "$@" --config.distributed.enabled=True
  printf '\n'
}

if (( DRY_RUN )); then
  for ((i = 0; i < N; i++)); do command_line "$i" "$@" | sed 's/ $//'; done
  exit 0
fi

PIDS=()
forward() {
  echo "local.sh: $1: forwarding to every process" >&2
  kill -s "$1" "${PIDS[@]}" 2>/dev/null
}
trap 'forward TERM' TERM
trap 'forward INT' INT

export PYTHONUNBUFFERED=1
for ((i = 0; i < N; i++)); do
  JAX_PLATFORMS=cpu JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo XLA_FLAGS="$FLAGS" \
  D2G_COORDINATOR_ADDRESS="127.0.0.1:$PORT" D2G_NUM_PROCESSES="$N" D2G_PROCESS_ID="$i" \
    "$PYTHON" -m d2g_jax.main "$@" --config.distributed.enabled=True \
    > >(sed -u "s/^/[$i] /") 2> >(sed -u "s/^/[$i] /" >&2) &
  PIDS+=($!)
  echo "local.sh: process $i of $N: pid $! ($D CPU devices, coordinator 127.0.0.1:$PORT)" >&2
done

FAILED=()
for ((i = 0; i < N; i++)); do
  # `wait` also returns (status > 128) when a trapped signal arrives: wait again while the
  # process lives; bash keeps an ended process's status, so a last `wait` gives the real one.
  while true; do
    wait "${PIDS[$i]}"
    rc=$?
    kill -0 "${PIDS[$i]}" 2>/dev/null || break
  done
  wait "${PIDS[$i]}"
  last=$?
  (( last != 127 )) && rc=$last
  if (( rc != 0 )); then
    if (( rc > 128 )); then
      how="killed by signal $((rc - 128)) ($(kill -l $((rc - 128)) 2>/dev/null || echo '?'))"
    else
      how="exit status $rc"
    fi
    FAILED+=("process $i (pid ${PIDS[$i]}): $how")
  fi
done
wait  # the log prefixers
if (( ${#FAILED[@]} )); then
  echo "local.sh: ${#FAILED[@]} of $N processes failed:" >&2
  printf '  %s\n' "${FAILED[@]}" >&2
  exit 1
fi
echo "local.sh: all $N processes exited 0" >&2
