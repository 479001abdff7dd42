#!/usr/bin/env bash
# The runs behind docs/performance.md: every configuration RUNS times (round-robin),
# each run one `bench_orders --spawn --baseline --json` (workers, and gunicorn for --via api,
# started and stopped by the bench), JSON documents written to $OUT.
#
#   scripts/bench_matrix.sh postgres   # DATABASE_URL / CELERY_BROKER_URL must point at PostgreSQL + RabbitMQ;
#                                      # the bench uses <db>_bench (created) and the vhost <vhost>_bench (create it:
#                                      # rabbitmqctl add_vhost ...; set_permissions), see bench/isolation.py
#   scripts/bench_matrix.sh embedded   # SQLite + filesystem broker under $ORDERFLOW_VAR_DIR
#   scripts/bench_matrix.sh overhead   # PostgreSQL + RabbitMQ as above: the API burst with metrics off, on, and
#                                      # on with tracing (docs/performance.md, "What metrics and tracing cost");
#                                      # each metrics run's scraped samples go to $OUT/samples/
#
# ONLY=regex runs only the configurations whose name matches; RUNS=n runs each n times (3).
# Then: .venv/bin/python scripts/plot_bench.py $OUT/postgres-*.json -o docs/img/bench-postgres.png
set -euo pipefail
cd "$(dirname "$0")/.."
SHAPE=${1:?postgres or embedded}
RUNS=${RUNS:-3}
OUT=${OUT:-var/bench-results}
PY=${PY:-.venv/bin/python}
mkdir -p "$OUT"

CONFIGS=()
config() {  # name, then bench_orders arguments
    local name=$1
    [[ "$name" =~ ${ONLY:-.} ]] || return 0
    CONFIGS+=("$*")
}

if [ "$SHAPE" = postgres ]; then
    config service-burst --via service --orders 1000 --concurrency 16
    config api-burst --via api --orders 1000 --concurrency 16
    config service-rate50 --via service --orders 500 --concurrency 16 --rate 50
    config api-rate50 --via api --orders 500 --concurrency 16 --rate 50
    config service-rate25 --via service --orders 250 --concurrency 16 --rate 25
    config service-rate100 --via service --orders 800 --concurrency 16 --rate 100
    config service-burst-threads --via service --orders 1000 --concurrency 16 --worker-pool threads --worker-concurrency 4
    # The workload of the first three sessions: every refusal at the end of the run.
    config service-burst-last --via service --orders 1000 --concurrency 16 --refusals last
    config service-rate50-last --via service --orders 500 --concurrency 16 --rate 50 --refusals last
    config api-rate50-last --via api --orders 500 --concurrency 16 --rate 50 --refusals last
elif [ "$SHAPE" = overhead ]; then
    # The API: the web's own metrics and spans (django-prometheus, the POST's trace) are in the path.
    config api-burst-off --via api --orders 1000 --concurrency 16
    config api-burst-metrics --via api --orders 1000 --concurrency 16 --metrics
    config api-burst-tracing --via api --orders 1000 --concurrency 16 --metrics --tracing
    # Scraped at deploy/prometheus/prometheus.yml's interval rather than every second (ONLY='off|15s').
    config api-burst-metrics-15s --via api --orders 1000 --concurrency 16 --metrics --scrape-interval 15
    # The same with django-prometheus's database engines (METRICS_DATABASE=1, project/settings.py; off by default).
    config api-burst-metrics-15s-db METRICS_DATABASE=1 --via api --orders 1000 --concurrency 16 --metrics --scrape-interval 15
else
    config service-burst --via service --orders 500 --concurrency 16
    config api-burst --via api --orders 500 --concurrency 16
    config service-rate25 --via service --orders 250 --concurrency 16 --rate 25
    config service-rate50 --via service --orders 500 --concurrency 16 --rate 50
fi

# bench_orders exists only where the bench app is installed (project/settings.py). --spawn runs
# each in a database and broker of its own (names derived from the configured ones), emptied at
# the end of every run, so every configuration starts from the same tables.
export ORDERFLOW_BENCH=1

# Round-robin: run 1 of every configuration, then run 2 of every one, ... so a
# stretch of a busier machine spreads over all of them instead of spoiling one;
# every other round in reverse, so no configuration always runs first or last.
for run in $(seq 1 "$RUNS"); do
    order=("${CONFIGS[@]}")
    if [ $((run % 2)) = 0 ]; then
        order=()
        for ((k = ${#CONFIGS[@]} - 1; k >= 0; k--)); do order+=("${CONFIGS[$k]}"); done
    fi
    for entry in "${order[@]}"; do
        read -r -a args <<<"$entry"
        name=${args[0]}
        args=("${args[@]:1}")
        # Leading VAR=value words: the environment of this configuration's run (and the processes it starts).
        envs=()
        while [[ ${#args[@]} -gt 0 && ${args[0]} =~ ^[A-Z_]+= ]]; do
            envs+=("${args[0]}")
            args=("${args[@]:1}")
        done
        extra=()
        if [[ " ${args[*]} " == *" --metrics "* ]]; then
            mkdir -p "$OUT/samples"
            extra=(--metrics-out "$OUT/samples/$SHAPE-$name-$run.json")
        fi
        env "${envs[@]}" "$PY" manage.py bench_orders --spawn --baseline --json "${args[@]}" "${extra[@]}" \
            > "$OUT/$SHAPE-$name-$run.json" 2> "$OUT/$SHAPE-$name-$run.log" \
            || echo "run $SHAPE-$name-$run FAILED (see $OUT/$SHAPE-$name-$run.log)" >&2
    done
done
