from django.apps import AppConfig


class BalancerConfig(AppConfig):
    name = "balancer"
    verbose_name = "Load balancer"
