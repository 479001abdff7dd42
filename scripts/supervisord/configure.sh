#!/bin/sh
# Writes make run's supervisord configuration from the Procfile: configure.sh RUN_DIR PORT
# (honcho export with the template beside this script, then the socket, its password and the
# user filled in). Prints the configuration's path. Used by `make run` and tests/test_embedded_drills.py.
set -eu
run_dir=$1
port=$2
here=$(dirname "$0")
mkdir -p "$run_dir"
# The Procfile's `proxy` (nginx in front of web and Flower) only where make run has set it up
# (NGINX_LISTEN, with web and Flower moved behind it); otherwise web serves clients itself.
concurrency=""
[ -n "${NGINX_LISTEN:-}" ] || concurrency="-c proxy=0"
# shellcheck disable=SC2086 # concurrency: no option, or one option and its value
out=$(honcho export -f Procfile -e /dev/null -p "$port" -a orderflow -l "$run_dir" -t "$here" $concurrency supervisord "$run_dir" 2>&1) || {
    echo "$out" >&2
    exit 1
}
# A short socket path whatever the checkout's (AF_UNIX paths end at 108 bytes).
sock="${TMPDIR:-/tmp}/orderflow-$(printf '%s' "$run_dir" | cksum | cut -d' ' -f1).sock"
password=$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')
conf="$run_dir/orderflow.conf"
sed -i -e "s#@SOCKET@#$sock#" -e "s#@PASSWORD@#$password#" -e "s#@USER@#$(id -un)#" "$conf"
chmod 600 "$conf"
echo "$conf"
