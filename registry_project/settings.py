"""Settings for conveyor-registry, driven by environment variables (see README's configuration table).

Development defaults are safe and embedded: SQLite in ``var/`` and the Redis server that
``make run`` starts on a unix socket in ``var/``. Production sets DATABASE_URL, REDIS_URL,
REDLOCK_URLS, SECRET_KEY and ALLOWED_HOSTS.
"""

import secrets
from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

from .env import env_bool, env_int, env_list, env_str

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = Path(env_str("REGISTRY_VAR_DIR", str(BASE_DIR / "var")))

DEBUG = env_bool("DEBUG", False)


def _secret_key() -> str:
    """SECRET_KEY from the environment, else from SECRET_KEY_FILE (``make run`` writes var/secret_key).

    There is no built-in default: a key committed here would be public. Only with DEBUG on does a
    missing key fall back to a random one for this process.
    """
    key = env_str("SECRET_KEY", "").strip()
    if key:
        return key
    path = Path(env_str("SECRET_KEY_FILE", str(VAR_DIR / "secret_key")))
    if path.is_file():
        key = path.read_text().strip()
        if key:
            return key
    if DEBUG:
        return secrets.token_urlsafe(50)
    raise ImproperlyConfigured(
        "SECRET_KEY is not set. Export SECRET_KEY=<a long random string> (for example the output of "
        "`python3 -c 'import secrets; print(secrets.token_urlsafe(50))'`), or put one in "
        f"SECRET_KEY_FILE (default {path}; `make run` creates it for development)."
    )


SECRET_KEY = _secret_key()
ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", ["127.0.0.1", "localhost", "[::1]", "testserver"])
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS", [])

# Behind a TLS-terminating proxy (README, "Running behind a TLS proxy"). The defaults suit plain
# HTTP on 127.0.0.1; each of these is what `manage.py check --deploy` asks about.
if env_bool("SECURE_PROXY_SSL_HEADER", False):
    # Trust the proxy's X-Forwarded-Proto: only when every request comes through that proxy.
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
SECURE_SSL_REDIRECT = env_bool("SECURE_SSL_REDIRECT", False)
# Probes and metrics are scraped over plain HTTP from inside the network.
SECURE_REDIRECT_EXEMPT = [r"^healthz$", r"^readyz$", r"^metrics$"]
SESSION_COOKIE_SECURE = env_bool("SESSION_COOKIE_SECURE", False)
CSRF_COOKIE_SECURE = env_bool("CSRF_COOKIE_SECURE", False)
SECURE_HSTS_SECONDS = env_int("SECURE_HSTS_SECONDS", 0, minimum=0, maximum=63_072_000)
SECURE_HSTS_INCLUDE_SUBDOMAINS = env_bool("SECURE_HSTS_INCLUDE_SUBDOMAINS", False)
SECURE_HSTS_PRELOAD = env_bool("SECURE_HSTS_PRELOAD", False)

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "django_celery_beat",
    "channels",
    "registry",
    "groups",
    "balancer",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "registry.lifecycle.OperatorMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "registry_project.urls"
ASGI_APPLICATION = "registry_project.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

DATABASE_URL = env_str("DATABASE_URL", f"sqlite:///{VAR_DIR / 'registry.sqlite3'}")
# Each server process serves Django requests on a fixed pool of this many threads
# (registry_project.handler), each keeping its database connection from one request to the next:
# no connect, no SQLite PRAGMAs, no pool checkout per request. 0: Django's thread per request, with a
# connection per request (PostgreSQL then takes them from a pool of DATABASE_POOL_SIZE).
REGISTRY_REQUEST_THREADS = env_int("REGISTRY_REQUEST_THREADS", 8, minimum=0, maximum=256)
try:
    _db = dj_database_url.parse(
        DATABASE_URL,
        conn_max_age=600 if REGISTRY_REQUEST_THREADS else 0,
        # A reused connection is checked before its first query in each request (a database restart
        # costs a reconnect, not an error).
        conn_health_checks=bool(REGISTRY_REQUEST_THREADS),
    )
except ValueError as exc:
    raise ImproperlyConfigured(f"DATABASE_URL is not a valid database URL: {exc}") from None
if _db["ENGINE"] == "django.db.backends.postgresql" and not REGISTRY_REQUEST_THREADS:
    _db.setdefault("OPTIONS", {})["pool"] = {
        "min_size": 1,
        "max_size": env_int("DATABASE_POOL_SIZE", 10, minimum=1, maximum=1000),
        "timeout": 10,
    }
if _db["ENGINE"] == "django.db.backends.sqlite3":
    # IMMEDIATE makes every atomic block take SQLite's write lock up front, so a
    # read-then-write transaction cannot interleave with another writer (SQLite's
    # stand-in for SELECT ... FOR UPDATE). WAL lets readers run beside the writer.
    _db["OPTIONS"] = {
        "transaction_mode": "IMMEDIATE",
        "timeout": 20,
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
    }
    _db.setdefault("TEST", {})["NAME"] = str(VAR_DIR / "test-registry.sqlite3")
