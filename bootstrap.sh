#!/bin/sh
# Sets voicebridge up in ./.venv on a fresh Debian/Ubuntu machine that has python3.
#   ./bootstrap.sh          the daemon and its demo
#   ./bootstrap.sh --test   also the test tools, and systemd's tools the tests use
#                           (systemd-journald, systemd-socket-activate, systemd-analyze),
#                           Prometheus (prometheus, promtool), groff and man for the
#                           man page, the TLS proxies of tests/test_proxy.py (nginx,
#                           haproxy, openssl) and what tests/system/realsystem.py
#                           boots a root file system with (debootstrap, systemd-nspawn)
# Versions are pinned by constraints.txt, so every install is the same.
set -eu
cd "$(dirname "$0")"

want_tests=no
[ "${1:-}" = "--test" ] && want_tests=yes

as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
        echo "bootstrap: need root (or sudo) to run: $*" >&2; return 1; fi
}

apt_packages=""
python3 -c 'import ensurepip, venv' 2>/dev/null || apt_packages="python3-venv"
if [ "$want_tests" = yes ] && ! { [ -x /lib/systemd/systemd-journald ] &&
        command -v systemd-socket-activate >/dev/null && command -v systemd-analyze >/dev/null; }; then
    apt_packages="$apt_packages systemd"
fi
# Prometheus and promtool: the alert rules' tests and the dashboard's queries (tests/observability).
if [ "$want_tests" = yes ] && ! { command -v prometheus >/dev/null && command -v promtool >/dev/null; }; then
    apt_packages="$apt_packages prometheus"
fi
# The man page's tests render it (groff) and open it as `man voicebridge` would; the TLS
# proxies of tests/test_proxy.py; what tests/system/realsystem.py builds and boots with.
if [ "$want_tests" = yes ]; then
    command -v groff >/dev/null || apt_packages="$apt_packages groff-base"
    command -v man >/dev/null || apt_packages="$apt_packages man-db"
    for tool in nginx:nginx-light haproxy:haproxy openssl:openssl redis-server:redis-server \
            debootstrap:debootstrap systemd-nspawn:systemd-container; do
        command -v "${tool%%:*}" >/dev/null || [ -x "/usr/sbin/${tool%%:*}" ] ||
            apt_packages="$apt_packages ${tool#*:}"
    done
fi
if [ -n "$apt_packages" ]; then
    echo "bootstrap: installing Debian packages:$apt_packages"
    as_root apt-get update -qq
    # shellcheck disable=SC2086
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq $apt_packages >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip 2>/dev/null || true
if [ "$want_tests" = yes ]; then target='.[test]'; else target='.'; fi
.venv/bin/python -m pip install -q --disable-pip-version-check -c constraints.txt -e "$target"
echo "bootstrap: ready (.venv/bin/voicebridge)"
