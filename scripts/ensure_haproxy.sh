#!/usr/bin/env bash
# make setup: install Debian's HAProxy when it is missing (make up puts it in front of the HTTP
# replicas, tests/scale starts it). Needs root for apt-get; a no-op when haproxy is installed.
set -euo pipefail
if command -v haproxy >/dev/null || [ -x /usr/sbin/haproxy ]; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "ensure_haproxy: no haproxy binary and not root: install the 'haproxy' package (apt-get install haproxy)" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update
apt-get install -y --no-install-recommends haproxy
# Debian's package may start a haproxy of its own (its /etc/haproxy/haproxy.cfg): make up runs its
# own under the state dir; stop the packaged one if it started (no systemd here: ignore failures)
if command -v service >/dev/null; then
    service haproxy stop >/dev/null 2>&1 || true
fi
{ command -v haproxy >/dev/null || [ -x /usr/sbin/haproxy ]; } || {
    echo "ensure_haproxy: installed haproxy but found no haproxy binary" >&2
    exit 1
}
