"""ReClo settings: one module, configured from the environment.

Local defaults need nothing installed: SQLite and a file-system Celery broker
under ``var/``, a generated secret key, DEBUG off. Production sets
``DATABASE_URL``, ``REDIS_URL``, ``SECRET_KEY``, ``ALLOWED_HOSTS`` and
``RECLO_HTTPS=true`` (see the README).
"""

import base64
import secrets
from datetime import timedelta
from pathlib import Path

import environ
from celery.schedules import crontab
from csp.constants import NONCE, NONE, SELF

from reclo_site.files import private_dir, private_file

BASE_DIR = Path(__file__).resolve().parent.parent

env = environ.Env()
environ.Env.read_env(BASE_DIR / ".env")  # optional; never committed

# Local state (the SQLite database with its live sessions, keys, the broker):
# readable by this user only.
VAR_DIR = private_dir(Path(env("RECLO_VAR_DIR", default=str(BASE_DIR / "var"))))


def _local_secret_key() -> str:
    """A key generated once into var/ so local runs need no configuration."""
    path = VAR_DIR / "secret_key"
    if not path.exists():
        path.touch(mode=0o600)
        path.write_text(secrets.token_urlsafe(50))
    return path.read_text().strip()


SECRET_KEY = env("SECRET_KEY", default=None) or _local_secret_key()
DEBUG = env.bool("DEBUG", default=False)
ALLOWED_HOSTS = env.list("ALLOWED_HOSTS", default=["127.0.0.1", "localhost", "testserver"])
CSRF_TRUSTED_ORIGINS = env.list("CSRF_TRUSTED_ORIGINS", default=[])

# The portal's public address, shown in agent instructions.
SITE_URL = env("SITE_URL", default="http://127.0.0.1:8000")

INSTALLED_APPS = [
    # Django's admin on ReClo's own site: the portal's login, limits and second factor.
    "accounts.apps.RecloAdminConfig",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "whitenoise.runserver_nostatic",
    "django.contrib.staticfiles",
    "django.contrib.humanize",
    "csp",
    "django_otp",
    "django_otp.plugins.otp_totp",
    "django_otp.plugins.otp_static",
    "rest_framework",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "reclo_site",
    "accounts",
    "backups",
    "recovery",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "reclo_site.middleware.RequestIdMiddleware",
    "csp.middleware.CSPMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    # request.user.is_verified(): whether this session passed the second factor.
    "django_otp.middleware.OTPMiddleware",
    "reclo_site.middleware.LocalTimeMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "reclo_site.urls"
WSGI_APPLICATION = "reclo_site.wsgi.application"

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
                "csp.context_processors.nonce",
            ],
        },
    },
]

DATABASES = {
    "default": env.db("DATABASE_URL", default=f"sqlite:///{VAR_DIR / 'db.sqlite3'}"),
}
_sqlite = Path(str(DATABASES["default"]["NAME"])) if "sqlite" in DATABASES["default"]["ENGINE"] else None
if _sqlite and _sqlite.name not in ("", ":memory:") and _sqlite.parent.is_dir():
    # It holds sessions and token hashes: 0600, not the umask's 0644.
    private_file(_sqlite)
DATABASES["default"]["CONN_MAX_AGE"] = env.int("CONN_MAX_AGE", default=60)
DATABASES["default"]["CONN_HEALTH_CHECKS"] = True
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

REDIS_URL = env("REDIS_URL", default="")

# The cache holds login-throttle counters, so it must be shared by every
# process: Redis when configured, else files under var/.
if REDIS_URL:
    CACHES = {"default": {"BACKEND": "reclo_site.cache.RedisCache", "LOCATION": REDIS_URL}}
else:
    CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.filebased.FileBasedCache",
            "LOCATION": str(VAR_DIR / "cache"),
        }
    }

AUTH_USER_MODEL = "accounts.User"
LOGIN_URL = "accounts:login"
LOGIN_REDIRECT_URL = "backups:dashboard"
LOGOUT_REDIRECT_URL = "accounts:login"

