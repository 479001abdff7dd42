"""Why an order was cancelled, as a class: CancelledOrder.cause, and the two causes an order collects meanwhile.

Records written before have only their reason in words: each is classified from
it once, by the texts orderflow wrote (orders.services, project.saga), the same
rule `orders.services._cancel_cause` falls back on for a message without a cause
(one published by a worker of the version before).
"""

from django.db import migrations, models

CHOICES = [
    ("refused", "refused by a service"),
    ("user", "cancelled by a user"),
    ("deadline", "deadline passed"),
    ("infrastructure", "a step failed (not a refusal)"),
]


def classify(apps, schema_editor):
    CancelledOrder = apps.get_model("orders", "CancelledOrder")
    db = schema_editor.connection.alias
    rows = CancelledOrder.objects.using(db)
    rows.filter(reason__startswith="cancelled by ").update(cause="user")
    rows.filter(cause="", reason__startswith="order deadline passed").update(cause="deadline")
    # A fault that was not a refusal: project.saga.SagaStep wrote "<task name> failed: <error>".
    rows.filter(cause="", reason__regex=r"^[a-z_]+\.[a-z_]+ failed: ").update(cause="infrastructure")
    # The rest is a service's refusal in its own words (insufficient stock, an unknown product).
    rows.filter(cause="").update(cause="refused")


class Migration(migrations.Migration):
    dependencies = [
        ("orders", "0007_sweep_lease"),
    ]

    operations = [
        migrations.AddField(
            model_name="order",
            name="cancel_cause",
            field=models.CharField(blank=True, choices=CHOICES, max_length=16),
        ),
        migrations.AddField(
            model_name="order",
            name="failure_cause",
            field=models.CharField(blank=True, choices=CHOICES, max_length=16),
        ),
        migrations.AddField(
            model_name="cancelledorder",
            name="cause",
            field=models.CharField(choices=CHOICES, default="", max_length=16),
            preserve_default=False,
        ),
        migrations.RunPython(classify, migrations.RunPython.noop),
    ]
