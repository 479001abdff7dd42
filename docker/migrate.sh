#!/bin/sh
# Migrate every database alias the settings define: default, plus inventory and
# reports when DATABASE_URL_INVENTORY / DATABASE_URL_REPORTS split them out.
# The compose file's one-shot `migrate` service runs this before anything else.
set -eu
export DJANGO_SETTINGS_MODULE="${DJANGO_SETTINGS_MODULE:-project.settings}"

aliases=$(python -c 'import django; django.setup(); from django.conf import settings; print(*settings.DATABASES)')
for alias in $aliases; do
    echo "migrate --database=$alias"
    python manage.py migrate --database="$alias" --noinput
done