PASSWORD_HASHERS = [
    "django.contrib.auth.hashers.Argon2PasswordHasher",
    "django.contrib.auth.hashers.PBKDF2PasswordHasher",
]
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator", "OPTIONS": {"min_length": 12}},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

# Browser sessions end after 12 hours; agent tokens have their own 60 days.
SESSION_COOKIE_AGE = 12 * 60 * 60
SESSION_COOKIE_HTTPONLY = True
SESSION_COOKIE_SAMESITE = "Lax"
CSRF_COOKIE_SAMESITE = "Lax"
X_FRAME_OPTIONS = "DENY"
SECURE_CROSS_ORIGIN_OPENER_POLICY = "same-origin"
# Scripts only from our own static files or carrying the request's nonce;
# nothing from other origins, no framing.
CONTENT_SECURITY_POLICY = {
    "DIRECTIVES": {
        "default-src": [SELF],
        "script-src": [SELF, NONCE],
        "style-src": [SELF],
        "img-src": [SELF, "data:"],
        "connect-src": [SELF],
        "font-src": [SELF],
        "object-src": [NONE],
        "base-uri": [NONE],
        "form-action": [SELF],
        "frame-ancestors": [NONE],
    }
}
SECURE_CONTENT_TYPE_NOSNIFF = True
SECURE_REFERRER_POLICY = "same-origin"

# Behind HTTPS (production) everything secure is switched on together.
RECLO_HTTPS = env.bool("RECLO_HTTPS", default=False)
if RECLO_HTTPS:
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    SECURE_SSL_REDIRECT = env.bool("SECURE_SSL_REDIRECT", default=True)
    SESSION_COOKIE_SECURE = True
    CSRF_COOKIE_SECURE = True
    SECURE_HSTS_SECONDS = env.int("SECURE_HSTS_SECONDS", default=31536000)
    SECURE_HSTS_INCLUDE_SUBDOMAINS = True
    SECURE_HSTS_PRELOAD = True

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = VAR_DIR / "staticfiles"
STATICFILES_DIRS = [BASE_DIR / "static"]
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedManifestStaticFilesStorage"},
}
if DEBUG:
    STORAGES["staticfiles"] = {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"}

# Email (password resets, alerts): printed to the console locally (tests use
# Django's locmem outbox); production sets EMAIL_URL, e.g.
# smtp+tls://user:password@smtp.example.com:587, which sets the SMTP backend,
# host, port, user, password and TLS together.
EMAIL_BACKEND = env("EMAIL_BACKEND", default="django.core.mail.backends.console.EmailBackend")
DEFAULT_FROM_EMAIL = env("DEFAULT_FROM_EMAIL", default="ReClo <noreply@reclo.local>")
if env("EMAIL_URL", default=""):
    vars().update(env.email_url("EMAIL_URL"))
EMAIL_TIMEOUT = env.int("EMAIL_TIMEOUT", default=20)

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "filters": {"request_id": {"()": "reclo_site.middleware.RequestIdFilter"}},
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"}},
    "handlers": {
        "console": {"class": "logging.StreamHandler", "formatter": "plain", "filters": ["request_id"]},
    },
    "root": {"handlers": ["console"], "level": env("LOG_LEVEL", default="INFO")},
    "loggers": {"botocore": {"level": "WARNING"}, "boto3": {"level": "WARNING"}},
}

# --- API -------------------------------------------------------------------

# The largest request body read into memory (API JSON and page forms alike):
# the biggest real one is a few kilobytes, and backup data never passes
# through the portal (agents write to S3 directly). Over it: 413, code 104.
DATA_UPLOAD_MAX_MEMORY_SIZE = env.int("DATA_UPLOAD_MAX_MEMORY_SIZE", default=256 * 1024)

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": ["accounts.authentication.TokenAuthentication"],
    "DEFAULT_PERMISSION_CLASSES": ["accounts.permissions.CredentialScope"],
    "DEFAULT_PARSER_CLASSES": ["reclo_site.api.parsers.JSONParser"],
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "EXCEPTION_HANDLER": "reclo_site.api.errors.exception_handler",
    "DEFAULT_THROTTLE_CLASSES": ["reclo_site.api.throttling.TokenRateThrottle"],
    "DEFAULT_THROTTLE_RATES": {"token": env("API_RATE", default="1200/min")},
    "NUM_PROXIES": env.int("NUM_PROXIES", default=0),
    "UNAUTHENTICATED_USER": "django.contrib.auth.models.AnonymousUser",
    "DATETIME_FORMAT": "%Y-%m-%dT%H:%M:%SZ",
}

