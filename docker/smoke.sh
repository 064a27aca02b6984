#!/usr/bin/env bash
# Container smoke test for xpcnn's images, on a machine with no Docker engine and no
# access to Docker Hub (the recipe in docker/README.md):
#   1. install podman, buildah, debootstrap, crun (Debian packages) if missing;
#   2. debootstrap a minimal Debian 12 with Python 3.11 and import it as the stand-in
#      base localhost/debian-py:bookworm;
#   3. build docker/Dockerfile.cpu on it, train in the container for one short epoch on
#      the packaged Fashion-MNIST and require a test accuracy above $MIN_ACC;
#   4. build docker/Dockerfile.gpu on the same base and require `--backend gpu` to exit
#      non-zero with a one-line message about CuPy/CUDA and no traceback.
# Everything lives in one temporary directory (podman storage, configuration, rootfs);
# the host's /etc/containers is not touched, and an EXIT trap removes what this script
# created even when a step fails. Needs root. Exit status 0 only if every check passed.
#
#   sudo bash docker/smoke.sh
set -euo pipefail

MIN_ACC=${MIN_ACC:-0.6}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BASE_IMAGE=localhost/debian-py:bookworm
CA_IN_BUILD=/etc/ssl/certs/ca-certificates.crt

log() { printf '\n=== %s\n' "$*"; }
die() { printf 'smoke.sh: FAIL: %s\n' "$*" >&2; exit 1; }

if [ "$(id -u)" != 0 ]; then
    echo "smoke.sh: needs root (debootstrap, podman with chroot isolation); not run" >&2
    exit 2
fi

