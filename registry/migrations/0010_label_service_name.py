"""Label rows carry their service's name, and the covering label index is (key, value, name, service), so a
selector's key=value pair is an index range in the service list's order (it replaces the (key, value,
service) one)."""

from typing import Any

from django.db import migrations, models
from django.db.models import OuterRef, Subquery


def copy_names(apps: Any, schema_editor: Any) -> None:
    Service = apps.get_model("registry", "Service")
    ServiceLabel = apps.get_model("registry", "ServiceLabel")
    name = Service.objects.filter(pk=OuterRef("service_id")).values("service_name")[:1]
    ServiceLabel.objects.using(schema_editor.connection.alias).update(service_name=Subquery(name))


class Migration(migrations.Migration):
    dependencies = [
        ("registry", "0009_query_indexes"),
    ]

    operations = [
        migrations.AddField(
            model_name="servicelabel",
            name="service_name",
            field=models.CharField(default="", max_length=128),
            preserve_default=False,
        ),
        migrations.RunPython(copy_names, migrations.RunPython.noop, elidable=True),
        migrations.AddIndex(
            model_name="servicelabel",
            index=models.Index(fields=["key", "value", "service_name", "service"], name="label_pair_in_list_order"),
        ),
        migrations.RemoveIndex(
            model_name="servicelabel",
            name="label_key_value_service",
        ),
    ]