SPECTACULAR_SETTINGS = {
    "TITLE": "ReClo API",
    "DESCRIPTION": (
        "The agent-facing API of ReClo. Authenticate with `Authorization: Token <token>`. "
        'Errors are `{"error": <code>, "message": "..."}`; with their codes in '
        "the table below."
    ),
    "VERSION": "1",
    "SERVE_INCLUDE_SCHEMA": False,
    # The docs page's scripts come from our own static files, not a CDN.
    "REDOC_DIST": "SIDECAR",
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "COMPONENT_SPLIT_REQUEST": True,
    "POSTPROCESSING_HOOKS": [
        "drf_spectacular.hooks.postprocess_schema_enums",
        "reclo_site.api.schema.add_error_table",
    ],
}

# Sign-in limits (accounts/throttle.py): failures allowed per (account,
# address) and per address in a window before each further attempt waits a
# doubling delay (LOGIN_BACKOFF_FIRST: 1 s, 2 s, 4 s ... up to LOGIN_BACKOFF_MAX). Nothing counts
# per account alone, so a stranger cannot lock the owner out; a burst of
# LOGIN_ALERT_AFTER failures on one account emails its owner.
LOGIN_FAILURES_PER_ACCOUNT = env.int("LOGIN_FAILURES_PER_ACCOUNT", default=5)
LOGIN_FAILURES_PER_ADDRESS = env.int("LOGIN_FAILURES_PER_ADDRESS", default=20)
LOGIN_FAILURE_WINDOW = timedelta(minutes=15)
# Bad enrollment keys allowed per address in the same window (then 429, code 103).
ENROLL_FAILURES_PER_ADDRESS = env.int("ENROLL_FAILURES_PER_ADDRESS", default=10)
# How long a server's enrollment key works (once).
ENROLLMENT_KEY_LIFETIME = timedelta(hours=24)
LOGIN_BACKOFF_FIRST = timedelta(seconds=1)
LOGIN_BACKOFF_MAX = timedelta(seconds=env.int("LOGIN_BACKOFF_MAX_SECONDS", default=15 * 60))
LOGIN_ALERT_AFTER = env.int("LOGIN_ALERT_AFTER", default=10)
# Password-reset emails asked for per address and per email address in an hour.
PASSWORD_RESETS_PER_ADDRESS = env.int("PASSWORD_RESETS_PER_ADDRESS", default=10)
PASSWORD_RESETS_PER_EMAIL = env.int("PASSWORD_RESETS_PER_EMAIL", default=3)
PASSWORD_RESET_TIMEOUT = 60 * 60  # a reset link works for an hour

# Two-factor (django-otp): the name authenticator apps show, how long a code
# keeps a session "recently verified" for destructive actions, and how long
# the second sign-in step may follow the password. django-otp's own per-device
# back-off is off: it would let a stranger who knows the password lock the
# owner's device; accounts/throttle.py limits code guesses per address instead.
OTP_TOTP_ISSUER = "ReClo"
OTP_ADMIN_HIDE_SENSITIVE_DATA = True  # the admin never shows TOTP secrets
OTP_TOTP_THROTTLE_FACTOR = 0
OTP_STATIC_THROTTLE_FACTOR = 0
RECLO_OTP_RECENT = timedelta(minutes=env.int("RECLO_OTP_RECENT_MINUTES", default=10))
RECLO_OTP_LOGIN_STEP = timedelta(minutes=5)

API_TOKEN_LIFETIME = timedelta(days=60)

# --- Celery ------------------------------------------------------------------

