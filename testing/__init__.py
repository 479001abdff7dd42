"""The test machinery: real worker processes, quiesce, teardown and fault injection (a pytest plugin).

`testing.workers` supervises the processes (the benchmark in bench/ uses it
too); `testing.plugin` is the pytest plugin built on it (`-p testing.plugin`
in pyproject.toml): the `workers`, `no_workers` and `sweeper` fixtures, and
every database for every database test; `testing.messages` signs and checks
task messages as orderflow's own code does.
"""

from testing.messages import proved, signed
from testing.workers import (
    BASE_DIR,
    SWEEP_TIMEOUT_SECONDS,
    SupervisionFailed,
    Workers,
    purge_queues,
    quiesce,
    terminate,
    wait_for,
)

__all__ = [
    "BASE_DIR",
    "SWEEP_TIMEOUT_SECONDS",
    "SupervisionFailed",
    "Workers",
    "proved",
    "purge_queues",
    "quiesce",
    "signed",
    "terminate",
    "wait_for",
]