DATABASES = {"default": _db}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# Redis holds lease deadlines (the heartbeat hot path), counters, the Celery broker
# and, later, the channel layer. Unset: the embedded server `make run` starts.
REDIS_URL = env_str("REDIS_URL", f"unix://{VAR_DIR / 'redis.sock'}")
REDLOCK_URLS = env_list("REDLOCK_URLS", [REDIS_URL])
REGISTRY_REDIS_PREFIX = env_str("REGISTRY_REDIS_PREFIX", "conveyor:")
# How long one Redis command may take before the request answers 503 (and the outage is noted).
REDIS_SOCKET_TIMEOUT_MS = env_int("REDIS_SOCKET_TIMEOUT_MS", 5000, minimum=10, maximum=60_000)
REGISTRY_LEADER_TTL_MS = env_int("REGISTRY_LEADER_TTL_MS", 10_000, minimum=100, maximum=600_000)
REGISTRY_LEADER_NODE_TIMEOUT_MS = env_int("REGISTRY_LEADER_NODE_TIMEOUT_MS", 100, minimum=1, maximum=10_000)
# A leader job starts only with at least this share (in percent) of its lock's validity left: it
# renews first, and skips the run if it cannot, rather than start a job it may not finish in time.
REGISTRY_LEADER_MIN_VALIDITY_PERCENT = env_int("REGISTRY_LEADER_MIN_VALIDITY_PERCENT", 50, minimum=1, maximum=90)
# The member-expiry job claims the lapsed sessions it is about to remove; no heartbeat renews a claimed
# session (it waits for the job's group lock and the database decides). A claim older than this is
# ignored, so a job that died mid-way blocks renewals no longer: longer than any expiry transaction.
REGISTRY_SESSION_CLAIM_SECONDS = env_int("REGISTRY_SESSION_CLAIM_SECONDS", 60, minimum=1, maximum=3600)


# Websocket push: Redis pub/sub (registry_project.layer). A group_send is one PUBLISH; each server process
# subscribes once per group its sockets follow and fans each message out to them itself, decoded once,
# with the JSON encoded once by the publisher. No per-channel queues to fill and no Redis subscription
# per socket. What pub/sub gives up: a message published while a process is disconnected from Redis (or
# across a Redis restart) is lost, never replayed. That is acceptable here because every stream sends
# its current state first on (re)connect and every message carries a generation or revision for the
# client to order by.
CHANNEL_LAYERS = {
    "default": {
        "BACKEND": "registry_project.layer.FanoutChannelLayer",
        "CONFIG": {"hosts": [{"address": REDIS_URL}], "prefix": REGISTRY_REDIS_PREFIX + "ws"},
    }
}


def _kombu_url(url: str) -> str:
    # kombu spells a unix-socket Redis URL redis+socket://
    return "redis+socket://" + url[len("unix://") :] if url.startswith("unix://") else url


CELERY_BROKER_URL = env_str("CELERY_BROKER_URL", _kombu_url(REDIS_URL))
CELERY_TASK_IGNORE_RESULT = True
CELERY_BEAT_SCHEDULER = "django_celery_beat.schedulers:DatabaseScheduler"
CELERY_TIMEZONE = "UTC"
CELERY_WORKER_HIJACK_ROOT_LOGGER = False
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True

# Registry behaviour.
REGISTRY_DEFAULT_LEASE = env_int("REGISTRY_DEFAULT_LEASE", 30, minimum=1, maximum=3600)
REGISTRY_DEREGISTER_AFTER = env_int("REGISTRY_DEREGISTER_AFTER", 60, minimum=0, maximum=86400)
REGISTRY_CLEANUP_BATCH = env_int("REGISTRY_CLEANUP_BATCH", 500, minimum=1, maximum=100000)
# Days the service lifecycle log (registry.lifecycle) is kept; the leader's prune job forgets older rows.
REGISTRY_HISTORY_DAYS = env_int("REGISTRY_HISTORY_DAYS", 14, minimum=1, maximum=3650)
REGISTRY_HISTORY_PRUNE_BATCH = env_int("REGISTRY_HISTORY_PRUNE_BATCH", 5000, minimum=1, maximum=1_000_000)
REGISTRY_DEFAULT_PARTITIONS = env_int("REGISTRY_DEFAULT_PARTITIONS", 12, minimum=1, maximum=10000)
# The admin overview flags a group reconciling (revocations unconfirmed) for longer than this.
REGISTRY_RECONCILING_ALERT_SECONDS = env_int("REGISTRY_RECONCILING_ALERT_SECONDS", 60, minimum=1, maximum=86400)

