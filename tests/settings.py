"""Settings of the test suite: the project's own, with a SECRET_KEY of the suite's.

The project refuses to start without SECRET_KEY (DEBUG off); the suite sets a random one in the
environment before the settings load, so the server processes tests start inherit it.
"""

import os
import secrets

os.environ.setdefault("SECRET_KEY", "test-suite-" + secrets.token_urlsafe(32))

from registry_project.settings import *  # noqa: F403
