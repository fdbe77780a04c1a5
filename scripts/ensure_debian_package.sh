#!/usr/bin/env bash
# ensure_debian_package.sh PACKAGE GLOB [HINT]: install Debian's PACKAGE with apt-get unless a file
# matching GLOB (its binary) exists; exit 0 when it is there afterwards. Needs root to install; HINT
# says what a non-root user can do instead. The ensure_*.sh scripts (make setup) call it.
set -euo pipefail
package=$1 glob=$2 hint=${3:-}
if compgen -G "$glob" >/dev/null; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "ensure $package: no $glob and not root: install the '$package' package${hint:+, or $hint}" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update
apt-get install -y --no-install-recommends "$package"
compgen -G "$glob" >/dev/null || {
    echo "ensure $package: installed $package but found no $glob" >&2
    exit 1
}
