"""The benchmark (`manage.py bench_orders`): load the real pipeline with orders, measured against a floor.

A tool, not a service: it is installed only where a benchmark runs
(ORDERFLOW_BENCH=1, see project/settings.py), so its table and its floor
tasks never reach a production database or worker.
"""
