#!/usr/bin/env bash
# Make redis-server available for the store tests (Debian package), and with --start run it on loopback
# when nothing answers on 127.0.0.1:6379. Never fatal for set-up: the tests say clearly if Redis is missing.
set -uo pipefail
if ! command -v redis-server >/dev/null 2>&1; then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="$(command -v sudo || true)"
    if command -v apt-get >/dev/null 2>&1 && { [ "$(id -u)" -eq 0 ] || [ -n "$SUDO" ]; }; then
        echo "installing redis-server (Debian package) for the store tests"
        export DEBIAN_FRONTEND=noninteractive
        $SUDO apt-get install -y -q redis-server >/dev/null 2>&1 || \
            { $SUDO apt-get update -q >/dev/null 2>&1 && $SUDO apt-get install -y -q redis-server >/dev/null 2>&1; } || \
            echo "warning: could not install redis-server; the Redis tests will fail until it is installed" >&2
    else
        echo "warning: redis-server missing and no apt-get/sudo; install it for the Redis tests" >&2
    fi
fi
if [ "${1:-}" = "--start" ] && command -v redis-server >/dev/null 2>&1; then
    if ! (exec 3<>/dev/tcp/127.0.0.1/6379) 2>/dev/null; then
        redis-server --bind 127.0.0.1 --port 6379 --daemonize yes --save "" --appendonly no >/dev/null
        echo "started redis-server on 127.0.0.1:6379"
    fi
fi
exit 0
