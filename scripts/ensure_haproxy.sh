#!/usr/bin/env bash
# make setup: install Debian's HAProxy when it is missing (make up puts it in front of the HTTP
# replicas, tests/scale starts it). Needs root for apt-get; a no-op when haproxy is installed.
set -euo pipefail
if [ -x /usr/sbin/haproxy ]; then
    exit 0
fi
bash "$(dirname "$0")/ensure_debian_package.sh" haproxy /usr/sbin/haproxy
# Debian's package may start a haproxy of its own (its /etc/haproxy/haproxy.cfg): make up runs its
# own under the state dir; stop the packaged one if it started (no systemd here: ignore failures)
if command -v service >/dev/null; then
    service haproxy stop >/dev/null 2>&1 || true
fi
