#!/usr/bin/env bash
# Train on a Cloud TPU VM pod slice: the same command on every worker over
# `gcloud compute tpus tpu-vm ssh --worker=all`.
#
#   launch/tpu_vm_pod.sh --tpu NAME --zone ZONE [--project P] [--num-slices N] [--setup] [--dry-run] \
#       --config configs/cogvideox_5b.py:3s,ttt_mlp --workdir gs://BUCKET/run [-- --config.steps=100 ...]
#
# Expects: gcloud authenticated for the project, a TPU VM pod slice NAME in ZONE, and on
# every worker a checkout of this repository at $REPO_DIR (default ~/tttjax; --setup clones
# $REPO_URL there and pip-installs it). The coordinator for jax.distributed is worker 0,
# found by JAX's Cloud TPU cluster detection (TTTJAX_DISTRIBUTED=auto, see
# tttjax/distributed.py); the workdir must be shared storage (gs://) for Orbax checkpoints.
# --num-slices N (N > 1): NAME is a multi-slice queued resource (`gcloud compute tpus
# queued-resources create NAME --node-count N ...`, which sets the MEGASCALE_* environment
# of every worker); the command runs on every worker of every slice, and the trainer checks
# that its devices form N slices (config.mesh.num_slices) before laying config.mesh.dcn_axes
# across them.
set -euo pipefail
source "$(dirname "$0")/common.sh"

TPU="" ZONE="" PROJECT="" CONFIG="" WORKDIR="" SETUP=0 DRY_RUN=0 EXTRA=() NUM_SLICES=1
REPO_DIR="${REPO_DIR:-~/tttjax}"
REPO_URL="${REPO_URL:-https://github.com/tttjax/tttjax}"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --tpu) TPU="${2:-}"; shift 2 ;;
    --zone) ZONE="${2:-}"; shift 2 ;;
    --project) PROJECT="${2:-}"; shift 2 ;;
    --num-slices) NUM_SLICES="${2:-}"; shift 2 ;;
    --config) CONFIG="${2:-}"; shift 2 ;;
    --workdir) WORKDIR="${2:-}"; shift 2 ;;
    --setup) SETUP=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    --) shift; EXTRA=("$@"); break ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) die "unknown option '$1' (see --help)" ;;
  esac
done
[[ -n "$TPU" ]] || die "--tpu NAME is required (the TPU VM pod slice to run on)"
[[ -n "$ZONE" ]] || die "--zone ZONE is required (the zone of the TPU VM)"
[[ -n "$CONFIG" ]] || die "--config FILE[:ARG] is required (e.g. configs/cogvideox_5b.py:3s,ttt_mlp)"
[[ -n "$WORKDIR" ]] || die "--workdir DIR is required (shared storage such as gs://bucket/run)"
need_cmd gcloud "install the Google Cloud SDK and run 'gcloud auth login'"

[[ "$NUM_SLICES" =~ ^[1-9][0-9]*$ ]] || die "--num-slices must be a positive integer, got '$NUM_SLICES'"
if [[ "$NUM_SLICES" -gt 1 ]]; then
  SSH=(gcloud compute tpus queued-resources ssh "$TPU" --zone "$ZONE" --worker=all --node=all)
  EXTRA=("--config.mesh.num_slices=$NUM_SLICES" "${EXTRA[@]}")
else
  SSH=(gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all)
fi
[[ -n "$PROJECT" ]] && SSH+=(--project "$PROJECT")

if [[ "$SETUP" == 1 ]]; then
  run "${SSH[@]}" --command "test -d $REPO_DIR || git clone $REPO_URL $REPO_DIR; cd $REPO_DIR && python3 -m venv .venv && .venv/bin/pip install -q -e . 'jax[tpu]'"
fi
TRAIN="cd $REPO_DIR && TTTJAX_DISTRIBUTED=auto .venv/bin/python -m tttjax.train $(quote_args --config "$CONFIG" --workdir "$WORKDIR" "${EXTRA[@]}")"
run "${SSH[@]}" --command "$TRAIN"
