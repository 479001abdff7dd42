#!/bin/sh
# PgBouncer in transaction pooling between the processes and PostgreSQL (docker-compose.yml
# `pgbouncer`, docs/deploying.md "PgBouncer"). Renders deploy/pgbouncer/pgbouncer.ini.template into
# PGBOUNCER_VAR_DIR (with its auth_file) and runs pgbouncer in the foreground: errors and pool
# events to stderr. PgBouncer refuses to run as root: run by root, it switches to PGBOUNCER_RUN_AS.
#
#   sh scripts/pgbouncer.sh         render and run (exec: the shell becomes pgbouncer, same pid)
#   sh scripts/pgbouncer.sh -r      render only, print the configuration's path
#
# Settings (environment; defaults in brackets):
#   PGBOUNCER_LISTEN_ADDR       address(es) to listen on [127.0.0.1]
#   PGBOUNCER_LISTEN_PORT       [6432]
#   PGBOUNCER_UPSTREAM_HOST     PostgreSQL's host [127.0.0.1]
#   PGBOUNCER_UPSTREAM_PORT     PostgreSQL's port [5432]
#   PGBOUNCER_POOL_SIZE         server connections per (database, user): default_pool_size [20]
#   PGBOUNCER_MAX_CLIENT_CONN   client connections in all [1000]
#   PGBOUNCER_QUERY_WAIT_TIMEOUT seconds a transaction may wait for a server connection [120]
#   PGBOUNCER_AUTH_TYPE         trust | md5 | scram-sha-256 [trust]
#   PGBOUNCER_AUTH_USER         the auth_file's one entry: the user the processes connect as [postgres]
#                               (trust too checks that a user is in auth_file: pgbouncer.ini(5), auth_type)
#   PGBOUNCER_AUTH_PASSWORD     that user's PostgreSQL password, which PgBouncer also logs in with;
#                               required for md5 and scram-sha-256 [empty]
#   PGBOUNCER_ADMIN_USERS       who may use the admin console [PGBOUNCER_AUTH_USER]
#   PGBOUNCER_VAR_DIR           rendered configuration, auth_file, pid file [$ORDERFLOW_VAR_DIR/pgbouncer]
#   PGBOUNCER_RUN_AS            the user pgbouncer runs as when started by root, who must reach
#                               PGBOUNCER_VAR_DIR (this script hands that folder and its files to it) [postgres]
#   PGBOUNCER_SERVER_TLS_SSLMODE TLS to PostgreSQL: disable | allow | prefer | require (a managed
#                               server that insists on TLS) [disable, PgBouncer's own default]
#   PGBOUNCER_BIN               the pgbouncer binary [pgbouncer on PATH, else /usr/sbin/pgbouncer]
set -eu

root=$(cd "$(dirname "$0")/.." && pwd)
template="$root/deploy/pgbouncer/pgbouncer.ini.template"

: "${PGBOUNCER_VAR_DIR:=${ORDERFLOW_VAR_DIR:-$root/var}/pgbouncer}"
: "${PGBOUNCER_LISTEN_ADDR:=127.0.0.1}"
: "${PGBOUNCER_LISTEN_PORT:=6432}"
: "${PGBOUNCER_UPSTREAM_HOST:=127.0.0.1}"
: "${PGBOUNCER_UPSTREAM_PORT:=5432}"
: "${PGBOUNCER_POOL_SIZE:=20}"
: "${PGBOUNCER_MAX_CLIENT_CONN:=1000}"
: "${PGBOUNCER_QUERY_WAIT_TIMEOUT:=120}"
: "${PGBOUNCER_AUTH_TYPE:=trust}"
: "${PGBOUNCER_AUTH_USER:=postgres}"
: "${PGBOUNCER_AUTH_PASSWORD:=}"
: "${PGBOUNCER_ADMIN_USERS:=$PGBOUNCER_AUTH_USER}"
: "${PGBOUNCER_RUN_AS:=postgres}"
: "${PGBOUNCER_SERVER_TLS_SSLMODE:=disable}"
case "$PGBOUNCER_SERVER_TLS_SSLMODE" in
    disable | allow | prefer | require) ;;
    *)
        echo "pgbouncer.sh: PGBOUNCER_SERVER_TLS_SSLMODE must be disable, allow, prefer or require," \
            "not '$PGBOUNCER_SERVER_TLS_SSLMODE'" >&2
        exit 1
        ;;
esac

case "$PGBOUNCER_AUTH_TYPE" in
    trust) ;;
    md5 | scram-sha-256)
        if [ -z "$PGBOUNCER_AUTH_PASSWORD" ]; then
            echo "pgbouncer.sh: auth_type $PGBOUNCER_AUTH_TYPE needs PGBOUNCER_AUTH_PASSWORD" >&2
            exit 1
        fi
        ;;
    *)
        echo "pgbouncer.sh: PGBOUNCER_AUTH_TYPE must be trust, md5 or scram-sha-256, not '$PGBOUNCER_AUTH_TYPE'" >&2
        exit 1
        ;;
