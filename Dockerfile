# One image for every orderflow process: web, the workers, beat, Flower and the
# one-shot migrate service (docker-compose.yml picks the command).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DJANGO_SETTINGS_MODULE=project.settings

WORKDIR /app

# The runtime set only (requirements.txt): the test, lint, bench and docs tools
# live in requirements-{dev,bench,docs}.txt and never reach the image.
# psycopg2-binary is a prebuilt wheel: no libpq or compiler in the image.
COPY requirements.txt ./
RUN pip install -r requirements.txt

COPY . .

# Static files are collected at build time and served by whitenoise (nginx buffers them). The
# throwaway SECRET_KEY and in-memory broker keep settings from writing a
# secret or broker folders into the image.
RUN SECRET_KEY=collectstatic-only CELERY_BROKER_URL=memory:// python manage.py collectstatic --noinput --verbosity 0 \
    && useradd --system --uid 10001 --home-dir /app --no-create-home orderflow \
    && mkdir -p /app/var \
    && chown -R orderflow:orderflow /app/var

# var/ holds what a process writes at run time (beat's schedule file).
USER orderflow

# gunicorn serves the proxy (docker-compose.yml's `proxy`, nginx), never clients directly.
EXPOSE 8000
CMD ["gunicorn", "project.wsgi", "--bind", "0.0.0.0:8000", "--threads", "4", "--access-logfile", "-", "--error-logfile", "-", "--no-control-socket"]
