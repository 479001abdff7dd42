# orderflow: set up, run and test from a fresh checkout (see README.md).
#
#   make run    .venv + requirements.txt, nginx, migrate, seed, then nginx + web + workers + beat + Flower (Ctrl-C stops all)
#   make test   .venv + requirements-dev.txt, then the whole test suite (PYTEST_ARGS="-x -k saga" narrows it)
#   make docs   .venv + requirements-docs.txt, then the documentation site into site/ (mkdocs build --strict)
#
# No target needs the virtualenv activated. Configuration is the environment,
# then .env for what the environment leaves unset (the rule project/settings.py
# follows too); .env.example lists every variable.

SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help
# The run steps depend on each other's order (migrate before seed, ...).
.NOTPARALLEL:

# Resolved before PATH is changed below, so it never finds the venv's own python.
ifndef PYTHON
PYTHON := $(shell command -v python3.11 2>/dev/null || command -v python3 2>/dev/null)
endif
VENV := .venv
PY := $(VENV)/bin/python
# Touched after a successful install of each requirements set: a requirements
# file newer than its stamp means that set is installed again.
STAMP := $(VENV)/.installed-runtime
DEV_STAMP := $(VENV)/.installed-dev
BENCH_STAMP := $(VENV)/.installed-bench
DOCS_STAMP := $(VENV)/.installed-docs
# pip's own progress output, not --quiet: the first install takes a while.
PIP_INSTALL := $(PY) -m pip install --disable-pip-version-check
PYTEST_ARGS ?=

export DJANGO_SETTINGS_MODULE := project.settings
export PYTHONUNBUFFERED := 1
# supervisord's processes (gunicorn, celery) are found in the venv without activating it.
export VIRTUAL_ENV := $(CURDIR)/$(VENV)
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: help install install-dev install-bench install-docs install-nginx install-pgbouncer install-prometheus run status not-running test bench docs browser-deps lint format migrate createdb collectstatic seed superuser clean distclean

help:
	@echo "make run        install, migrate, seed demo data, then run nginx + web + workers + beat + Flower"
	@echo "                (PORT=$${PORT:-8000}, FLOWER_PORT=$${FLOWER_PORT:-5555}; Ctrl-C stops everything)"
	@echo "make status     the processes of a running make run (CMD=\"restart worker_inventory\": another supervisorctl command)"
	@echo "make test       install the dev tools, then run the test suite (PYTEST_ARGS=... passes options to pytest)"
	@echo "make docs       install the docs tools, then build the site into site/ (mkdocs build --strict)"
	@echo "make bench      the benchmark (bench/): ARGS=\"--orders 200 --spawn --baseline\" passes options to bench_orders"
	@echo "make browser-deps  apt-get install Debian's chromium + chromium-driver (tests/browser) and faketime (a drill) as root"
	@echo "make install-nginx apt-get install Debian's nginx and gettext-base (the front door, scripts/nginx.sh) as root"
	@echo "make install-pgbouncer apt-get install Debian's pgbouncer (transaction pooling, scripts/pgbouncer.sh) as root"
	@echo "make install-prometheus apt-get install Debian's prometheus (promtool for tests/test_prometheus_config.py; a Prometheus for make run) as root"
	@echo "make lint       ruff check + ruff format --check + lint-imports (service boundaries, .importlinter)"
	@echo "make format     ruff check --fix + ruff format"
	@echo "make migrate    create the PostgreSQL database(s) if missing, migrate every database alias"
	@echo "make install    only install requirements.txt, the runtime (install-dev, install-bench, install-docs: the others)"
	@echo "make clean      remove var/ (embedded database, broker folders, static files) and site/; keeps .venv"
	@echo "make distclean  clean, and remove .venv"

# --- the virtualenv ---------------------------------------------------------------

$(PY):
	@test -n "$(PYTHON)" || { echo "make: python3 not found; install Python 3.11 or pass PYTHON=/path/to/python3.11" >&2; exit 1; }
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "make: orderflow needs Python 3.11 or newer; $(PYTHON) is %d.%d (pass PYTHON=...)" % sys.version_info[:2])'
	$(PYTHON) -m venv $(VENV)

# requirements.txt: the runtime (make run, the image). The other sets include it
# (-r requirements.txt), so installing one of them also satisfies the runtime stamp.
$(STAMP): requirements.txt | $(PY)
	@echo "installing requirements.txt (the runtime) into $(VENV)"
	$(PIP_INSTALL) -r requirements.txt
	@touch $@

