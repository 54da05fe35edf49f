#!/usr/bin/env bash
# A single-node Kubernetes v1.20.2 on 127.0.0.1 for the `-m cluster` test tier.
#   local-cluster.sh up     install packages, build binaries once (cached), start etcd, the
#                           control plane, dockerd and a kubelet; last line: KUBECONFIG=<path>
#   local-cluster.sh image  build kubetune:local from the project's Dockerfile on a
#                           debootstrapped Debian base, wheels from a host wheelhouse
#   local-cluster.sh down   stop what `up` started (by PID), unmount the kubelet's mounts
# Needs root. Build caches live outside the repo (KUBETUNE_CLUSTER_CACHE); runtime state in
# KUBETUNE_CLUSTER_STATE. Every step is idempotent. See docs/kubernetes.md.
set -euo pipefail

CACHE=${KUBETUNE_CLUSTER_CACHE:-/var/cache/kubetune-cluster}
STATE=${KUBETUNE_CLUSTER_STATE:-/var/lib/kubetune-cluster}
REPO=$(cd "$(dirname "$0")/../.." && pwd)
K8S_DEB_VERSION=1.20.5+really1.20.2-1.1+deb12u1
K8S_TREE=kubernetes-1.20.2
K8S_BINARIES="kube-apiserver kube-controller-manager kube-scheduler kubelet"
# Changes when the build recipe does: cached binaries from another recipe are rebuilt.
BUILD_RECIPE="v1.20.2 go1.19 reflect2-1.0.2"
PACKAGES="golang-1.19-go golang-github-modern-go-reflect2-dev etcd-server rsync docker.io debootstrap jq openssl gcc libc6-dev curl"
APISERVER_PORT=${KUBETUNE_APISERVER_PORT:-16443}
ETCD_PORT=${KUBETUNE_ETCD_PORT:-12379}
WHEELHOUSE_PORT=${KUBETUNE_WHEELHOUSE_PORT:-18088}
DOCKER_SOCK=$STATE/docker.sock
KUBELET_PORT=10250  # the kubelet's default (the API server reaches it there); healthz 10248
declare -A PORTS=([etcd]="$ETCD_PORT $((ETCD_PORT + 1)) $((ETCD_PORT + 2))"
  [kube-apiserver]=$APISERVER_PORT [kubelet]="$KUBELET_PORT 10248" [wheelhouse]=$WHEELHOUSE_PORT)

log() { echo "local-cluster: $*" >&2; }
die() { echo "local-cluster: error: $*" >&2; exit 1; }
timed() {  # timed WHAT CMD...: run it, then log its wall time and the CPU time of its process
  local what=$1; shift  # tree (a docker build's work runs in dockerd: only its wall time counts)
  local TIMEFORMAT="local-cluster: $what: %0R s wall, %0U s user + %0S s sys CPU"
  time "$@"
}