# Quotas of the groups app (groups/quotas.py): a request past one is a 400 naming the field and the
# setting, and nothing is written. 10000 partitions and 100 topics per join are also hard ceilings.
REGISTRY_MAX_PARTITIONS_PER_TOPIC = env_int("REGISTRY_MAX_PARTITIONS_PER_TOPIC", 10000, minimum=1, maximum=10000)
REGISTRY_MAX_TOPICS_PER_JOIN = env_int("REGISTRY_MAX_TOPICS_PER_JOIN", 64, minimum=1, maximum=100)
REGISTRY_MAX_MEMBERS_PER_GROUP = env_int("REGISTRY_MAX_MEMBERS_PER_GROUP", 1000, minimum=1, maximum=100000)
if REGISTRY_DEFAULT_PARTITIONS > REGISTRY_MAX_PARTITIONS_PER_TOPIC:
    raise ImproperlyConfigured(
        f"REGISTRY_DEFAULT_PARTITIONS ({REGISTRY_DEFAULT_PARTITIONS}) must not exceed "
        f"REGISTRY_MAX_PARTITIONS_PER_TOPIC ({REGISTRY_MAX_PARTITIONS_PER_TOPIC})"
    )

# Limits on what a client may send (registry_project/limits.py), checked before the work: a larger
# request body is refused with 413 before it is read, a larger websocket message closes the socket
# with 1009. The heartbeat fast path keeps its own, smaller cap (64 KiB).
REGISTRY_MAX_BODY_BYTES = env_int("REGISTRY_MAX_BODY_BYTES", 1024 * 1024, minimum=1024, maximum=1024**3)
REGISTRY_MAX_WS_MESSAGE_BYTES = env_int("REGISTRY_MAX_WS_MESSAGE_BYTES", 64 * 1024, minimum=1024, maximum=16 * 1024**2)
# Django refuses a larger form or body itself (a 400) after reading it; keep it in step with the cap.
DATA_UPLOAD_MAX_MEMORY_SIZE = REGISTRY_MAX_BODY_BYTES


def _rate(name: str) -> tuple[int, int] | None:
    """A throttle rate "N/second|minute|hour|day" (or s, min, m, h, d) as (requests, seconds); unset: off."""
    raw = env_str(name, "").strip()
    if not raw:
        return None
    count, _, unit = raw.partition("/")
    seconds = {"s": 1, "sec": 1, "second": 1, "m": 60, "min": 60, "minute": 60, "h": 3600, "hour": 3600}
    seconds |= {"d": 86400, "day": 86400}
    unit = unit.strip().lower()
    if not (count.isascii() and count.isdigit() and 0 < len(count) < 10 and int(count) > 0 and unit in seconds):
        raise ImproperlyConfigured(f"{name} must look like 100/second, 6000/minute or 50000/day, got {raw!r}")
    return int(count), seconds[unit]


# Optional per-token request rates of the REST API (429 with Retry-After past them), counted in Redis
# so every server process shares them. Off unless set. Heartbeats on the fast path are not throttled.
REGISTRY_THROTTLE_RATE = _rate("REGISTRY_THROTTLE_RATE")

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = VAR_DIR / "static"

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": ["registry.auth.BearerTokenAuthentication"],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_PAGINATION_CLASS": "registry.pagination.RegistryPagination",
    "DEFAULT_SCHEMA_CLASS": "registry.schema.ConveyorAutoSchema",
    "TEST_REQUEST_DEFAULT_FORMAT": "json",
    "DEFAULT_RENDERER_CLASSES": [
        "rest_framework.renderers.JSONRenderer",
        "rest_framework.renderers.BrowsableAPIRenderer",
    ],
    "UNAUTHENTICATED_USER": None,
    "EXCEPTION_HANDLER": "registry.exceptions.api_exception_handler",
    # ASCII output: a 400 that echoes a lone surrogate it refused must still be encodable (as \ud800);
    # with UNICODE_JSON the renderer's UTF-8 encode fails and the answer becomes a 500.
    "UNICODE_JSON": False,
    # JSON only, as the API promises: a form-encoded body cannot carry labels or topic lists, and a
    # schema that offered it would invite clients to try (415 for anything else).
    "DEFAULT_PARSER_CLASSES": ["registry_project.limits.BoundedJSONParser"],
    "DEFAULT_THROTTLE_CLASSES": ["registry_project.limits.TokenRateThrottle"],
}

SPECTACULAR_SETTINGS = {
    "TITLE": "conveyor-registry API",
    "DESCRIPTION": "Service registry and consumer-group coordinator for data-pipeline services.",
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    "SERVE_AUTHENTICATION": [],
    "SERVE_PERMISSIONS": ["rest_framework.permissions.AllowAny"],
    # Separate request and response components, so read-only response fields are never
    # required in request bodies of a generated client.
    "COMPONENT_SPLIT_REQUEST": True,
    "POSTPROCESSING_HOOKS": ["drf_spectacular.hooks.postprocess_schema_enums", "registry.schema.postprocess"],
}

# Every log record is scrubbed of query strings and API keys (registry_project.logscrub).
LOGGING_CONFIG = "registry_project.logscrub.configure"
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": env_str("LOG_LEVEL", "INFO")},
    # Beat sends a job every few seconds; its per-task lines would drown everything else.
    "loggers": {
        "celery": {"level": env_str("CELERY_LOG_LEVEL", "WARNING")},
        # Django's own logger (request warnings: every 4xx) follows LOG_LEVEL; its default handlers
        # (console only with DEBUG, mail to ADMINS) give way to the root's.
        "django": {"level": env_str("LOG_LEVEL", "INFO"), "handlers": [], "propagate": True},
    },
}