esac
for number in "$PGBOUNCER_LISTEN_PORT" "$PGBOUNCER_UPSTREAM_PORT" "$PGBOUNCER_POOL_SIZE" \
    "$PGBOUNCER_MAX_CLIENT_CONN" "$PGBOUNCER_QUERY_WAIT_TIMEOUT"; do
    case "$number" in
        '' | *[!0-9]*) echo "pgbouncer.sh: '$number' is not a whole number" >&2; exit 1 ;;
    esac
done

pgbouncer_bin="${PGBOUNCER_BIN:-$(command -v pgbouncer || echo /usr/sbin/pgbouncer)}"
if [ "${1:-}" != -r ] && [ ! -x "$pgbouncer_bin" ]; then
    echo "pgbouncer.sh: pgbouncer is not installed (make install-pgbouncer installs Debian's as root)" >&2
    exit 1
fi

# sed's replacement text: escape \, & and the | delimiter.
quote() { printf '%s' "$1" | sed -e 's/[\\&|]/\\&/g'; }
mkdir -p "$PGBOUNCER_VAR_DIR"
umask 077
sed -e "s|@LISTEN_ADDR@|$(quote "$PGBOUNCER_LISTEN_ADDR")|" \
    -e "s|@LISTEN_PORT@|$PGBOUNCER_LISTEN_PORT|" \
    -e "s|@UPSTREAM_HOST@|$(quote "$PGBOUNCER_UPSTREAM_HOST")|" \
    -e "s|@UPSTREAM_PORT@|$PGBOUNCER_UPSTREAM_PORT|" \
    -e "s|@POOL_SIZE@|$PGBOUNCER_POOL_SIZE|" \
    -e "s|@MAX_CLIENT_CONN@|$PGBOUNCER_MAX_CLIENT_CONN|" \
    -e "s|@QUERY_WAIT_TIMEOUT@|$PGBOUNCER_QUERY_WAIT_TIMEOUT|" \
    -e "s|@AUTH_TYPE@|$PGBOUNCER_AUTH_TYPE|" \
    -e "s|@SERVER_TLS_SSLMODE@|$PGBOUNCER_SERVER_TLS_SSLMODE|" \
    -e "s|@ADMIN_USERS@|$(quote "$PGBOUNCER_ADMIN_USERS")|" \
    -e "s|@VAR_DIR@|$(quote "$PGBOUNCER_VAR_DIR")|" \
    "$template" >"$PGBOUNCER_VAR_DIR/pgbouncer.ini"
# auth_file: "user" "password", a double quote doubled (pgbouncer.ini(5), "Authentication file format").
printf '"%s" "%s"\n' "$(printf '%s' "$PGBOUNCER_AUTH_USER" | sed 's/"/""/g')" \
    "$(printf '%s' "$PGBOUNCER_AUTH_PASSWORD" | sed 's/"/""/g')" >"$PGBOUNCER_VAR_DIR/userlist.txt"

if [ "${1:-}" = -r ]; then
    echo "$PGBOUNCER_VAR_DIR/pgbouncer.ini"
    exit 0
fi
if [ "$(id -u)" = 0 ]; then
    # pgbouncer will not run as root; its user must read the configuration and write the pid file.
    # Only the folder and pgbouncer's own files change hands, never what else the folder holds.
    chown "$PGBOUNCER_RUN_AS" "$PGBOUNCER_VAR_DIR" "$PGBOUNCER_VAR_DIR/pgbouncer.ini" "$PGBOUNCER_VAR_DIR/userlist.txt"
    if [ -e "$PGBOUNCER_VAR_DIR/pgbouncer.pid" ]; then chown "$PGBOUNCER_RUN_AS" "$PGBOUNCER_VAR_DIR/pgbouncer.pid"; fi
    # A folder above it closed to that user (a checkout under /root, mode 700) fails later with a bare
    # "could not open pidfile": say why now.
    if ! su -s /bin/sh "$PGBOUNCER_RUN_AS" -c 'test -w "$0" && test -r "$0/pgbouncer.ini"' "$PGBOUNCER_VAR_DIR"; then
        echo "pgbouncer.sh: user $PGBOUNCER_RUN_AS cannot reach $PGBOUNCER_VAR_DIR (is a folder above it closed to" \
            "it, such as /root?): set PGBOUNCER_VAR_DIR to a folder it can reach, e.g. /var/tmp/orderflow-pgbouncer" >&2
        exit 1
    fi
    exec "$pgbouncer_bin" -u "$PGBOUNCER_RUN_AS" "$PGBOUNCER_VAR_DIR/pgbouncer.ini"
fi
exec "$pgbouncer_bin" "$PGBOUNCER_VAR_DIR/pgbouncer.ini"
