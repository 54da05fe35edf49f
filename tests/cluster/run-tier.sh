#!/usr/bin/env bash
# The cluster test tier exactly as CI runs it (needs root and the README's .venv):
# a local Kubernetes, the image from our Dockerfile, `pytest -m cluster`, teardown.
# A setup step that fails is retried once from scratch (a machine hiccup must not make CI
# flaky); if it fails again the tier fails: it is never skipped into a pass.
set -euo pipefail
cd "$(dirname "$0")/../.."
script=tests/cluster/local-cluster.sh
trap '"$script" down || true' EXIT

attempt() {  # attempt STEP: run `local-cluster.sh STEP`, once more after `down` if it fails
  if ! "$script" "$1" >"/tmp/kubetune-cluster-$1.out"; then
    echo "cluster tier: '$1' failed; tearing down and retrying once" >&2
    "$script" down || true
    "$script" "$1" >"/tmp/kubetune-cluster-$1.out"
  fi
}

start=$SECONDS
attempt up
export "$(grep '^KUBECONFIG=' /tmp/kubetune-cluster-up.out | tail -n 1)"
export KUBETUNE_DOCKER_HOST="$(sed -n 's/^DOCKER_HOST=//p' /tmp/kubetune-cluster-up.out | tail -n 1)"
echo "cluster tier: cluster up in $((SECONDS - start)) s" >&2
attempt image
echo "cluster tier: image built after $((SECONDS - start)) s" >&2
export KUBETUNE_CLUSTER_REQUIRED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
.venv/bin/pytest -m cluster -rs -p no:cacheprovider "$@"
echo "cluster tier: passed in $((SECONDS - start)) s" >&2