debian_mirror() {
  # The mirror apt is configured with, read at run time (never written into the repo).
  local uri
  uri=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
  [ -n "$uri" ] || uri=$(awk '$1 == "deb" {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
  [ -n "$uri" ] || die "no Debian mirror found in /etc/apt/sources.list.d/debian.sources"
  echo "$uri"
}

install_packages() {
  local missing=""
  for p in $PACKAGES; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
  done
  [ -z "$missing" ] && return 0
  log "installing:$missing"
  DEBIAN_FRONTEND=noninteractive timed "apt-get install" apt-get install -y -q --no-install-recommends $missing >&2 \
    || { apt-get update -q >&2 && DEBIAN_FRONTEND=noninteractive \
         apt-get install -y -q --no-install-recommends $missing >&2; }
}

fetch_source() {
  # Debian's kubernetes source package, through a private apt setup (machine's untouched).
  local apt=$CACHE/apt tarball=$CACHE/src/kubernetes_1.20.5+really1.20.2.orig.tar.gz
  [ -f "$tarball" ] && return 0
  mkdir -p "$apt/sources" "$apt/lists/partial" "$apt/cache/archives/partial" "$CACHE/src"
  cat >"$apt/sources/kubetune.sources" <<SRC
Types: deb deb-src
URIs: $(debian_mirror)
Suites: bookworm
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
  local opts=(-o Dir::Etc::SourceList=/dev/null -o "Dir::Etc::SourceParts=$apt/sources"
              -o "Dir::State::Lists=$apt/lists" -o "Dir::Cache=$apt/cache")
  apt-get "${opts[@]}" update -q >&2
  (cd "$CACHE/src" && apt-get "${opts[@]}" source --download-only "kubernetes=$K8S_DEB_VERSION" >&2)
  [ -f "$tarball" ] || die "kubernetes source tarball not downloaded"
}

build_binaries() {
  local bin=$CACHE/bin
  if [ "$(cat "$bin/.complete" 2>/dev/null)" = "$BUILD_RECIPE" ]; then return 0; fi
  fetch_source
  local work=$CACHE/build
  mkdir -p "$work" "$bin"  # an interrupted build's tree (and Go cache in _output) is reused
  log "building Kubernetes v1.20.2 from source (several minutes on 2 cores)"
  tar -C "$work" -xzf "$CACHE"/src/kubernetes_1.20.5+really1.20.2.orig.tar.gz
  local tree=$work/$K8S_TREE
  mkdir -p "$tree/.go/src/k8s.io" && ln -sfn ../../.. "$tree/.go/src/k8s.io/kubernetes"
  # The vendored reflect2 1.0.1 crashes under Go >= 1.18 (json-iterator map encoding:
  # "unexpected fault address" in kube-apiserver); Debian's 1.0.2 is the fixed release.
  rm -f "$tree"/vendor/github.com/modern-go/reflect2/*.{go,s}
  cp /usr/share/gocode/src/github.com/modern-go/reflect2/*.{go,s} "$tree/vendor/github.com/modern-go/reflect2/"
  (
    cd "$tree"
    export GOPATH=$tree/.go PATH=/usr/lib/go-1.19/bin:$PATH CGO_ENABLED=0 GOFLAGS=-mod=vendor \
      GOPROXY=off HOME=$work/home
    timed "make (4 binaries)" \
      make WHAT="cmd/kube-apiserver cmd/kube-controller-manager cmd/kube-scheduler cmd/kubelet" >&2
    gcc -Os -static -o "$bin/pause" build/pause/linux/pause.c >&2
  )
  for b in $K8S_BINARIES; do cp "$tree/_output/bin/$b" "$bin/$b"; done
  rm -rf "$work"
  echo "$BUILD_RECIPE" >"$bin/.complete"
  log "binaries cached in $bin"
}


# --- up ----------------------------------------------------------------------------------

alive() { [ -f "$STATE/pids/$1.pid" ] && kill -0 "$(cat "$STATE/pids/$1.pid")" 2>/dev/null; }

start() {  # start NAME CMD...: in the background, logging to $STATE/logs/NAME.log
  local name=$1; shift
  alive "$name" && return 0
  port_free "$name" ${PORTS[$name]:-}
  "$@" >"$STATE/logs/$name.log" 2>&1 9>&- &
  echo $! >"$STATE/pids/$name.pid"
}

show_logs() {
  for f in "$STATE"/logs/{etcd,dockerd,kube-apiserver,kube-controller-manager,kube-scheduler,kubelet}.log; do
    [ -f "$f" ] && { echo "== $f" && grep -E '^[EF][0-9]{4}|error|fatal' "$f" | tail -n 8; } >&2
  done
  return 0
}

wait_for() {  # wait_for WHAT SECONDS CMD...: bounded poll; fails at once if WHAT's daemon died
  local what=$1 seconds=$2; shift 2
  local deadline=$((SECONDS + seconds)) started=$SECONDS
  until "$@" >/dev/null 2>&1; do
    if [ -f "$STATE/pids/$what.pid" ] && ! alive "$what"; then
      show_logs
      die "$what exited while starting (log: $STATE/logs/$what.log)"
    fi
    if [ $SECONDS -ge $deadline ]; then
      show_logs
      die "$what not ready after ${seconds}s (logs in $STATE/logs)"
    fi
    sleep 1
  done
  log "$what ready after $((SECONDS - started)) s"
}

port_free() {  # port_free NAME PORT...: fail naming the holder if a TCP port is taken
  local name=$1 port holder; shift
  for port in "$@"; do
    holder=$(ss -Hltnp "sport = :$port" 2>/dev/null | head -n 1)
    [ -z "$holder" ] || die "$name: 127.0.0.1:$port is already in use ($holder); stop it or run '$0 down'"
  done
}

make_certs() {
  local pki=$STATE/pki
  [ -f "$pki/.complete" ] && return 0
  mkdir -p "$pki" && cd "$pki"
  openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days 3650 \
    -subj "/CN=kubetune-local-ca" 2>/dev/null
  openssl req -newkey rsa:2048 -nodes -keyout apiserver.key -out apiserver.csr \
    -subj "/CN=kube-apiserver" 2>/dev/null
  printf 'subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes.default.svc,IP:10.0.0.1\n' >san.ext
  openssl x509 -req -in apiserver.csr -CA ca.crt -CAkey ca.key -CAcreateserial \
    -out apiserver.crt -days 3650 -extfile san.ext 2>/dev/null
  openssl genrsa -out sa.key 2048 2>/dev/null && openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null
  openssl rand -hex 24 >admin.token
  echo "$(cat admin.token),kubetune-admin,kubetune-admin,system:masters" >tokens.csv
  touch .complete
  cd - >/dev/null
}

write_kubeconfig() {
  cat >"$STATE/kubeconfig" <<KC
apiVersion: v1
kind: Config
clusters:
- name: local
  cluster: {server: "https://127.0.0.1:$APISERVER_PORT", certificate-authority: "$STATE/pki/ca.crt"}
users:
- name: admin
  user: {token: "$(cat "$STATE/pki/admin.token")"}
contexts:
- name: local
  context: {cluster: local, user: admin, namespace: default}
current-context: local
KC
  chmod 600 "$STATE/kubeconfig"
}

write_runc_wrapper() {
  # This VM refuses a negative oom_score_adj; the kubelet gives pod sandboxes -998. Clamp it.
  cat >"$STATE/runc-clamp" <<'WRAP'
#!/bin/sh
bundle=""
prev=""
for arg in "$@"; do
  [ "$prev" = "--bundle" ] || [ "$prev" = "-b" ] && bundle=$arg
  prev=$arg
done
if [ -n "$bundle" ] && [ -f "$bundle/config.json" ]; then
  tmp="$bundle/config.json.kubetune"
  jq 'if (.process.oomScoreAdj // 0) < 0 then .process.oomScoreAdj = 0 else . end' \
    "$bundle/config.json" >"$tmp" && mv "$tmp" "$bundle/config.json"
fi
exec runc "$@"
WRAP
  chmod 755 "$STATE/runc-clamp"
}

docker_() { docker -H "unix://$DOCKER_SOCK" "$@"; }

start_docker() {
  mkdir -p "$CACHE/docker" "$STATE/docker-exec"
  # Image pulls go to a closed local port: nothing leaves this machine, a pull fails at once.
  start dockerd env HTTP_PROXY=http://127.0.0.1:9 HTTPS_PROXY=http://127.0.0.1:9 \
    NO_PROXY=127.0.0.1,localhost dockerd --host "unix://$DOCKER_SOCK" --data-root "$CACHE/docker" \
    --exec-root "$STATE/docker-exec" --pidfile "$STATE/docker.pid" \
    --add-runtime "kubetune-runc=$STATE/runc-clamp" --default-runtime kubetune-runc \
    --iptables=false --ip-masq=false --storage-driver=overlay2
  wait_for dockerd 180 docker_ info
}

import_pause() {  # the pod sandbox image: pause.c from the same tree, static, one file
  if ! docker_ image inspect kubetune-pause:local >/dev/null 2>&1; then
    local dir; dir=$(mktemp -d)
    cp "$CACHE/bin/pause" "$dir/pause"
    tar -C "$dir" -c pause | docker_ import -c 'ENTRYPOINT ["/pause"]' - kubetune-pause:local >&2
    rm -rf "$dir"
  fi
}

start_etcd() {
  start etcd etcd --name local --data-dir "$STATE/etcd" \
    --listen-client-urls "http://127.0.0.1:$ETCD_PORT" \
    --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
    --listen-peer-urls "http://127.0.0.1:$((ETCD_PORT + 1))" \
    --initial-advertise-peer-urls "http://127.0.0.1:$((ETCD_PORT + 1))" \
    --initial-cluster "local=http://127.0.0.1:$((ETCD_PORT + 1))" \
    --listen-metrics-urls "http://127.0.0.1:$((ETCD_PORT + 2))"
  wait_for etcd 120 curl -fsS "http://127.0.0.1:$ETCD_PORT/health"
}

start_control_plane() {
  local pki=$STATE/pki bin=$CACHE/bin
  start kube-apiserver "$bin/kube-apiserver" --etcd-servers "http://127.0.0.1:$ETCD_PORT" \
    --bind-address=127.0.0.1 --secure-port="$APISERVER_PORT" --insecure-port=0 \
    --advertise-address=127.0.0.1 --endpoint-reconciler-type=none \
    --service-cluster-ip-range=10.0.0.0/24 --token-auth-file="$pki/tokens.csv" \
    --authorization-mode=Node,RBAC --client-ca-file="$pki/ca.crt" \
    --tls-cert-file="$pki/apiserver.crt" --tls-private-key-file="$pki/apiserver.key" \
    --service-account-key-file="$pki/sa.pub" --service-account-signing-key-file="$pki/sa.key" \
    --service-account-issuer=https://kubernetes.default.svc \
    --kubelet-preferred-address-types=Hostname --feature-gates=TTLAfterFinished=true
  wait_for kube-apiserver 300 curl -fsS --cacert "$pki/ca.crt" \
    -H "Authorization: Bearer $(cat "$pki/admin.token")" "https://127.0.0.1:$APISERVER_PORT/readyz"
  start kube-controller-manager "$bin/kube-controller-manager" --kubeconfig "$STATE/kubeconfig" \
    --bind-address=127.0.0.1 --secure-port=0 --port=0 --leader-elect=false \
    --service-account-private-key-file="$pki/sa.key" --root-ca-file="$pki/ca.crt" \
    --use-service-account-credentials=false \
    --feature-gates=TTLAfterFinished=true
  start kube-scheduler "$bin/kube-scheduler" --kubeconfig "$STATE/kubeconfig" \
    --bind-address=127.0.0.1 --secure-port=0 --port=0 --leader-elect=false
}

start_kubelet() {
  mkdir -p "$STATE/kubelet"
  start kubelet "$CACHE/bin/kubelet" --kubeconfig "$STATE/kubeconfig" \
    --container-runtime=docker --docker-endpoint "unix://$DOCKER_SOCK" \
    --address=127.0.0.1 --healthz-bind-address=127.0.0.1 --read-only-port=0 \
    --hostname-override=localhost --anonymous-auth=true --authorization-mode=AlwaysAllow \
    --fail-swap-on=false --cgroup-driver=cgroupfs --cgroups-per-qos=false \
    --enforce-node-allocatable= --eviction-hard= --make-iptables-util-chains=false \
    --image-gc-high-threshold=100 --image-gc-low-threshold=99 \
    --pod-infra-container-image=kubetune-pause:local --root-dir="$STATE/kubelet" \
    --cert-dir="$STATE/kubelet-pki" --resolv-conf=/etc/resolv.conf
}

kubectl_get() {  # a GET on the API as admin
  curl -fsS --cacert "$STATE/pki/ca.crt" -H "Authorization: Bearer $(cat "$STATE/pki/admin.token")" \
    "https://127.0.0.1:$APISERVER_PORT$1"
}

node_ready() {
  kubectl_get /api/v1/nodes/localhost \
    | jq -e '.status.conditions[] | select(.type == "Ready" and .status == "True")'
}

cmd_up() {
  [ "$(id -u)" = 0 ] || die "needs root (it starts dockerd and a kubelet)"
  install_packages
  build_binaries
  mkdir -p "$STATE/pids" "$STATE/logs"
  make_certs
  write_kubeconfig
  write_runc_wrapper
  start_docker
  import_pause
  start_etcd
  start_control_plane
  start_kubelet
  wait_for kubelet 300 node_ready
  # The ServiceAccount controller of the controller-manager creates it: the manager works.
  wait_for kube-controller-manager 300 \
    kubectl_get /api/v1/namespaces/default/serviceaccounts/default
  for name in etcd kube-apiserver kube-scheduler dockerd; do
    alive "$name" || { show_logs; die "$name exited (log: $STATE/logs/$name.log)"; }
  done
  echo "DOCKER_HOST=unix://$DOCKER_SOCK"
  echo "KUBECONFIG=$STATE/kubeconfig"
}

# --- image -------------------------------------------------------------------------------

rootfs_tar() {
  # Debian bookworm from debootstrap (the configured mirror), as a tarball in the cache.
  local tar=$CACHE/rootfs-bookworm-cc.tar
  if [ ! -f "$tar" ]; then
    local root=$CACHE/rootfs.tmp
    rm -rf "$root"
    log "debootstrapping the base image (about a minute)"
    timed debootstrap debootstrap --variant=minbase --include=python3,python3-venv,python3-dev,gcc,libc6-dev,ca-certificates,passwd \
      bookworm "$root" "$(debian_mirror)" >&2
    rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/archives/*.deb
    tar -C "$root" -cf "$tar.tmp" . && mv "$tar.tmp" "$tar" && rm -rf "$root"
  fi
}

base_image() {
  docker_ image inspect kubetune-base:bookworm-cc >/dev/null 2>&1 && return 0
  rootfs_tar
  timed "docker import (base)" docker_ import - kubetune-base:bookworm-cc <"$CACHE/rootfs-bookworm-cc.tar" >&2
}

wheelhouse() {
  # Every wheel the image installs, downloaded on the host (no network inside the build).
  local key; key=$(sha256sum "$REPO/pyproject.toml" | cut -c1-16)
  local wh=$CACHE/wheelhouse-$key
  if [ ! -f "$wh/.complete" ]; then
    log "downloading the wheelhouse into $wh"
    rm -rf "$wh" && mkdir -p "$wh"
    timed "pip download" python3 -m pip download -d "$wh" "torch==2.13.0" "$REPO[train,gpu,ui]" \
      setuptools wheel >"$wh.log" 2>&1 || { tail -n 20 "$wh.log" >&2; die "pip download failed (log: $wh.log)"; }
    grep '^local-cluster: ' "$wh.log" >&2 || true
    rm -f "$wh"/kubetune-*
    touch "$wh/.complete"
  fi
  echo "$wh"
}

cmd_image() {
  [ "$(id -u)" = 0 ] || die "needs root (it talks to the local dockerd)"
  install_packages
  mkdir -p "$STATE/pids" "$STATE/logs"
  [ -x "$STATE/runc-clamp" ] || write_runc_wrapper
  start_docker
  base_image
  local wh port
  wh=$(wheelhouse)
  port=$WHEELHOUSE_PORT  # fixed: the URL is a build argument, part of the layer cache key
  port_free wheelhouse "$port"
  python3 -m http.server --bind 127.0.0.1 --directory "$wh" "$port" >"$STATE/logs/wheelhouse.log" 2>&1 &
  WHEEL_SERVER=$!
  trap 'kill "$WHEEL_SERVER" 2>/dev/null || true' EXIT
  trap 'exit 143' TERM INT
  wait_for "wheelhouse server" 30 curl -fsS "http://127.0.0.1:$port/"
  log "building kubetune:local"
  DOCKER_BUILDKIT=0 timed "docker build" docker_ build --network host -t kubetune:local \
    --build-arg CUDA_IMAGE=kubetune-base:bookworm-cc --build-arg APT_PACKAGES= \
    --build-arg PIP_NO_INDEX=1 --build-arg "PIP_FIND_LINKS=http://127.0.0.1:$port/" \
    "$REPO" >&2
  echo "IMAGE=kubetune:local"
}

# --- down --------------------------------------------------------------------------------

stop() {  # stop NAME: SIGTERM by PID, SIGKILL after 30 s; fails if it outlives that
  local pidfile=$STATE/pids/$1.pid pid
  [ -f "$pidfile" ] || return 0
  pid=$(cat "$pidfile")
  if kill -0 "$pid" 2>/dev/null; then
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
    if kill -0 "$pid" 2>/dev/null; then
      log "$1 (PID $pid) ignored SIGTERM for 30 s: SIGKILL"
      kill -9 "$pid" 2>/dev/null || true
      for _ in $(seq 10); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
    fi
    kill -0 "$pid" 2>/dev/null && die "$1 (PID $pid) survived SIGKILL"
  fi
  rm -f "$pidfile"
}

our_mounts() {  # what the kubelet and dockerd mounted under our directories, deepest first
  awk -v a="$STATE/" -v b="$CACHE/docker/" 'index($2, a) == 1 || index($2, b) == 1 {print $2}' \
    /proc/mounts | sort -r
}

check_clean() {  # after down: nothing of ours may be left for the next run to trip on
  local left="" name port
  left=$(our_mounts | head -n 3 | tr '\n' ' ')
  [ -z "$left" ] || die "mounts left after down: $left"
  for name in "${!PORTS[@]}"; do
    for port in ${PORTS[$name]}; do
      [ -z "$(ss -Hltn "sport = :$port" 2>/dev/null)" ] || left="$left $port($name)"
    done
  done
  [ -z "$left" ] || die "ports still in use after down:$left"
  # dockerd's containerd and the shims exit after dockerd: give them a bounded moment.
  for _ in $(seq 30); do
    left=$(pgrep -f -- "$STATE/|$CACHE/" | grep -vx "$$" | tr '\n' ' ' || true)
    [ -n "$left" ] || return 0
    sleep 1
  done
  die "processes still running from $STATE or $CACHE after down: $(ps -o pid=,args= -p "$(echo $left | tr " " ,)" | cut -c1-120)"
}

cmd_down() {
  stop kubelet
  if alive dockerd; then  # the pods' containers, then the daemon
    local ids; ids=$(docker_ ps -aq --filter label=io.kubernetes.pod.name || true)
    [ -z "$ids" ] || docker_ rm -f $ids >/dev/null 2>&1 || true
  fi
  for name in kube-scheduler kube-controller-manager kube-apiserver etcd dockerd; do stop "$name"; done
  our_mounts | while read -r mnt; do umount -l "$mnt" 2>/dev/null || true; done
  rm -f "$DOCKER_SOCK" "$STATE/docker.pid"  # stale after a killed dockerd
  check_clean  # before deleting: never rm -rf through a mount that is still there
  rm -rf "$STATE/etcd" "$STATE/kubelet" "$STATE/docker-exec" "$STATE/kubeconfig"
  log "stopped; no process, mount, port or socket of ours is left"
}

case "${1:-}" in
  up) cmd_up ;;
  image) cmd_image ;;
  down) cmd_down ;;
  build) install_packages; build_binaries ;;  # the steps `up` / `image` run first
  rootfs) install_packages; rootfs_tar; wheelhouse ;;
  *) echo "usage: $0 up|image|down" >&2; exit 2 ;;
esac
