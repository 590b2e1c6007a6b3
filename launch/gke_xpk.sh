#!/usr/bin/env bash
# Train on GKE through XPK (TPU slices or GPU node pools): one workload, every pod runs
# the training command; JAX's cluster detection wires jax.distributed (TTTJAX_DISTRIBUTED=auto).
#
#   launch/gke_xpk.sh --cluster C --workload NAME --image IMAGE [--build-image] \
#       (--tpu-type v5p-128 [--num-slices N] | --device-type h100-80gb-8 --num-nodes N) \
#       --config cogvideox_5b:9s,ttt_mlp --workdir gs://BUCKET/run [--dry-run] [-- train flags]
#
# Expects: `xpk` installed (pip install xpk) and pointed at the GCP project, a GKE cluster
# created by `xpk cluster create`, and a container IMAGE with tttjax installed.
# --build-image makes IMAGE from this checkout (or TTTJAX_SOURCE, see launch/common.sh): a
# wheel, `docker build -f launch/Dockerfile` with the tested pins (extras tpu,gcs, or
# cuda12,gcs with --device-type), `docker push IMAGE`; so the pods run the code tested here.
set -euo pipefail
source "$(dirname "$0")/common.sh"

CLUSTER="" WORKLOAD="" IMAGE="" TPU_TYPE="" DEVICE_TYPE="" NUM_SLICES=1 NUM_NODES=1
CONFIG="" WORKDIR="" DRY_RUN=0 EXTRA=() BUILD=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --cluster) CLUSTER="${2:-}"; shift 2 ;;
    --workload) WORKLOAD="${2:-}"; shift 2 ;;
    --image) IMAGE="${2:-}"; shift 2 ;;
    --build-image) BUILD=1; shift ;;
    --tpu-type) TPU_TYPE="${2:-}"; shift 2 ;;
    --device-type) DEVICE_TYPE="${2:-}"; shift 2 ;;
    --num-slices) NUM_SLICES="${2:-}"; shift 2 ;;
    --num-nodes) NUM_NODES="${2:-}"; shift 2 ;;
    --config) CONFIG="${2:-}"; shift 2 ;;
    --workdir) WORKDIR="${2:-}"; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    --) shift; EXTRA=("$@"); break ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) die "unknown option '$1' (see --help)" ;;
  esac
done
[[ -n "$CLUSTER" ]] || die "--cluster is required (a GKE cluster made by 'xpk cluster create')"
[[ -n "$WORKLOAD" ]] || die "--workload NAME is required"
[[ -n "$IMAGE" ]] || die "--image is required (a container image with tttjax installed)"
[[ -n "$TPU_TYPE" || -n "$DEVICE_TYPE" ]] || die "give --tpu-type (TPU slice) or --device-type (GPU nodes)"
[[ -z "$TPU_TYPE" || -z "$DEVICE_TYPE" ]] || die "give only one of --tpu-type and --device-type"
[[ -n "$CONFIG" ]] || die "--config FILE[:ARG] is required"
[[ -n "$WORKDIR" ]] || die "--workdir is required (shared storage such as gs://bucket/run)"
need_cmd xpk "install it with 'pip install xpk'"
if [[ "$BUILD" == 1 ]]; then
  need_cmd docker "install Docker and run 'gcloud auth configure-docker' for your registry"
  DIST="$ROOT_DIR/launch/.dist"
  rm -rf "$DIST"
  WHEEL="$(build_wheel "$DIST")"
  [[ "$WHEEL" == "$DIST"/* ]] || die "--build-image needs TTTJAX_SOURCE to be a checkout, not '$WHEEL'"
  EXTRAS="tpu,gcs"
  [[ -n "$DEVICE_TYPE" ]] && EXTRAS="cuda12,gcs"
  run docker build -f "$ROOT_DIR/launch/Dockerfile" --build-arg "WHEEL=launch/.dist/$(basename "$WHEEL")" \
      --build-arg "EXTRAS=$EXTRAS" -t "$IMAGE" "$ROOT_DIR"
  run docker push "$IMAGE"
fi

[[ "$NUM_SLICES" =~ ^[1-9][0-9]*$ ]] || die "--num-slices must be a positive integer, got '$NUM_SLICES'"
# The trainer checks that its devices form this many slices (else a slice that did not join
# over DCN would train as a smaller job) and lays config.mesh.dcn_axes across them.
[[ -n "$TPU_TYPE" ]] && EXTRA=("--config.mesh.num_slices=$NUM_SLICES" "${EXTRA[@]}")
CMD="TTTJAX_DISTRIBUTED=auto python -m tttjax.train $(quote_args --config "$CONFIG" --workdir "$WORKDIR" "${EXTRA[@]}")"
XPK=(xpk workload create --cluster "$CLUSTER" --workload "$WORKLOAD" --docker-image "$IMAGE")
if [[ -n "$TPU_TYPE" ]]; then
  XPK+=(--tpu-type "$TPU_TYPE" --num-slices "$NUM_SLICES")
else
  XPK+=(--device-type "$DEVICE_TYPE" --num-nodes "$NUM_NODES")
fi
run "${XPK[@]}" --command "$CMD"
