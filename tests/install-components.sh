#!/usr/bin/env bash
# The components the tests drive for real, installed from Debian when missing: etcd (the HA
# tests run a 3-member cluster on ports of their own), curl (the RESTCONF tests' client) and
# openssl (the RESTCONF server makes its self-signed certificate with it). The etcd-server
# package may also start a system etcd on 2379/2380 (where systemd or an init script runs;
# not in a Docker container): harmless.
set -euo pipefail
missing=()
command -v etcd >/dev/null || missing+=(etcd-server)
command -v curl >/dev/null || missing+=(curl ca-certificates)
command -v openssl >/dev/null || missing+=(openssl)
[ ${#missing[@]} -eq 0 ] && exit 0
as_root=()
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || { echo "missing and this is not root: install ${missing[*]} (apt)" >&2; exit 1; }
    as_root=(sudo)
fi
"${as_root[@]}" apt-get update
"${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"