# requirements-dev.txt: the runtime + test, lint and browser tools (make test, make lint).
$(DEV_STAMP): requirements-dev.txt requirements.txt | $(PY)
	@echo "installing requirements-dev.txt (runtime, tests, lint) into $(VENV)"
	$(PIP_INSTALL) -r requirements-dev.txt
	@touch $@ $(STAMP)

# requirements-bench.txt: the runtime + profiler and plotting (docs/performance.md).
$(BENCH_STAMP): requirements-bench.txt requirements.txt | $(PY)
	@echo "installing requirements-bench.txt (runtime, py-spy, matplotlib) into $(VENV)"
	$(PIP_INSTALL) -r requirements-bench.txt
	@touch $@ $(STAMP)

# requirements-docs.txt: mkdocs and its theme only.
$(DOCS_STAMP): requirements-docs.txt | $(PY)
	@echo "installing requirements-docs.txt (mkdocs) into $(VENV)"
	$(PIP_INSTALL) -r requirements-docs.txt
	@touch $@

install: $(STAMP)
install-dev: $(DEV_STAMP)
install-bench: $(BENCH_STAMP)
install-docs: $(DOCS_STAMP)

# The front door (scripts/nginx.sh, deploy/nginx/): Debian's nginx package (bookworm's 1.22.1, the
# series docker-compose.yml's image pins) and envsubst (gettext-base), installed when missing.
# Not root: says how, and make run serves without the proxy (its banner says so).
NGINX_FOUND = { command -v nginx || test -x /usr/sbin/nginx; } >/dev/null 2>&1 && command -v envsubst >/dev/null 2>&1
install-nginx:
	@if $(NGINX_FOUND); then \
		echo "install-nginx: $$("$$(command -v nginx || echo /usr/sbin/nginx)" -v 2>&1) and envsubst are installed"; \
	elif [ "$$(id -u)" = 0 ]; then \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends nginx gettext-base; \
	else \
		echo "install-nginx: not root; install Debian's nginx and gettext-base packages:"; \
		echo "    sudo apt-get update && sudo apt-get install -y --no-install-recommends nginx gettext-base"; \
		echo "install-nginx: until then make run serves gunicorn directly (for this machine's own use) and the proxy tests are skipped"; \
	fi

# PgBouncer in front of PostgreSQL (scripts/pgbouncer.sh, deploy/pgbouncer/, docs/deploying.md): Debian's
# package (bookworm's 1.18.0). The package's own service (/etc/pgbouncer, port 6432) is not used:
# scripts/pgbouncer.sh runs one with a configuration of its own. Not root: says how.
PGBOUNCER_FOUND = { command -v pgbouncer || test -x /usr/sbin/pgbouncer; } >/dev/null 2>&1
install-pgbouncer:
	@if $(PGBOUNCER_FOUND); then \
		echo "install-pgbouncer: $$("$$(command -v pgbouncer || echo /usr/sbin/pgbouncer)" --version 2>&1 | head -1) is installed"; \
	elif [ "$$(id -u)" = 0 ]; then \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends pgbouncer; \
	else \
		echo "install-pgbouncer: not root; install Debian's pgbouncer package:"; \
		echo "    sudo apt-get update && sudo apt-get install -y --no-install-recommends pgbouncer"; \
		echo "install-pgbouncer: until then the PgBouncer tests are skipped and processes connect to PostgreSQL directly"; \
	fi

# Prometheus (deploy/prometheus/, docs/operations.md "Metrics"): Debian's package (bookworm's 2.42.0),
# for its promtool (tests/test_prometheus_config.py checks the configurations and runs the alerts'
# unit tests with it) and a Prometheus to scrape `make run` (deploy/prometheus/prometheus-local.yml).
# The package's own service (/etc/prometheus, 0.0.0.0:9090) is not used. Not root: says how.
install-prometheus:
	@if command -v promtool >/dev/null 2>&1; then \
		echo "install-prometheus: $$(promtool --version 2>&1 | head -1) is installed"; \
	elif [ "$$(id -u)" = 0 ]; then \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus; \
	else \
		echo "install-prometheus: not root; install Debian's prometheus package:"; \
		echo "    sudo apt-get update && sudo apt-get install -y --no-install-recommends prometheus"; \
		echo "install-prometheus: until then the promtool checks in tests/test_prometheus_config.py are skipped"; \
	fi

