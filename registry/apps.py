from django.apps import AppConfig


class RegistryConfig(AppConfig):
    name = "registry"
    verbose_name = "Service registry"

    def ready(self) -> None:
        from . import signals  # noqa: F401  (token cache invalidation)
