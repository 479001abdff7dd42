#!/bin/sh
# The front door (Procfile `proxy`, docker-compose.yml `proxy`): nginx buffering clients for gunicorn
# and a read-only front for Flower. Renders deploy/nginx/*.template into NGINX_VAR_DIR with
# envsubst (only the NGINX_* names below; nginx's own $variables stay) and runs nginx in the
# foreground as whoever runs this: pid and temporary files under NGINX_VAR_DIR, errors to
# stderr, the access log to stdout.
#
#   sh scripts/nginx.sh         render, check and run (exec: the shell becomes nginx)
#   sh scripts/nginx.sh -t      render and check only (`nginx -t`), as CI does
#
# Settings (environment; defaults in brackets):
#   NGINX_LISTEN                the front door's address [127.0.0.1:8000]
#   NGINX_UPSTREAM              gunicorn's address [127.0.0.1:8001]
#   NGINX_FLOWER_LISTEN         Flower's read-only front; empty: none [empty]
#   NGINX_FLOWER_UPSTREAM       Flower's own address [127.0.0.1:5556]
#   NGINX_CLIENT_MAX_BODY_SIZE  bytes [DATA_UPLOAD_MAX_MEMORY_SIZE, else 65536: Django's limit]
#   NGINX_CONN_PER_ADDRESS      open requests per client address [32]
#   NGINX_TRUST_FORWARDED_PROTO true: pass on the X-Forwarded-Proto of a load balancer in front
#                               that terminates TLS and sets it; else nginx's own scheme [false]
#   NGINX_WORKER_PROCESSES [1], NGINX_WORKER_CONNECTIONS [4096], NGINX_WORKER_RLIMIT_NOFILE [2 x connections + 64]
#   NGINX_ACCESS_LOG            [/dev/stdout, or NGINX_VAR_DIR/access.log where stdout cannot be reopened]
#   NGINX_VAR_DIR               rendered configuration, pid, temporary files [$ORDERFLOW_VAR_DIR/nginx]
#   NGINX_BIN                   the nginx binary [nginx on PATH, else /usr/sbin/nginx]
set -eu

root=$(cd "$(dirname "$0")/.." && pwd)
templates="$root/deploy/nginx"

: "${NGINX_VAR_DIR:=${ORDERFLOW_VAR_DIR:-$root/var}/nginx}"
: "${NGINX_LISTEN:=127.0.0.1:8000}"
: "${NGINX_UPSTREAM:=127.0.0.1:8001}"
: "${NGINX_FLOWER_LISTEN:=}"
: "${NGINX_FLOWER_UPSTREAM:=127.0.0.1:5556}"
: "${NGINX_CLIENT_MAX_BODY_SIZE:=${DATA_UPLOAD_MAX_MEMORY_SIZE:-65536}}"
: "${NGINX_CONN_PER_ADDRESS:=32}"
case "${NGINX_TRUST_FORWARDED_PROTO:-false}" in
    true | 1 | yes | on) NGINX_FORWARDED_PROTO='$http_x_forwarded_proto' ;;
    *) NGINX_FORWARDED_PROTO='$scheme' ;;
esac
: "${NGINX_WORKER_PROCESSES:=1}"
: "${NGINX_WORKER_CONNECTIONS:=4096}"
: "${NGINX_WORKER_RLIMIT_NOFILE:=$((NGINX_WORKER_CONNECTIONS * 2 + 64))}"
# Never above the hard limit, which an unprivileged nginx cannot raise.
hard_nofile=$(ulimit -Hn 2>/dev/null || echo unlimited)
if [ "$hard_nofile" != unlimited ] && [ "$NGINX_WORKER_RLIMIT_NOFILE" -gt "$hard_nofile" ]; then
    NGINX_WORKER_RLIMIT_NOFILE=$hard_nofile
