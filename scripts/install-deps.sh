#!/usr/bin/env bash
# Installs what Corral's build, tests and demo need, and nothing that is
# already there. Safe to run again; works offline when everything is present.
set -euo pipefail

PACKAGES=(
    build-essential pkg-config      # cargo's C toolchain (bundled SQLite, ring)
    iproute2 iputils-ping procps    # network namespaces as test VMs
    curl                            # the demo reads the health endpoints
    nftables                        # per-node IP allowlists
    postgresql-15 postgresql-client-15
    mariadb-server mariadb-client mariadb-backup   # the MariaDB engine
    redis-server redis-tools        # the Redis engine
    haproxy                         # failover tests route clients through it
    stress-ng                       # failover tests under CPU load
    iptables                        # slow-link tests queue packets to the test (NFQUEUE)
    prometheus-alertmanager         # alert tests deliver to a real Alertmanager
    python3-aiosmtpd                # alert tests deliver email to a real SMTP server
    python3-prometheus-client       # tests parse /metrics with an independent parser
)

if [[ $(id -u) != 0 ]]; then
    echo "error: run as root (apt packages, network namespaces)" >&2
    exit 1
fi

missing=()
for p in "${PACKAGES[@]}"; do
    [[ $p == \#* ]] && continue
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if ((${#missing[@]})); then
    echo "==> apt-get install ${missing[*]}"
    # Debian starts a default PostgreSQL cluster on install unless told not
    # to; Corral's agents run their own.
    mkdir -p /etc/postgresql-common/createcluster.d
    echo "create_main_cluster = false" > /etc/postgresql-common/createcluster.d/corral.conf
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${missing[@]}"
    if [[ -d /run/systemd/system ]]; then
        systemctl disable --now postgresql >/dev/null 2>&1 || true
        # Likewise the packaged HAProxy and MariaDB services: tests and
        # agents run their own.
        systemctl disable --now haproxy >/dev/null 2>&1 || true
        systemctl disable --now mariadb >/dev/null 2>&1 || true
        systemctl disable --now redis-server >/dev/null 2>&1 || true
        systemctl disable --now prometheus-alertmanager >/dev/null 2>&1 || true
    fi
fi

if ! command -v cargo >/dev/null; then
    echo "error: cargo not found: install Rust 1.88 or newer with rustup (https://rustup.rs)" >&2
    exit 1
fi
for component in rustfmt clippy; do
    if ! cargo "${component/rustfmt/fmt}" --version >/dev/null 2>&1; then
        echo "==> rustup component add $component"
        rustup component add "$component"
    fi
done

# Backup tests upload to a real S3-compatible server (it checks SigV4
# signatures). 0.14.1: later releases need a newer Rust.
if ! command -v s3s-fs >/dev/null 2>&1 && [[ ! -x $HOME/.cargo/bin/s3s-fs ]]; then
    echo "==> cargo install s3s-fs@0.14.1 (the S3 server backup tests use)"
    cargo install s3s-fs@0.14.1 --locked --features binary
fi
