#!/bin/sh
# Writes make run's supervisord configuration from the Procfile: configure.sh RUN_DIR PORT
# (honcho export with the template beside this script, then the socket, its password and the
# user filled in). Prints the configuration's path. Used by `make run` and tests/test_embedded_drills.py.
set -eu
run_dir=$1
port=$2
here=$(dirname "$0")
mkdir -p "$run_dir"
out=$(honcho export -f Procfile -e /dev/null -p "$port" -a orderflow -l "$run_dir" -t "$here" supervisord "$run_dir" 2>&1) || {
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