fi
: "${NGINX_ACCESS_LOG:=/dev/stdout}"
# nginx opens /dev/stdout anew, which fails when stdout belongs to another user (a file or pipe
# of root's, under runuser or su): the access log then goes to a file.
if [ "$NGINX_ACCESS_LOG" = /dev/stdout ] && [ ! -w /dev/stdout ]; then
    NGINX_ACCESS_LOG="$NGINX_VAR_DIR/access.log"
    echo "nginx.sh: $(id -un) cannot reopen stdout: access log in $NGINX_ACCESS_LOG" >&2
fi
# Run by root, nginx would hand its workers to `nobody`, who may not reach NGINX_VAR_DIR (a
# checkout under a private home): its workers run as root then, like the rest of `make run`.
# The image runs this as an unprivileged user (docker-compose.yml), where no `user` applies.
NGINX_USER_DIRECTIVE=""
if [ "$(id -u)" = 0 ]; then
    NGINX_USER_DIRECTIVE="user root $(id -gn);"
fi
export NGINX_VAR_DIR NGINX_LISTEN NGINX_UPSTREAM NGINX_FLOWER_LISTEN NGINX_FLOWER_UPSTREAM \
    NGINX_CLIENT_MAX_BODY_SIZE NGINX_CONN_PER_ADDRESS NGINX_FORWARDED_PROTO NGINX_WORKER_PROCESSES \
    NGINX_WORKER_CONNECTIONS NGINX_WORKER_RLIMIT_NOFILE NGINX_ACCESS_LOG NGINX_USER_DIRECTIVE

nginx_bin="${NGINX_BIN:-$(command -v nginx || echo /usr/sbin/nginx)}"
if [ ! -x "$nginx_bin" ]; then
    echo "nginx.sh: nginx is not installed (make install-nginx installs Debian's as root)" >&2
    exit 1
fi
if ! command -v envsubst >/dev/null; then
    echo "nginx.sh: envsubst is not installed (Debian's gettext-base; make install-nginx installs it)" >&2
    exit 1
fi

names='${NGINX_VAR_DIR} ${NGINX_LISTEN} ${NGINX_UPSTREAM} ${NGINX_FLOWER_LISTEN} ${NGINX_FLOWER_UPSTREAM}
${NGINX_CLIENT_MAX_BODY_SIZE} ${NGINX_CONN_PER_ADDRESS} ${NGINX_FORWARDED_PROTO} ${NGINX_WORKER_PROCESSES}
${NGINX_WORKER_CONNECTIONS} ${NGINX_WORKER_RLIMIT_NOFILE} ${NGINX_ACCESS_LOG} ${NGINX_USER_DIRECTIVE}'
mkdir -p "$NGINX_VAR_DIR/tmp"
envsubst "$names" <"$templates/nginx.conf.template" >"$NGINX_VAR_DIR/nginx.conf"
if [ -n "$NGINX_FLOWER_LISTEN" ]; then
    envsubst "$names" <"$templates/flower.conf.template" >"$NGINX_VAR_DIR/flower.conf"
else
    echo "# No Flower front (NGINX_FLOWER_LISTEN is empty)." >"$NGINX_VAR_DIR/flower.conf"
fi

# -e stderr: nginx opens its compiled-in error log (/var/log/nginx) before reading the configuration.
if [ "${1:-}" = "-t" ]; then
    exec "$nginx_bin" -t -q -e stderr -p "$NGINX_VAR_DIR" -c "$NGINX_VAR_DIR/nginx.conf"
fi
echo "nginx.sh: $NGINX_LISTEN -> gunicorn at $NGINX_UPSTREAM${NGINX_FLOWER_LISTEN:+; $NGINX_FLOWER_LISTEN -> Flower at $NGINX_FLOWER_UPSTREAM (read-only)}" >&2
exec "$nginx_bin" -e stderr -p "$NGINX_VAR_DIR" -c "$NGINX_VAR_DIR/nginx.conf" -g 'daemon off;'
