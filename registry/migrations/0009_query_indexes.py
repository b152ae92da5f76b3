"""Indexes for the service list: its order (name, id) and a covering (key, value, service) label index
that answers a selector's key=value pair from the index alone (it replaces the (key, value) one)."""

from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("registry", "0008_history_prune_schedule"),
    ]

    operations = [
        migrations.AddIndex(
            model_name="servicelabel",
            index=models.Index(fields=["key", "value", "service"], name="label_key_value_service"),
        ),
        migrations.RemoveIndex(
            model_name="servicelabel",
            name="label_key_value",
        ),
        migrations.AddIndex(
            model_name="service",
            index=models.Index(fields=["service_name", "service_id"], name="service_name_id"),
        ),
    ]