# --- helpers (Python run with Django set up) -----------------------------------------

# Prints `export KEY=value` for each .env entry the environment does not set,
# so steps that read the environment themselves (createsuperuser, supervisord's
# processes) see .env the way Django does.
define DOTENV_PY
import os, shlex, environ
before = set(os.environ)
environ.Env.read_env(".env")
for key in sorted(set(os.environ) - before):
    print(f"export {key}={shlex.quote(os.environ[key])}")
endef
export DOTENV_PY
LOAD_DOTENV = if [ -f .env ]; then eval "$$($(PY) -c "$$DOTENV_PY")"; fi

define DB_ALIASES_PY
import django
django.setup()
from django.conf import settings
print(*settings.DATABASES)
endef
export DB_ALIASES_PY

# CREATE DATABASE for every PostgreSQL alias whose database does not exist yet.
define CREATEDB_PY
import sys
import django
django.setup()
from django.conf import settings
for alias, db in settings.DATABASES.items():
    if "postgresql" not in db["ENGINE"]:
        continue
    import psycopg2
    from psycopg2 import sql
    params = {key: db[name] for key, name in (("host", "HOST"), ("port", "PORT"), ("user", "USER"), ("password", "PASSWORD")) if db.get(name)}
    params.update(db.get("OPTIONS") or {})
    where = f"{db.get('HOST') or 'local socket'}:{db.get('PORT') or 5432}"
    connection = None
    for maintenance_db in ("postgres", "template1"):
        try:
            connection = psycopg2.connect(dbname=maintenance_db, **params)
            break
        except psycopg2.OperationalError as exc:
            error = exc
    if connection is None:
        sys.exit(f"make: cannot reach PostgreSQL at {where} for the '{alias}' database: {str(error).strip()}\n(start PostgreSQL, or unset DATABASE_URL* to use SQLite)")
    connection.autocommit = True
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1 FROM pg_database WHERE datname = %s", [db["NAME"]])
        if cursor.fetchone() is None:
            cursor.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(db["NAME"])))
            print(f"created PostgreSQL database {db['NAME']} at {where} for '{alias}'")
    connection.close()
endef
export CREATEDB_PY

define SUPERUSER_EXISTS_PY
import os
import django
django.setup()
from django.contrib.auth import get_user_model
User = get_user_model()
name = os.environ["DJANGO_SUPERUSER_USERNAME"]
print("yes" if User._default_manager.filter(**{User.USERNAME_FIELD: name}).exists() else "no")
endef
export SUPERUSER_EXISTS_PY

# --- set-up steps -------------------------------------------------------------------

createdb: install
	@$(PY) -c "$$CREATEDB_PY"

# Every alias in settings.DATABASES: default, plus inventory/reports when
# DATABASE_URL_INVENTORY / DATABASE_URL_REPORTS split them out.
migrate: createdb
	@aliases="$$($(PY) -c "$$DB_ALIASES_PY")"; \
	for alias in $$aliases; do \
		echo "migrate --database=$$alias"; \
		$(PY) manage.py migrate --database="$$alias" --noinput; \
	done

collectstatic: install
	$(PY) manage.py collectstatic --noinput --verbosity 0

seed: migrate
	$(PY) manage.py seed_demo

# Idempotent: createsuperuser --noinput fails when the user exists, so ask first.
superuser: migrate
	@$(LOAD_DOTENV); \
	if [ -z "$${DJANGO_SUPERUSER_USERNAME:-}" ] && [ -z "$${DJANGO_SUPERUSER_PASSWORD:-}" ]; then \
		echo "superuser: DJANGO_SUPERUSER_USERNAME/PASSWORD not set, none created (manage.py createsuperuser makes one)"; \
	elif [ -z "$${DJANGO_SUPERUSER_USERNAME:-}" ] || [ -z "$${DJANGO_SUPERUSER_PASSWORD:-}" ]; then \
		echo "superuser: set both DJANGO_SUPERUSER_USERNAME and DJANGO_SUPERUSER_PASSWORD; none created" >&2; \
	else \
		exists="$$($(PY) -c "$$SUPERUSER_EXISTS_PY")"; \
		if [ "$$exists" = yes ]; then \
			echo "superuser: $$DJANGO_SUPERUSER_USERNAME already exists"; \
		else \
			DJANGO_SUPERUSER_EMAIL="$${DJANGO_SUPERUSER_EMAIL:-}" $(PY) manage.py createsuperuser --noinput; \
		fi; \
	fi

