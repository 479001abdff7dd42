"""The benchmark's one table: the floor's chains (`bench_orders --baseline`)."""

from django.db import models


class BenchFloorChain(models.Model):
    """One chain of the floor: three trivial tasks, one per service queue (bench/tasks.py).

    Each commits one UPDATE of its chain's row; the last one stamps `done_at`,
    so the floor's latency is measured like the saga's.
    """

    steps = models.PositiveSmallIntegerField(default=0)
    done_at = models.DateTimeField(null=True, blank=True)

    def __str__(self) -> str:
        return f"floor chain {self.pk}: {self.steps} steps"
