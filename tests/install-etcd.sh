#!/usr/bin/env bash
# The HA tests run a real etcd cluster (tests/etcd_cluster.py) on ports of their own: install
# Debian's etcd-server when no etcd is on PATH. The package may also start a system etcd on
# 2379/2380 (where systemd or an init script runs; not in a Docker container): harmless.
set -euo pipefail
command -v etcd >/dev/null && exit 0
as_root=()
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || { echo "etcd is missing and this is not root: install etcd-server (apt)" >&2; exit 1; }
    as_root=(sudo)
fi
"${as_root[@]}" apt-get update
"${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends etcd-server
