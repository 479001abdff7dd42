#!/bin/sh
# Run once by the postgres image on an empty data volume, after it has created
# POSTGRES_DB: creates the other services' databases of the split shape (docs/design.md §6),
# <POSTGRES_DB>_inventory and <POSTGRES_DB>_reports, which docker-compose.yml's
# DATABASE_URL_INVENTORY / DATABASE_URL_REPORTS name. ORDERFLOW_EXTRA_DATABASES
# (space-separated) replaces that list.
set -eu

for database in ${ORDERFLOW_EXTRA_DATABASES:-${POSTGRES_DB}_inventory ${POSTGRES_DB}_reports}; do
    exists=$(psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres -Atc \
        "SELECT 1 FROM pg_database WHERE datname = '$database'")
    if [ "$exists" != 1 ]; then
        echo "creating database $database"
        psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres -c \
            "CREATE DATABASE \"$database\" OWNER \"$POSTGRES_USER\""
    fi
done
