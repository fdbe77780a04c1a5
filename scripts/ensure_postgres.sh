#!/usr/bin/env bash
# make setup: install Debian's PostgreSQL server when no server binary is there (PCEE_DB=postgres
# starts one under `make up`). Needs root for apt-get; a no-op when PostgreSQL is installed.
set -euo pipefail
if compgen -G "/usr/lib/postgresql/*/bin/postgres" >/dev/null; then
    exit 0
fi
bash "$(dirname "$0")/ensure_debian_package.sh" postgresql "/usr/lib/postgresql/*/bin/postgres" \
    "set PCEE_POSTGRES_URL to an existing server"
# Debian's package starts a cluster of its own (port 5432 by default); make up runs its own server
# under the state dir, so stop the packaged one if it was started (ignore failures: no systemd here)
if command -v pg_lsclusters >/dev/null; then
    pg_lsclusters --no-header 2>/dev/null | while read -r ver name _; do
        pg_ctlcluster "$ver" "$name" stop 2>/dev/null || true
    done
fi
