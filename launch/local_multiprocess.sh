#!/usr/bin/env bash
# Run N processes of one command on this machine, joined by jax.distributed over localhost.
#
#   launch/local_multiprocess.sh -n 2 [--cpu-devices K] [--port P] [--dry-run] -- \
#       python -m tttjax.train --config configs/tiny.py --workdir /tmp/run
#
# Process i gets JAX_COORDINATOR_ADDRESS=localhost:P, TTTJAX_NUM_PROCESSES=N and
# TTTJAX_PROCESS_ID=i (read by tttjax.distributed.initialize_from_env). --cpu-devices K runs
# every process on CPU with K fake devices (JAX_PLATFORMS=cpu and
# --xla_force_host_platform_device_count=K): how CI tests multi-host code without hosts.
# Output lines are prefixed with [i]. If a process fails, the others are stopped and the
# launcher exits with the failing code; otherwise 0. The port defaults to a free one.
set -euo pipefail
source "$(dirname "$0")/common.sh"

NUM="" CPU_DEVICES="" PORT="" DRY_RUN=0 CMD=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    -n|--num-processes) NUM="${2:-}"; shift 2 ;;
    --cpu-devices) CPU_DEVICES="${2:-}"; shift 2 ;;
    --port) PORT="${2:-}"; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    --) shift; CMD=("$@"); break ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) die "unknown option '$1' (see --help)" ;;
  esac
done
[[ "$NUM" =~ ^[1-9][0-9]*$ ]] || die "-n NUM (number of processes, >= 1) is required"
[[ -z "$CPU_DEVICES" || "$CPU_DEVICES" =~ ^[1-9][0-9]*$ ]] || die "--cpu-devices must be a positive integer"
[[ ${#CMD[@]} -gt 0 ]] || die "no command given; put it after --"
if [[ -z "$PORT" ]]; then
  PORT="$(python3 -c 'import socket; s = socket.socket(); s.bind(("localhost", 0)); print(s.getsockname()[1])')"
fi
[[ "$PORT" =~ ^[0-9]+$ ]] || die "--port must be a number"

PIDS=()
stop_all() {  # stop the processes this launcher started, by pid
  local pid
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
}
trap 'stop_all; exit 143' TERM INT

for ((i = 0; i < NUM; i++)); do
  envs=(JAX_COORDINATOR_ADDRESS="localhost:$PORT" TTTJAX_NUM_PROCESSES="$NUM" TTTJAX_PROCESS_ID="$i")
  if [[ -n "$CPU_DEVICES" ]]; then
    envs+=(JAX_PLATFORMS=cpu XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=$CPU_DEVICES")
  fi
  if [[ "$DRY_RUN" == 1 ]]; then
    printf '+ [%d]' "$i"; printf ' %q' env "${envs[@]}" "${CMD[@]}"; printf '\n'
    continue
  fi
  # `env` execs the command, so $! is the process itself; its output goes through sed.
  env "${envs[@]}" "${CMD[@]}" > >(sed -u "s/^/[$i] /") 2>&1 &
  PIDS+=("$!")
done
[[ "$DRY_RUN" == 1 ]] && exit 0

for _ in "${PIDS[@]}"; do
  status=0
  wait -n || status=$?
  if [[ "$status" -ne 0 ]]; then
    echo "local_multiprocess: a process exited with code $status; stopping the others" >&2
    stop_all
    wait || true
    exit "$status"
  fi
done
wait  # let the output filters finish
exit 0
