#!/usr/bin/env bash
# Train on a Cloud TPU VM pod slice: the same command on every worker over
# `gcloud compute tpus tpu-vm ssh --worker=all`.
#
#   launch/tpu_vm_pod.sh --tpu NAME --zone ZONE [--project P] [--num-slices N] [--setup] [--dry-run] \
#       --config configs/cogvideox_5b.py:3s,ttt_mlp --workdir gs://BUCKET/run [-- --config.steps=100 ...]
#
# Expects: gcloud authenticated for the project and a TPU VM pod slice NAME in ZONE.
# --setup ships the code: a wheel built from this checkout (or TTTJAX_SOURCE, see
# launch/common.sh) and constraints.txt are copied to WORKDIR/code (gs://; a non-bucket
# workdir: scp to every worker) and installed on every worker into $VENV (default
# ~/tttjax_venv) with the tested pins and the tpu and gcs extras; rerun --setup after
# changing the code. Training then runs that install from any directory (bundled configs by
# name, e.g. cogvideox_5b:3s,ttt_mlp; a config file path is copied too). The coordinator for jax.distributed is worker 0,
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
VENV="${VENV:-~/tttjax_venv}"
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
[[ -n "$CONFIG" ]] || die "--config NAME[:ARG] or FILE[:ARG] is required (e.g. cogvideox_5b:3s,ttt_mlp)"
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

CODE="$WORKDIR/code" REMOTE=tttjax_code
CONFIG_FILE="${CONFIG%%:*}"
if [[ -f "$CONFIG_FILE" ]]; then   # a config file of this machine travels with the code
  CONFIG="$REMOTE/$(basename "$CONFIG_FILE")${CONFIG#"$CONFIG_FILE"}"
else
  CONFIG_FILE=""
fi
if [[ "$SETUP" == 1 ]]; then
  DIST="$(mktemp -d "${TMPDIR:-/tmp}/tttjax_dist.XXXXXX")"
  WHEEL="$(build_wheel "$DIST")"
  FILES=("$ROOT_DIR/constraints.txt")
  [[ -f "$WHEEL" || "$DRY_RUN" == 1 && "$WHEEL" == "$DIST"/* ]] && FILES+=("$WHEEL")
  [[ -n "$CONFIG_FILE" ]] && FILES+=("$CONFIG_FILE")
  if [[ "$WORKDIR" == gs://* ]]; then
    run gcloud storage cp "${FILES[@]}" "$CODE/"
    FETCH="mkdir -p $REMOTE && gcloud storage cp '$CODE/*' $REMOTE/"
  else
    [[ "$NUM_SLICES" -gt 1 ]] && die "--setup on several slices ships the code through the workdir; give a gs:// --workdir"
    SCP=(gcloud compute tpus tpu-vm scp "${FILES[@]}" "$TPU:$REMOTE/" --zone "$ZONE" --worker=all)
    [[ -n "$PROJECT" ]] && SCP+=(--project "$PROJECT")
    run "${SSH[@]}" --command "mkdir -p $REMOTE"
    run "${SCP[@]}"
    FETCH="true"
  fi
  if [[ " ${FILES[*]} " == *" $WHEEL "* ]]; then
    SPEC="$REMOTE/$(basename "$WHEEL")[tpu,gcs]"
  else
    SPEC="tttjax[tpu,gcs] @ $WHEEL"
  fi
  run "${SSH[@]}" --command "$FETCH && python3 -m venv $VENV && $VENV/bin/pip install -q --force-reinstall --no-deps $(quote_args "$SPEC") && $VENV/bin/pip install -q -c $REMOTE/constraints.txt $(quote_args "$SPEC")"
fi
TRAIN="TTTJAX_DISTRIBUTED=auto $VENV/bin/python -m tttjax.train $(quote_args --config "$CONFIG" --workdir "$WORKDIR" "${EXTRA[@]}")"
run "${SSH[@]}" --command "$TRAIN"
