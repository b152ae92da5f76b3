"""ASGI entry point. HTTP: the fast paths (balancer select, heartbeats, unchanged re-registrations,
remembered service list pages),
then the request body cap, then static files, then Django. Websockets: origin check, token auth, then
the Channels consumers of registry_project.routing."""

import gc
import os
import sys

import django

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "registry_project.settings")
django.setup(set_prefix=False)

from registry_project.handler import SyncChainASGIHandler  # noqa: E402

django_asgi_app = SyncChainASGIHandler()

from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402  (needs Django set up first)
from django.contrib.staticfiles.handlers import ASGIStaticFilesHandler  # noqa: E402

from balancer.fastpath import SelectFastPath  # noqa: E402
from registry.fast_register import UnchangedRegistrationFastPath  # noqa: E402
from registry.fastpath import HeartbeatFastPath  # noqa: E402
from registry.list_fastpath import ServiceListFastPath  # noqa: E402
from registry.ws_auth import OriginCheck, TokenAuthMiddleware  # noqa: E402
from registry_project.limits import BodyLimit  # noqa: E402
from registry_project.routing import websocket_urlpatterns  # noqa: E402

# Static files (admin, API docs) are served from the installed apps, so the docs and the
# admin work offline with no collectstatic step. The body cap sits behind the fast path, which
# has a smaller cap of its own, so a heartbeat pays for neither twice.
application = ProtocolTypeRouter(
    {
        "http": SelectFastPath(
            HeartbeatFastPath(
                UnchangedRegistrationFastPath(
                    ServiceListFastPath(
                        BodyLimit(ASGIStaticFilesHandler(django_asgi_app)), run_sync=django_asgi_app.run_sync
                    )
                )
            )
        ),
        "websocket": OriginCheck(TokenAuthMiddleware(URLRouter(websocket_urlpatterns))),
    }
)

# Everything loaded so far lives as long as the process: keep it out of the cyclic GC's
# full collections, which otherwise stall the event loop for tens of milliseconds.
gc.freeze()

# Each Django request hops between the event loop thread and a worker thread; under load a thread
# waiting for the GIL waits up to the switch interval (5 ms by default) at every hop.
sys.setswitchinterval(0.0005)