# --- the two commands -------------------------------------------------------------

# The Procfile's processes run under supervisord, which restarts any that exits or is
# killed. scripts/supervisord/configure.sh writes its configuration from the Procfile
# (`honcho export`, template scripts/supervisord/supervisord.conf), numbering PORT per process
# (base + 100 each), so web is the Procfile's first line; .env is already merged into the environment.
# Flower always runs behind basic auth: without FLOWER_BASIC_AUTH, a credential is generated
# once into $ORDERFLOW_VAR_DIR/flower_basic_auth (mode 600) and shown in the ready banner.
# The front door: with nginx installed (install-nginx), the Procfile's `proxy` listens where clients
# connect (WEB_BIND, else 127.0.0.1:PORT; FLOWER_ADDRESS:FLOWER_PORT) and gunicorn and Flower move
# behind it to loopback ports (WEB_BACKEND_PORT, PORT + 1; ORDERFLOW_FLOWER_BACKEND_PORT, FLOWER_PORT + 1).
# Without nginx, or with ORDERFLOW_PROXY=off, gunicorn and Flower serve clients themselves and
# the banner says that this is for the machine's own use (docs/security.md, "The front door").
run: not-running install-nginx migrate collectstatic seed superuser
	@$(LOAD_DOTENV); \
	export PORT="$${PORT:-8000}" FLOWER_PORT="$${FLOWER_PORT:-5555}"; \
	var_dir="$${ORDERFLOW_VAR_DIR:-$(CURDIR)/var}"; \
	flower_login="FLOWER_BASIC_AUTH"; \
	if [ -z "$${FLOWER_BASIC_AUTH:-}" ]; then \
		auth_file="$$var_dir/flower_basic_auth"; \
		if [ ! -s "$$auth_file" ]; then \
			mkdir -p "$$(dirname "$$auth_file")"; \
			(umask 077; $(PY) -c 'import secrets; print("admin:" + secrets.token_urlsafe(16))' > "$$auth_file"); \
		fi; \
		export FLOWER_BASIC_AUTH="$$(cat "$$auth_file")"; \
		flower_login="$$FLOWER_BASIC_AUTH (kept in $$auth_file)"; \
	fi; \
	if [ "$${ORDERFLOW_PROXY:-nginx}" = nginx ] && $(NGINX_FOUND); then \
		export NGINX_LISTEN="$${WEB_BIND:-127.0.0.1:$$PORT}" NGINX_UPSTREAM="127.0.0.1:$${WEB_BACKEND_PORT:-$$((PORT + 1))}"; \
		export WEB_BIND="$$NGINX_UPSTREAM" ORDERFLOW_FLOWER_BACKEND_PORT="$${ORDERFLOW_FLOWER_BACKEND_PORT:-$$((FLOWER_PORT + 1))}"; \
		export NGINX_FLOWER_LISTEN="$${FLOWER_ADDRESS:-127.0.0.1}:$$FLOWER_PORT" NGINX_FLOWER_UPSTREAM="127.0.0.1:$$ORDERFLOW_FLOWER_BACKEND_PORT"; \
		export NUM_PROXIES="$${NUM_PROXIES:-1}"; \
		sh scripts/nginx.sh -t; \
		front_door="nginx $$NGINX_LISTEN -> gunicorn $$NGINX_UPSTREAM (slow clients wait in nginx; Flower read-only)"; \
	else \
		unset NGINX_LISTEN ORDERFLOW_FLOWER_BACKEND_PORT; \
		why="ORDERFLOW_PROXY=$${ORDERFLOW_PROXY:-nginx}"; $(NGINX_FOUND) || why="nginx not installed: make install-nginx as root"; \
		front_door="gunicorn itself, NO proxy: for this machine's own use only ($$why)"; \
	fi; \
	run_dir="$$var_dir/run"; \
	conf="$$(sh scripts/supervisord/configure.sh "$$run_dir" "$$PORT")"; \
	web="http://127.0.0.1:$$PORT"; \
	export ORDERFLOW_READY_BANNER="$$(printf '%s\n' \
		"" \
		"orderflow is ready -- Ctrl-C stops everything" \
		"  home        $$web/" \
		"  admin       $$web/admin/" \
		"  API         $$web/api/   (docs: $$web/api/docs/)" \
		"  health      $$web/healthz   $$web/readyz" \
		"  front door  $$front_door" \
		"  Flower      http://127.0.0.1:$$FLOWER_PORT/   login $$flower_login" \
		"  metrics     http://127.0.0.1:$$((PORT + 90))/metrics (web), :$$((PORT + 190)) orders, :$$((PORT + 290)) inventory, :$$((PORT + 390)) reports, :$$((PORT + 490)) beat" \
		"  processes   make status   (or $(VENV)/bin/supervisorctl -c $$conf status)" \
		"")"; \
	exec $(PY) scripts/supervisord/foreground.py supervisord -n -c "$$conf"

