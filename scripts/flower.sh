#!/bin/sh
# The Procfile's `flower` process: Flower behind basic auth unless it listens on loopback only.
# An empty FLOWER_BASIC_AUTH would lock every user out, so it is dropped; `make run` always sets
# one (generating it); started otherwise, Flower refuses to listen beyond loopback without it.
# Flower also reads FLOWER_* variables itself.
address="${FLOWER_ADDRESS:-127.0.0.1}"
case "$address" in
    127.* | localhost | ::1) ;;
    *)
        if [ -z "${FLOWER_BASIC_AUTH:-}" ]; then
            echo "flower: refusing to listen on $address without FLOWER_BASIC_AUTH (user:password)" >&2
            exit 1
        fi
        ;;
esac
[ -n "${FLOWER_BASIC_AUTH:-}" ] || unset FLOWER_BASIC_AUTH
exec celery -A project flower --address="$address" --port="${FLOWER_PORT:-5555}" ${FLOWER_BASIC_AUTH:+"--basic-auth=$FLOWER_BASIC_AUTH"}
