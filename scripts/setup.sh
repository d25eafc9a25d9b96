#!/usr/bin/env bash
# Installs everything the build, the demo and the tests need, idempotently:
# Debian packages, rust-src for the nightly toolchain, bpf-linker built
# against LLVM 22, and a mounted bpffs. Prints what it does; the second run
# is a no-op.
set -euo pipefail

say() { printf '\033[1m[setup]\033[0m %s\n' "$*"; }

if [ "$(id -u)" -ne 0 ]; then
    echo "[setup] must run as root (installs packages, mounts bpffs)" >&2
    exit 1
fi

PKGS=(llvm-22-dev libpolly-22-dev zlib1g-dev libzstd-dev bpftool iproute2 ethtool tcpdump bird2 gobgpd nftables libusrsctp-examples libusrsctp-dev gcc procps util-linux)
missing=()
for p in "${PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    say "installing Debian packages: ${missing[*]} (a few minutes)"
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y -q "${missing[@]}" >/tmp/loxilb-apt.log 2>&1; then
        say "package lists look stale: apt-get update"
        apt-get update -q >>/tmp/loxilb-apt.log 2>&1
        apt-get install -y -q "${missing[@]}" >>/tmp/loxilb-apt.log 2>&1 || {
            cat /tmp/loxilb-apt.log >&2
            exit 1
        }
    fi
else
    say "Debian packages present"
fi

if ! rustup toolchain list | grep -q '^nightly'; then
    say "installing the nightly toolchain (builds the eBPF crate)"
    rustup toolchain install nightly --profile minimal
fi
if ! rustup component list --toolchain nightly --installed 2>/dev/null | grep -q '^rust-src'; then
    say "adding rust-src to nightly (build-std=core for the BPF target)"
    rustup component add rust-src --toolchain nightly
else
    say "nightly rust-src present"
fi

if ! command -v bpf-linker >/dev/null 2>&1 || ! bpf-linker --version 2>/dev/null | grep -q '0\.13\.0'; then
    say "building bpf-linker 0.13.0 against LLVM 22 (about a minute)"
    PATH=/usr/lib/llvm-22/bin:$PATH LLVM_SYS_220_PREFIX=/usr/lib/llvm-22 \
        cargo install --locked bpf-linker@0.13.0 --no-default-features --features llvm-22
else
    say "bpf-linker 0.13.0 present"
fi

if ! mount | grep -q ' /sys/fs/bpf type bpf'; then
    say "mounting bpffs on /sys/fs/bpf"
    mkdir -p /sys/fs/bpf
    mount -t bpf bpf /sys/fs/bpf
else
    say "bpffs mounted"
fi

# kubernetes-validate (PyPI) checks every Kubernetes manifest under manifest/
# against the API schemas (kube-watch/tests/manifests.rs). Installed with
# pip --target into its own directory, so it works with any python3 (also
# an externally managed one) and leaves the system's packages alone.
KV_VERSION=1.37.0
KV_DIR=/opt/loxilb-rs/kubernetes-validate
KV_BIN=/opt/loxilb-rs/bin/kubernetes-validate
if ! "$KV_BIN" --version 2>/dev/null | grep -qx "$KV_VERSION"; then
    say "installing kubernetes-validate $KV_VERSION into $KV_DIR"
    if ! python3 -m pip --version >/dev/null 2>&1; then
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3 python3-pip >>/tmp/loxilb-apt.log 2>&1 || {
            apt-get update -q >>/tmp/loxilb-apt.log 2>&1
            DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3 python3-pip >>/tmp/loxilb-apt.log 2>&1
        }
    fi
    rm -rf "$KV_DIR"
    mkdir -p "$KV_DIR" "$(dirname "$KV_BIN")"
    python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore \
        --target "$KV_DIR" "kubernetes-validate==$KV_VERSION"
    printf '#!/bin/sh\nPYTHONPATH=%s exec %s -m kubernetes_validate "$@"\n' \
        "$KV_DIR" "$(python3 -c 'import sys; print(sys.executable)')" >"$KV_BIN"
    chmod 755 "$KV_BIN"
    "$KV_BIN" --version | grep -qx "$KV_VERSION"
else
    say "kubernetes-validate $KV_VERSION present"
fi
say "done"
