"""The service registry: services, leases, health, label selectors and API tokens."""
