#!/usr/bin/env bash
# The cluster test tier exactly as CI runs it (.ci/run, after the README's test command, whose
# .venv it uses): a local Kubernetes, the image from our Dockerfile, `pytest -m cluster`, and
# teardown, which always runs. Each step is bounded and timed; a failure names its step, shows
# the tail of that step's log and fails the tier. It is never skipped into a pass as root; a
# non-root machine (a newcomer's laptop) skips it with a message, since it needs dockerd.
#   KUBETUNE_TIER_LOGS  where the step logs go (default: a new /tmp/kubetune-tier.* dir)
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/../.."
script=tests/cluster/local-cluster.sh
STATE=${KUBETUNE_CLUSTER_STATE:-/var/lib/kubetune-cluster}
# Bounds per step (seconds): generous for a loaded 2-core machine, cold caches included.
UP_TIMEOUT=${KUBETUNE_TIER_UP_TIMEOUT:-2700}
IMAGE_TIMEOUT=${KUBETUNE_TIER_IMAGE_TIMEOUT:-1800}
TESTS_TIMEOUT=${KUBETUNE_TIER_TESTS_TIMEOUT:-2400}
LOCK_WAIT=${KUBETUNE_TIER_LOCK_WAIT:-2700}

say() { echo "cluster tier: $*" >&2; }

if [ "$(id -u)" != 0 ]; then
  say "skipped: it needs root (it starts dockerd, etcd and a kubelet); as root: $0 (docs/kubernetes.md)"
  exit 0
fi
[ -x .venv/bin/pytest ] || { say "FAILED: no .venv/bin/pytest; run the README's test command first"; exit 1; }
LOGS=${KUBETUNE_TIER_LOGS:-$(mktemp -d /tmp/kubetune-tier.XXXXXX)}
mkdir -p "$LOGS" "$STATE"

step=start
t0=$SECONDS
t_step=$SECONDS
times=""
failed=""

begin() { step=$1; t_step=$SECONDS; say "$1 (log: $LOGS/$1.log)"; }
end() { times="$times $step $((SECONDS - t_step)) s,"; }

step_pid=""
bounded() {  # bounded SECONDS CMD...: in the background, so a SIGTERM to the tier is handled
  local limit=$1 rc=0; shift  # at once (bash runs traps only between foreground commands)
  timeout --kill-after=60 "$limit" "$@" 9>&- &
  step_pid=$!
  wait "$step_pid" || rc=$?
  step_pid=""
  [ "$rc" != 124 ] || say "step '$step' ran past its ${limit} s bound"
  return "$rc"
}

run_step() {  # run_step NAME SECONDS CMD...: bounded, output to $LOGS/NAME.log
  local name=$1 limit=$2 rc=0; shift 2
  begin "$name"
  bounded "$limit" "$@" >"$LOGS/$name.log" 2>&1 || rc=$?
  end
  if [ "$rc" != 0 ]; then
    failed=$name
    tail -n 40 "$LOGS/$name.log" >&2
    exit "$rc"
  fi
}

interrupted() {  # TERM/INT: stop the running step (timeout passes the signal on), then down
  if [ -n "$step_pid" ]; then
    kill -TERM "$step_pid" 2>/dev/null || true
    wait "$step_pid" 2>/dev/null || true
  fi
  exit 143
}

finish() {  # EXIT: tear down whatever happened, then say how it went
  local rc=$?
  trap - EXIT
  [ -n "$failed" ] || [ "$rc" = 0 ] || failed=$step
  begin down
  if ! timeout --kill-after=30 300 "$script" down >"$LOGS/down.log" 2>&1; then
    tail -n 20 "$LOGS/down.log" >&2
    say "teardown failed: the next run may find leftovers (see $LOGS/down.log)"
    [ "$rc" != 0 ] || { rc=1; failed=down; }
  fi
  end
  if [ "$rc" = 0 ]; then
    say "passed in $((SECONDS - t0)) s:${times%,}"
  else
    say "FAILED at step '$failed' (exit $rc) after $((SECONDS - t0)) s:${times%,}; logs in $LOGS"
  fi
  exit "$rc"
}
trap finish EXIT
trap interrupted TERM INT

# One tier at a time on a machine: they share ports, the state dir and the docker cache.
exec 9>"$STATE/tier.lock"
if ! flock -n 9; then
  say "another cluster tier holds $STATE/tier.lock; waiting up to $LOCK_WAIT s"
  # Not our cluster to tear down if we never get the lock.
  flock -w "$LOCK_WAIT" 9 || { trap - EXIT; say "FAILED: lock still held after $LOCK_WAIT s"; exit 1; }
fi

# What an interrupted earlier run left (by its PID files) goes first; `up` then checks ports.
run_step leftovers 300 "$script" down
run_step up "$UP_TIMEOUT" "$script" up
export "$(grep '^KUBECONFIG=' "$LOGS/up.log" | tail -n 1)"
KUBETUNE_DOCKER_HOST="$(sed -n 's/^DOCKER_HOST=//p' "$LOGS/up.log" | tail -n 1)"
export KUBETUNE_DOCKER_HOST
run_step image "$IMAGE_TIMEOUT" "$script" image
export KUBETUNE_CLUSTER_REQUIRED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
begin tests
rc=0
bounded "$TESTS_TIMEOUT" .venv/bin/pytest -m cluster -rs -p no:cacheprovider "$@" \
  > >(tee "$LOGS/tests.log") 2>&1 || rc=$?
end
[ "$rc" = 0 ] || { failed=tests; exit "$rc"; }
