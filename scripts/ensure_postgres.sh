#!/usr/bin/env bash
# make setup: install Debian's PostgreSQL server when no server binary is there (PCEE_DB=postgres
# starts one under `make up`). Needs root for apt-get; a no-op when PostgreSQL is installed.
set -euo pipefail
if compgen -G "/usr/lib/postgresql/*/bin/postgres" >/dev/null; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "ensure_postgres: no PostgreSQL server (/usr/lib/postgresql/*/bin/postgres) and not root: install the 'postgresql' package, or set PCEE_POSTGRES_URL to an existing server" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update
apt-get install -y --no-install-recommends postgresql
# Debian's package starts a cluster of its own (port 5432 by default); make up runs its own server
# under the state dir, so stop the packaged one if it was started (ignore failures: no systemd here)
if command -v pg_lsclusters >/dev/null; then
    pg_lsclusters --no-header 2>/dev/null | while read -r ver name _; do
        pg_ctlcluster "$ver" "$name" stop 2>/dev/null || true
    done
fi
compgen -G "/usr/lib/postgresql/*/bin/postgres" >/dev/null || {
    echo "ensure_postgres: installed postgresql but found no /usr/lib/postgresql/*/bin/postgres" >&2
    exit 1
}
