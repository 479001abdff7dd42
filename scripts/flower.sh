#!/bin/sh
# The Procfile's `flower` process: Flower behind basic auth unless it listens on loopback only.
# An empty FLOWER_BASIC_AUTH would lock every user out, so it is dropped; `make run` always sets
# one (generating it); started otherwise, Flower refuses to listen beyond loopback without it.
# Flower also reads FLOWER_* variables itself. --read_only always: Flower 2.2 then refuses (403) every
# API call that runs, revokes or aborts a task or controls a worker, and hides the UI's buttons for
# them; operators re-drive and cancel orders in the admin (docs/security.md, "Flower").
# Behind the front door (`make run` with nginx, scripts/nginx.sh), Flower listens on loopback at
# ORDERFLOW_FLOWER_BACKEND_PORT and nginx at FLOWER_ADDRESS:FLOWER_PORT, refusing the API calls
# that run or control tasks (not a FLOWER_* name: Flower would take it for an option of its own).
address="${FLOWER_ADDRESS:-127.0.0.1}"
port="${FLOWER_PORT:-5555}"
case "$address" in
    127.* | localhost | ::1) ;;
    *)
        if [ -z "${FLOWER_BASIC_AUTH:-}" ]; then
            echo "flower: refusing to listen on $address without FLOWER_BASIC_AUTH (user:password)" >&2
            exit 1
        fi
        ;;
esac
# The check above is on the address clients reach: nginx's, when it fronts Flower.
if [ -n "${ORDERFLOW_FLOWER_BACKEND_PORT:-}" ]; then
    address=127.0.0.1
    port=$ORDERFLOW_FLOWER_BACKEND_PORT
fi
[ -n "${FLOWER_BASIC_AUTH:-}" ] || unset FLOWER_BASIC_AUTH
exec celery -A project flower --address="$address" --port="$port" --read_only=true ${FLOWER_BASIC_AUTH:+"--basic-auth=$FLOWER_BASIC_AUTH"}