CELERY_BROKER_URL = env("CELERY_BROKER_URL", default="") or REDIS_URL or "filesystem://"
if CELERY_BROKER_URL == "filesystem://":
    # kombu's file-system transport: a broker with no server, for local runs.
    _broker_dir = VAR_DIR / "broker"
    for _sub in ("queue", "processed", "control"):
        (_broker_dir / _sub).mkdir(parents=True, exist_ok=True)
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        "data_folder_in": str(_broker_dir / "queue"),
        "data_folder_out": str(_broker_dir / "queue"),
        "processed_folder": str(_broker_dir / "processed"),
        "store_processed": False,
        "control_folder": str(_broker_dir / "control"),
    }
else:
    # A task whose worker died unacknowledged is redelivered after this many
    # seconds (Redis transport). Minutes, not hours: a task that runs longer
    # is redelivered while it still runs too, so every long task holds a
    # renewed claim and a duplicate does nothing (see backups.tasks and
    # recovery.engine).
    _visibility = env.int("CELERY_VISIBILITY_TIMEOUT", default=10 * 60)
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        "visibility_timeout": _visibility,
        # Workers sweep for expired messages this often (kombu's default is
        # every 100 s), so a dead worker's task is back soon after the timeout.
        "unacked_restore_interval": max(1, min(30, _visibility // 10)),
        "unacked_restore_throttle": 1,
    }
CELERY_TASK_SERIALIZER = "json"
CELERY_RESULT_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_TASK_IGNORE_RESULT = True
CELERY_TASK_SOFT_TIME_LIMIT = env.int("CELERY_TASK_SOFT_TIME_LIMIT", default=55 * 60)
CELERY_TASK_TIME_LIMIT = env.int("CELERY_TASK_TIME_LIMIT", default=60 * 60)
# A task is acknowledged only after it ran, and put back if its worker died,
# so every task must be idempotent (they are: see each task's docstring).
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
# A pool process is replaced after this many tasks (bounds leaks of a long
# run); one that dies (OOM killer, SIGKILL) is replaced by the pool at once.
CELERY_WORKER_MAX_TASKS_PER_CHILD = env.int("CELERY_WORKER_MAX_TASKS_PER_CHILD", default=200)
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_TASK_ALWAYS_EAGER = env.bool("CELERY_TASK_ALWAYS_EAGER", default=False)
CELERY_BEAT_SCHEDULE_FILENAME = str(VAR_DIR / "celerybeat-schedule")
CELERY_TIMEZONE = "UTC"
# Integration tests give their worker a queue of its own, so workers of
# other test runs sharing the Redis never take each other's tasks.
CELERY_TASK_DEFAULT_QUEUE = env("CELERY_TASK_DEFAULT_QUEUE", default="celery")
# Failovers (and drills) have a queue and workers of their own, so a flood of
# uploads to verify never delays one. Empty: named after the default queue
# ("recovery" beside "celery"; see reclo_site/queues.py).
CELERY_RECOVERY_QUEUE = env("CELERY_RECOVERY_QUEUE", default="")
CELERY_TASK_ROUTES = ("reclo_site.queues.route_task",)

# The one beat schedule. Each job is idempotent and works in bounded batches,
# so two overlapping runs do no harm.
CELERY_BEAT_SCHEDULE = {
    # Deactivate agent tokens older than 60 days since issue or renewal.
    "expire-tokens": {"task": "accounts.tasks.tokens_expire", "schedule": crontab(minute=7)},
    # Abort multipart uploads and drop pending uploads whose credentials have
    # expired; re-enqueue verifications that a lost worker left behind.
    "backups-clean-up-uploads": {"task": "backups.tasks.uploads_clean_up", "schedule": crontab(minute=17)},
    # Delete objects that retention replaced, once no restore can still read them.
    "backups-purge-objects": {"task": "backups.tasks.objects_purge", "schedule": crontab(minute=37)},
    # Restore points deleted while locked, once their lock has ended.
    "backups-purge-deleted": {"task": "backups.tasks.backups_purge", "schedule": crontab(minute=41)},
    # Re-read a sample of stored backups (SHA-256 and VHD structure), Sunday night.
    "backups-scrub": {"task": "backups.tasks.backups_scrub", "schedule": crontab(minute=23, hour=3, day_of_week=0)},
    # Email owners whose servers stopped sending backups (twice the usual interval).
    "backups-overdue": {"task": "backups.tasks.overdue_notify", "schedule": crontab(minute="*/15")},
    # Re-enqueue verifications no live worker is on (a worker killed mid-check).
    "backups-requeue-verifications": {"task": "backups.tasks.verifications_requeue", "schedule": 120.0},
    # Re-enqueue failover steps whose worker died or whose message was lost.
    "recovery-reconcile-failover-steps": {"task": "recovery.tasks.failovers_reconcile", "schedule": 60.0},
    # Re-enqueue failback steps whose worker died or whose message was lost.
    "recovery-reconcile-failbacks": {"task": "recovery.tasks.failbacks_reconcile", "schedule": 60.0},
    # Record instance states changed outside the portal (stopped in the console, ...).
    "recovery-sync-instances": {"task": "recovery.tasks.instances_sync", "schedule": crontab(minute="*/5")},
    # Warm standby: stage restore points whose message was lost or whose worker died; delete
    # the staged snapshots of restore points that went (deleted, retention, standby turned off).
    "recovery-standby-reconcile": {
        "task": "recovery.standby_tasks.standby_reconcile",
        "schedule": crontab(minute="*/5"),
    },
    # Terminate ReClo's recovery instances stopped for more than 14 days.
    "recovery-free-instances": {"task": "recovery.tasks.instances_free", "schedule": crontab(minute=47)},
    # Re-enqueue drill steps whose worker died (the drill then ends and is torn down).
    "recovery-reconcile-drills": {"task": "recovery.tasks.drills_reconcile", "schedule": 60.0},
    # Start the drills that servers' drill intervals make due.
    "recovery-schedule-drills": {"task": "recovery.tasks.drills_schedule", "schedule": crontab(minute="*/15")},
    # Email owners whose VPN gateway stopped reporting (and when it is back).
    "recovery-watch-vpn-gateways": {"task": "recovery.tasks.gateways_watch", "schedule": 60.0},
}

# --- Cloud (AWS; moto's server mode locally) ------------------------------------

AWS_ENDPOINT_URL = env("AWS_ENDPOINT_URL", default="") or None
AWS_REGION = env("AWS_REGION", default="us-east-1")
RECLO_BUCKET = env("RECLO_BUCKET", default="reclo-backups")

# --- Backups -------------------------------------------------------------------

# Lifetime of the STS credentials of an upload or a restore: at most 12 hours
# (docs/api.md, Uploading); 1 hour when AWS caps it (role chaining, see cloud/credentials.py).
RECLO_CREDENTIALS_TTL = timedelta(hours=env.float("RECLO_CREDENTIALS_TTL_HOURS", default=12))
# Upload credentials are much shorter-lived: STS credentials cannot be
# revoked, so this is how long a stolen set (or the agent itself, after its
# upload is completed) could still write. The agent refreshes them while it
# uploads (POST .../credentials), which stops once the upload is completed.
RECLO_UPLOAD_CREDENTIALS_TTL = timedelta(hours=env.float("RECLO_UPLOAD_CREDENTIALS_TTL_HOURS", default=1))
# Verified restore points are locked (S3 Object Lock, compliance mode) for this
# many days unless the account's AccountLimits says otherwise: until then
# nobody, the portal included, can delete or overwrite them.
RECLO_LOCK_DAYS = env.int("RECLO_LOCK_DAYS", default=30)
# Set: credentials come from AssumeRole on this role. Empty: GetFederationToken.
RECLO_UPLOAD_ROLE_ARN = env("RECLO_UPLOAD_ROLE_ARN", default="")
# Largest stored (compressed) backup an account may upload, unless its
# AccountLimits row says otherwise. 2 TiB covers the VHD format's 2040 GiB disks.
RECLO_MAX_BACKUP_SIZE = env.int("RECLO_MAX_BACKUP_SIZE", default=2 * 1024**4)
# Restore points kept per server and disk; older ones are merged into the full.
RECLO_RETENTION_KEEP = env.int("RECLO_RETENTION_KEEP", default=14)
# Most VHD blocks a restore point may declare: 2^22 covers the format's
# largest disk (2040 GiB) at 512 KiB blocks (the agent writes 2 MiB ones).
# More is refused from the header, before its BAT (4 bytes a block) is read.
RECLO_VERIFY_MAX_BLOCKS = env.int("RECLO_VERIFY_MAX_BLOCKS", default=4 * 1024 * 1024)
# Fairness between tenants: pending uploads an account may hold at once
# (over it: 429, code 103, Retry-After), and verifications of one account
# that run at once (the others wait their turn in the queue).
RECLO_MAX_PENDING_UPLOADS = env.int("RECLO_MAX_PENDING_UPLOADS", default=20)
RECLO_MAX_CONCURRENT_VERIFICATIONS = env.int("RECLO_MAX_CONCURRENT_VERIFICATIONS", default=2)
# A verification whose worker has not renewed its heartbeat for this long is
# taken to be dead: a redelivered or re-queued task takes it over.
RECLO_VERIFY_STALE_AFTER = timedelta(seconds=env.int("RECLO_VERIFY_STALE_SECONDS", default=180))
# Stored backups the weekly scrub re-reads per run.
RECLO_SCRUB_SAMPLE = env.int("RECLO_SCRUB_SAMPLE", default=50)
# Where `manage.py build_agent` puts the agent bundle the portal serves (never checked in).
RECLO_AGENT_BUNDLE_DIR = Path(env("RECLO_AGENT_BUNDLE_DIR", default=str(VAR_DIR / "agent")))

# How many reverse proxies in front of the portal append to X-Forwarded-For.
NUM_PROXIES = env.int("NUM_PROXIES", default=0)
# Whether the proxy in front sets X-Request-ID on every request (overwriting
# the client's); only then is that header used as the request id.
RECLO_TRUST_REQUEST_ID = env.bool("RECLO_TRUST_REQUEST_ID", default=False)

# --- Recovery (failover) ---------------------------------------------------------

# The KMS key EBS snapshots and volumes of failovers are encrypted with; empty:
# the account's default EBS key (aws/ebs).
RECLO_KMS_KEY_ID = env("RECLO_KMS_KEY_ID", default="")


def _local_vpn_key() -> str:
    """A Fernet key generated once into var/, so local runs need no configuration.

    It encrypts the WireGuard private keys stored in the database. Production
    sets RECLO_VPN_KEYS instead: a database dump alone must not yield them.
    """
    path = VAR_DIR / "vpn_key"
    if not path.exists():
        path.touch(mode=0o600)
        path.write_text(base64.urlsafe_b64encode(secrets.token_bytes(32)).decode())
    return path.read_text().strip()


# Fernet keys for the VPN private keys at rest: the first encrypts, all
# decrypt (list a new key first to rotate; `rotate_vpn_keys` re-encrypts).
RECLO_VPN_KEYS = env.list("RECLO_VPN_KEYS", default=[]) or [_local_vpn_key()]
# How a restore point becomes an EC2 image: "ebs_direct" (EBS direct APIs,
# minutes; the disk must already boot on EC2) or "vm_import" (VM Import with
# the vmimport role, hours; injects drivers, for Windows and physical servers).
RECLO_IMPORT_METHOD = env("RECLO_IMPORT_METHOD", default="ebs_direct")
RECLO_VMIMPORT_ROLE = env("RECLO_VMIMPORT_ROLE", default="vmimport")
# The licence of a Windows server imported by VM Import: "AWS" (EC2 provides
# and bills it) or "BYOL" (the customer's own, where their agreement allows).
RECLO_WINDOWS_LICENSE_TYPE = env("RECLO_WINDOWS_LICENSE_TYPE", default="AWS")
# Each tenant's recovery network, and the WireGuard tunnel into it. Chosen
# away from the 10.0/16, 192.168/16 ranges an office LAN usually has.
RECLO_RECOVERY_VPC_CIDR = env("RECLO_RECOVERY_VPC_CIDR", default="10.213.0.0/16")
RECLO_RECOVERY_SUBNET_CIDR = env("RECLO_RECOVERY_SUBNET_CIDR", default="10.213.1.0/24")
RECLO_VPN_TUNNEL_CIDR = env("RECLO_VPN_TUNNEL_CIDR", default="10.214.0.0/24")
# The VPN gateway: an explicit AMI, or else the newest from this public SSM parameter.
RECLO_VPN_GATEWAY_AMI = env("RECLO_VPN_GATEWAY_AMI", default="")
RECLO_VPN_GATEWAY_AMI_PARAMETER = env(
    "RECLO_VPN_GATEWAY_AMI_PARAMETER", default="/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-x86_64"
)
# t3.micro, not t3.nano: dnf is reported to be killed in a t3.nano's 512 MiB.
RECLO_VPN_GATEWAY_INSTANCE_TYPE = env("RECLO_VPN_GATEWAY_INSTANCE_TYPE", default="t3.micro")
# The VPN step waits this long for the gateway's peer-sync agent to call the
# portal once, then fails (code 407) with the gateway's console output.
# RECLO_VPN_GATEWAY_MUST_REPORT=false skips that wait: only for emulated
# clouds (moto runs no user-data, so no gateway there ever reports).
RECLO_VPN_GATEWAY_REPORT_DEADLINE = timedelta(minutes=env.int("RECLO_VPN_GATEWAY_REPORT_MINUTES", default=10))
RECLO_VPN_GATEWAY_MUST_REPORT = env.bool("RECLO_VPN_GATEWAY_MUST_REPORT", default=True)
# The gateway's agent reports every 30 seconds; after this long without a
# report the pages and the API say "VPN down" and the owner is emailed.
RECLO_VPN_GATEWAY_DOWN_AFTER = timedelta(minutes=env.int("RECLO_VPN_GATEWAY_DOWN_MINUTES", default=3))
# A step whose worker has not reported for this long is taken over by the
# reconciler (the worker died); long steps report every few seconds.
RECLO_RECOVERY_STALE_AFTER = timedelta(seconds=env.int("RECLO_RECOVERY_STALE_SECONDS", default=300))
# A warm standby staging whose worker stopped renewing its lease this long ago is taken over.
RECLO_STANDBY_STALE_AFTER = timedelta(seconds=env.int("RECLO_STANDBY_STALE_SECONDS", default=300))
# Stopped recovery instances are terminated after this long (the original's FreeInstances).
RECLO_STOPPED_INSTANCE_LIFETIME = timedelta(days=env.int("RECLO_STOPPED_INSTANCE_DAYS", default=14))

# Drills (test failovers). `local` boots the restore point in QEMU on the
# worker (free; the default, and what `make run` and the tests use); `aws`
# launches its EC2 image in an isolated subnet (billed). An account's own
# choice (AccountLimits.drill_sandbox, in the admin) overrides this.
RECLO_DRILL_SANDBOX = env("RECLO_DRILL_SANDBOX", default="local")
# Power-on to "server answers" may take this long before the drill fails.
RECLO_DRILL_TIME_LIMIT = env.float("RECLO_DRILL_TIME_LIMIT", default=600.0)
# Each drill's disk and evidence while it runs (removed by its teardown).
RECLO_DRILL_DIR = Path(env("RECLO_DRILL_DIR", default=str(BASE_DIR / "var" / "drills")))
# A drill step whose worker stopped reporting for this long is taken over.
RECLO_DRILL_STALE_AFTER = timedelta(seconds=env.int("RECLO_DRILL_STALE_SECONDS", default=120))
# Servers without their own interval are drilled this often.
RECLO_DRILL_EVERY_DAYS = env.int("RECLO_DRILL_EVERY_DAYS", default=7)
# Scheduled drills started per beat run, at most (the rest wait for the next).
RECLO_DRILL_SCHEDULE_BATCH = env.int("RECLO_DRILL_SCHEDULE_BATCH", default=20)
# The aws sandbox: what a drill's image is launched as, and how often it looks
# at the console and the status checks (seconds).
RECLO_DRILL_INSTANCE_TYPE = env("RECLO_DRILL_INSTANCE_TYPE", default="t3.small")
RECLO_DRILL_AWS_POLL = env.float("RECLO_DRILL_AWS_POLL", default=5.0)
