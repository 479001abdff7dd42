#!/bin/sh
# Run once by the postgres image on an empty data volume, after it has created
# POSTGRES_DB: creates the extra databases named in ORDERFLOW_EXTRA_DATABASES
# (space-separated), e.g. the per-service databases of the split shape
# (DATABASE_URL_INVENTORY / DATABASE_URL_REPORTS, DESIGN §6).
set -eu

for database in ${ORDERFLOW_EXTRA_DATABASES:-}; do
    exists=$(psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres -Atc \
        "SELECT 1 FROM pg_database WHERE datname = '$database'")
    if [ "$exists" != 1 ]; then
        echo "creating database $database"
        psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres -c \
            "CREATE DATABASE \"$database\" OWNER \"$POSTGRES_USER\""
    fi
done