# The processes of a running `make run` (CMD: any supervisorctl command, e.g. CMD="restart worker_inventory").
# Without CMD it fails only when a process other than the one-shot `ready` is not RUNNING.
status:
	@var_dir="$${ORDERFLOW_VAR_DIR:-$(CURDIR)/var}"; \
	test -f "$$var_dir/run/orderflow.conf" || { echo "make status: no make run has started here ($$var_dir/run)" >&2; exit 1; }; \
	if [ -n "$(CMD)" ]; then exec $(VENV)/bin/supervisorctl -c "$$var_dir/run/orderflow.conf" $(CMD); fi; \
	out="$$($(VENV)/bin/supervisorctl -c "$$var_dir/run/orderflow.conf" status)" || true; \
	echo "$$out"; \
	! echo "$$out" | grep -v '^ready ' | grep -qv ' RUNNING '

# make run refuses to start a second stack on the same var/ (it would take over the first's control socket).
not-running:
	@pidfile="$${ORDERFLOW_VAR_DIR:-$(CURDIR)/var}/run/supervisord.pid"; \
	if [ -s "$$pidfile" ] && kill -0 "$$(cat "$$pidfile")" 2>/dev/null; then \
		echo "make run: already running here (supervisord pid $$(cat "$$pidfile")); make status shows it, Ctrl-C in its terminal stops it" >&2; \
		exit 1; \
	fi

# var/test keeps the test database and broker folders away from a running `make run`.
test: install-dev
	ORDERFLOW_VAR_DIR=$(CURDIR)/var/test $(PY) -m pytest $(PYTEST_ARGS)

# The documentation site (mkdocs.yml, docs/) into site/; --strict: a broken link
# or a page missing from the nav fails the build.
# NO_MKDOCS_2_WARNING: Material 9.x prints a banner about its end of life (May 2027;
# docs/development.md says what follows it) on every build.
docs: install-docs
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir site

# The benchmark app is installed only here (ORDERFLOW_BENCH=1, project/settings.py). With
# --spawn it starts its own workers in a database and broker of its own; without, it uses the
# running workers (make run) and deletes what it made afterwards. `bench_orders --help` lists ARGS.
ARGS ?= --spawn
bench: install-bench
	ORDERFLOW_BENCH=1 $(PY) manage.py bench_orders $(ARGS)

# The browser tests (tests/browser/, skipped without it) drive Debian's Chromium
# through Playwright, which never downloads a browser of its own.
browser-deps:
	@if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ] && [ -x /usr/bin/faketime ]; then \
		echo "browser-deps: $$(/usr/bin/chromium --version 2>/dev/null), chromedriver and faketime are installed"; \
	elif [ "$$(id -u)" = 0 ]; then \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver faketime; \
	else \
		echo "browser-deps: not root; install Debian's chromium, chromium-driver and faketime packages:"; \
		echo "    sudo apt-get update && sudo apt-get install -y chromium chromium-driver faketime"; \
		echo "browser-deps: until then the browser tests and the clock-skew drill are skipped"; \
	fi

lint: install-dev
	@status=0; \
	$(VENV)/bin/ruff check . || status=1; \
	$(VENV)/bin/ruff format --check . || status=1; \
	$(VENV)/bin/lint-imports --no-cache || status=1; \
	exit $$status

format: install-dev
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# --- cleaning ---------------------------------------------------------------------

clean:
	rm -rf var site .pytest_cache .ruff_cache
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