# ---- timings -------------------------------------------------------------------------
PHASES=()
T_START=$(date +%s.%N)
PHASE_NAME=""
phase_start() { PHASE_NAME=$1; PHASE_T0=$(date +%s.%N); log "$1"; }
phase_end() { # phase_end [note]
    local dt
    dt=$(awk -v a="$PHASE_T0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
    PHASES+=("$(printf '%-38s %7s s %s' "$PHASE_NAME" "$dt" "${1:-}")")
    echo "--- $PHASE_NAME: $dt s ${1:-}"
    PHASE_NAME=""
}
print_timings() {
    [ "${#PHASES[@]}" -gt 0 ] || return 0
    printf '\n=== timings\n'
    printf '%s\n' "${PHASES[@]}"
    awk -v a="$T_START" -v b="$(date +%s.%N)" 'BEGIN { printf "%-38s %7.1f s\n", "total", b - a }'
}

# ---- workspace and cleanup -----------------------------------------------------------
WORK=$(mktemp -d /tmp/xpcnn-smoke.XXXXXX)
export CONTAINERS_STORAGE_CONF=$WORK/storage.conf
export CONTAINERS_CONF=$WORK/containers.conf

cleanup() {
    local rc=$?
    set +e
    trap - EXIT INT TERM
    [ -z "$PHASE_NAME" ] || phase_end "(failed)"
    print_timings
    log "cleanup of $WORK"
    T_CLEAN=$(date +%s.%N)
    if command -v podman >/dev/null 2>&1 && [ -f "$CONTAINERS_STORAGE_CONF" ]; then
        # Resets only the storage, network and run directories named in our own
        # configuration files, all of them inside $WORK.
        podman system reset -f >/dev/null 2>&1 || echo "podman system reset failed" >&2
    fi
    # Anything still mounted below $WORK (overlay layers, debootstrap's /proc) is
    # unmounted first, deepest first, so rm cannot reach into a host filesystem.
    findmnt -rn -o TARGET | awk -v w="$WORK" 'index($0, w "/") == 1' | sort -r |
        while read -r mnt; do umount -l "$mnt" || true; done
    rm -rf --one-file-system "$WORK"
    echo "--- cleanup: $(awk -v a="$T_CLEAN" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }') s"
    if [ "$rc" = 0 ]; then echo "smoke.sh: PASS"; else echo "smoke.sh: FAIL (exit $rc)" >&2; fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Podman configured through environment variables only (never /etc/containers).
mkdir -p "$WORK/run" "$WORK/storage" "$WORK/net" "$WORK/tmp"
cat >"$CONTAINERS_STORAGE_CONF" <<EOF
[storage]
driver = "overlay"
runroot = "$WORK/run"
graphroot = "$WORK/storage"
EOF
# cgroups off and lower ulimits: crun cannot set cgroups or raise limits in this
# sandbox; host networking, so builds reach the package registries as the host does.
cat >"$CONTAINERS_CONF" <<EOF
[containers]
cgroups = "disabled"
netns = "host"
default_ulimits = ["nofile=10000:10000", "nproc=4096:4096"]
[network]
network_config_dir = "$WORK/net"
[engine]
cgroup_manager = "cgroupfs"
events_logger = "file"
tmp_dir = "$WORK/tmp"
EOF

# ---- 1. tools ------------------------------------------------------------------------
phase_start "install podman/buildah/debootstrap"
PKGS=(podman buildah debootstrap crun containernetworking-plugins uidmap slirp4netns
      fuse-overlayfs golang-github-containers-common)
missing=()
for pkg in "${PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q '^install ok installed' ||
        missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
    echo "installing: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y --no-install-recommends "${missing[@]}" >"$WORK/apt.log" 2>&1 || {
        apt-get update >>"$WORK/apt.log" 2>&1 &&
            apt-get install -y --no-install-recommends "${missing[@]}" >>"$WORK/apt.log" 2>&1
    } || { tail -20 "$WORK/apt.log"; die "apt-get install ${missing[*]} failed"; }
else
    echo "already installed"
fi
podman --version
phase_end

# `podman run` inside a private mount namespace without the cgroup-v1/v2 hybrid mount,
# which crun refuses ("cgroups in hybrid mode not supported"). The host is unaffected.
podman_run() {
    unshare -m sh -c 'umount /sys/fs/cgroup/unified 2>/dev/null; exec podman run "$@"' sh "$@"
}

# ---- 2. stand-in base image ----------------------------------------------------------
phase_start "debootstrap bookworm + podman import"
MIRROR=""
for src in /etc/apt/sources.list.d/debian.sources /etc/apt/sources.list.d/*.sources; do
    [ -f "$src" ] || continue
    MIRROR=$(awk '/^URIs:/ && /debian\/?$/ { print $2; exit }' "$src")
    [ -n "$MIRROR" ] && break
done
if [ -z "$MIRROR" ] && [ -f /etc/apt/sources.list ]; then
    MIRROR=$(awk '$1 == "deb" { for (i = 2; i <= NF; i++) if ($i ~ /^https?:/) { print $i; exit } }' \
        /etc/apt/sources.list)
fi
[ -n "$MIRROR" ] || die "no Debian mirror found in apt's sources"
echo "mirror (from apt's sources): $MIRROR"
debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
    bookworm "$WORK/rootfs" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 ||
    { tail -20 "$WORK/debootstrap.log"; die "debootstrap failed"; }
tar -C "$WORK/rootfs" -c . | podman import -q - "$BASE_IMAGE" >/dev/null
rm -rf --one-file-system "$WORK/rootfs"
podman images --format '{{.Repository}}:{{.Tag}} {{.Size}}' "$BASE_IMAGE"
phase_end

# ---- pip settings for the builds -----------------------------------------------------
# The host's CA bundle is mounted read-only into every RUN step (TLS to the registries may
# be intercepted by a proxy whose CA only the host trusts), and pip is pointed at it. A
# network index configured for the host's pip (index-url / extra-index-url with http(s)
# URLs; file:// ones do not exist in the build) is passed as build args; proxy variables
# (HTTP(S)_PROXY) are passed through by podman itself. Nothing of this lands in the images.
HOST_CA=$(python3 -m pip config get global.cert 2>/dev/null || true)
[ -f "$HOST_CA" ] || HOST_CA=/etc/ssl/certs/ca-certificates.crt
[ -f "$HOST_CA" ] || die "no CA bundle found on the host"
BUILD_ARGS=(--build-arg "BASE=$BASE_IMAGE" --build-arg "PIP_CERT=$CA_IN_BUILD")
if python3 -m pip --version >/dev/null 2>&1; then
    while IFS= read -r arg; do
        [ -n "$arg" ] && BUILD_ARGS+=(--build-arg "$arg")
    done < <(python3 -m pip config list 2>/dev/null | python3 -c '
import shlex, sys
found = {}
for line in sys.stdin:
    key, _, value = line.strip().partition("=")
    name = key.rsplit(".", 1)[-1]
    if name in ("index-url", "extra-index-url"):
        urls = [u for u in " ".join(shlex.split(value)).split()
                if u.startswith(("http://", "https://"))]
        if urls:
            found[name] = urls
for name, urls in found.items():
    print("PIP_" + name.upper().replace("-", "_") + "=" + " ".join(urls))
')
fi
printf 'build args:'; printf ' %q' "${BUILD_ARGS[@]}"; echo

build() { # build <Dockerfile> <tag>
    podman build --isolation chroot "${BUILD_ARGS[@]}" \
        -v "$HOST_CA:$CA_IN_BUILD:ro" \
        -f "$REPO/$1" -t "$2" "$REPO" >"$WORK/build.log" 2>&1 ||
        { tail -40 "$WORK/build.log"; die "podman build -f $1 failed"; }
    grep -E '^(Successfully installed|NOTE:)' "$WORK/build.log" || true
    podman images --format '{{.Repository}}:{{.Tag}} {{.Size}}' "$2"
}

TRAIN_ARGS=(--dataset fashion-mnist --epochs 1 --train-size 20000 --test-size 2000
            --batch-size 100 --out /tmp/run --quiet)

# ---- 3. CPU image --------------------------------------------------------------------
phase_start "build Dockerfile.cpu"
build docker/Dockerfile.cpu localhost/xpcnn:cpu
phase_end

phase_start "train in the CPU container"
set +e
podman_run --rm localhost/xpcnn:cpu train --backend cpu "${TRAIN_ARGS[@]}" \
    >"$WORK/train.out" 2>&1
train_rc=$?
set -e
cat "$WORK/train.out"
[ "$train_rc" = 0 ] || die "training in the CPU container exited with $train_rc"
# The last "test acc" figure printed (a fraction, or a percentage if followed by %).
ACC=$(python3 -c '
import re, sys
hits = re.findall(r"test[ _]acc\w*\W*?([0-9]*\.?[0-9]+)\s*(%?)", open(sys.argv[1]).read(), re.I)
if hits:
    value, percent = hits[-1]
    print(float(value) / (100 if percent else 1))
' "$WORK/train.out")
[ -n "$ACC" ] || die "no 'test acc' figure in the training output"
awk -v a="$ACC" -v m="$MIN_ACC" 'BEGIN { exit !(a > m) }' ||
    die "test accuracy $ACC is not above $MIN_ACC"
echo "test accuracy $ACC > $MIN_ACC: ok"
phase_end

# ---- 4. GPU image on a machine without a GPU -----------------------------------------
phase_start "build Dockerfile.gpu (stand-in base)"
build docker/Dockerfile.gpu localhost/xpcnn:gpu
phase_end

phase_start "--backend gpu without a GPU"
set +e
podman_run --rm localhost/xpcnn:gpu train --backend gpu "${TRAIN_ARGS[@]}" \
    >"$WORK/gpu.out" 2>"$WORK/gpu.err"
gpu_rc=$?
set -e
echo "exit status: $gpu_rc"; echo "stdout:"; cat "$WORK/gpu.out"; echo "stderr:"; cat "$WORK/gpu.err"
[ "$gpu_rc" != 0 ] || die "--backend gpu succeeded on a machine without a GPU"
! grep -q Traceback "$WORK/gpu.err" || die "--backend gpu printed a traceback"
# Podman's own warnings (logrus lines starting with time=) are not the program's output.
msg_lines=$(grep -v '^time=' "$WORK/gpu.err" | grep -c '[^[:space:]]' || true)
[ "$msg_lines" = 1 ] || die "expected a one-line error message, got $msg_lines lines"
grep -v '^time=' "$WORK/gpu.err" | grep -qiE 'cupy|cuda' ||
    die "the error message mentions neither CuPy nor CUDA"
echo "clear one-line error: ok"
phase_end
