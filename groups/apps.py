from django.apps import AppConfig


class GroupsConfig(AppConfig):
    name = "groups"
    verbose_name = "Consumer groups"

    def ready(self) -> None:
        from . import receivers  # noqa: F401  (services leaving remove their memberships)
