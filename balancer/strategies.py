"""The balancing strategies, shared with the client library: the server and a client's local balancer run
the same module (``conveyor.strategies``, installed from ./client by requirements.txt), so a local
selection and the select endpoint can never disagree on eligibility or order."""

from conveyor.strategies import (  # noqa: F401
    DEGRADED,
    HEALTHY,
    STRATEGIES,
    Eligible,
    Instance,
    LoadBalancer,
    NoHealthyInstance,
    eligible,
    random_weighted,
    rendezvous,
    round_robin,
    smooth_weighted,
)
