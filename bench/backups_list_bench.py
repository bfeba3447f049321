"""Benchmark: GET /api/v1/backups for an account with 10,000 backups vs an empty one.

Fills a throwaway database (Django's test database machinery: created, then
destroyed) with 100 users, one of them holding 10,000 backups (5 servers x
2 disks, chains of a full and 13 incrementals), the others a few dozen each
(one with 60: a full page, to tell the page's own cost from the account's
size), plus one account with nothing. Then, in the same run, it times the list
endpoint through the full Django/DRF stack (token authentication included)
for both accounts and counts the SQL queries of each request.

    .venv/bin/python bench/backups_list_bench.py                  # SQLite (default settings)
    DATABASE_URL=postgres://postgres@127.0.0.1:5432/reclo \\
        .venv/bin/python bench/backups_list_bench.py              # PostgreSQL

Options: --backups N (10000), --users N (100), --requests N (60).
"""

import argparse
import logging
import os
import statistics
import sys
import time
import uuid
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "reclo_site.settings")

import django  # noqa: E402

django.setup()

from django.db import connection, reset_queries  # noqa: E402
from django.test.utils import CaptureQueriesContext, override_settings, setup_test_environment  # noqa: E402
from django.utils import timezone  # noqa: E402
from rest_framework.test import APIClient  # noqa: E402

CHAIN = 14  # a full and 13 incrementals: the default retention window


def fill(*, backups: int, users: int):
    """The users, servers and backups; returns (10,000 backups, 60 backups, empty) users."""
    from accounts.models import User
    from backups.models import Backup, Server
    from backups.naming import backup_key

    User.objects.bulk_create(
        [User(username=f"bench.user{n:03d}", email=f"user{n:03d}@bench.example", password="!") for n in range(users)]
    )
    # Read back rather than trust bulk_create's primary keys (not every backend returns them).
    people = list(User.objects.filter(username__startswith="bench.user").order_by("username"))
    heavy, others = people[0], people[1:]
    empty = User.objects.create(username="bench.empty", email="empty@bench.example", password="!")
    now = timezone.now()

    def chains(user, server, disk, count, start):
        rows, parent = [], None
        for n in range(count):
            backup_id = uuid.uuid4()
            full = n % CHAIN == 0
            rows.append(
                Backup(
                    id=backup_id,
                    user=user,
                    server=server,
                    disk=disk,
                    kind="full" if full else "incremental",
                    parent_id=None if full else parent,
                    file_name=f"{disk}-{n}.vhd.zst",
                    key=backup_key(user_id=user.pk, server=server.name, disk=disk, backup_id=backup_id),
                    virtual_size=64 * 1024**3,
                    file_size=(8 if full else 1) * 1024**3 + n,
                    sha256=f"{n:064x}",
                    status="verified",
                    date_created=start + timedelta(hours=n),
                    verified_at=start + timedelta(hours=n, minutes=5),
                )
            )
            parent = backup_id
        return rows

    layout = [(f"server{s}", f"disk{d}") for s in range(5) for d in range(2)]
    per_disk = backups // len(layout)
    rows = []
    for index, (server_name, disk) in enumerate(layout):
        server, _ = Server.objects.get_or_create(user=heavy, name=server_name)
        count = per_disk + (1 if index < backups % len(layout) else 0)
        rows += chains(heavy, server, disk, count, now - timedelta(hours=count))
    for n, user in enumerate(others):
        server = Server.objects.create(user=user, name="fileserver")
        count = 60 if n == 0 else 30  # the first: just over one page, a baseline for the page's own cost
        rows += chains(user, server, "sda", count, now - timedelta(hours=count))
    for start in range(0, len(rows), 2000):
        Backup.objects.bulk_create(rows[start : start + 2000])
    if connection.vendor == "postgresql":
        # A live database has planner statistics and a visibility map
        # (autovacuum sees to both after inserts); a freshly bulk-loaded one
        # has neither until told, which would time a state production never has.
        with connection.cursor() as cursor:
            cursor.execute("VACUUM ANALYZE")
    return heavy, others[0], empty


def measure(client, path: str, requests: int) -> tuple[list[float], int, int]:
    """Latencies (ms) of `requests` GETs, the queries of one, and the `count` answered."""
    response = client.get(path)  # warm-up: the token's "last used" write happens here
    assert response.status_code == 200, response.content
    reset_queries()  # with DEBUG on, the fill would have left the query log full
    with CaptureQueriesContext(connection) as ctx:
        client.get(path)
    # Counted now: every request clears the query log when it starts.
    queries = len(ctx)
    times = []
    for _ in range(requests):
        started = time.perf_counter()
        response = client.get(path)
        times.append((time.perf_counter() - started) * 1000)
        assert response.status_code == 200
    return times, queries, response.json()["count"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backups", type=int, default=10_000)
    parser.add_argument("--users", type=int, default=100)
    parser.add_argument("--requests", type=int, default=60)
    args = parser.parse_args()

    from accounts.services import token_create
    from backups.models import Backup

    logging.disable(logging.INFO)  # no per-request log lines in the figures
    setup_test_environment()
    old_name = connection.settings_dict["NAME"]
    connection.creation.create_test_db(verbosity=0, autoclobber=True)
    try:
        # Local memory for the throttle's counters; a generous rate so nothing is throttled.
        caches = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}
        rest = {**django.conf.settings.REST_FRAMEWORK, "DEFAULT_THROTTLE_RATES": {"token": "1000000/min"}}
        with override_settings(CACHES=caches, REST_FRAMEWORK=rest):
            started = time.perf_counter()
            heavy, page, empty = fill(backups=args.backups, users=args.users)
            print(
                f"database: {connection.vendor}; {Backup.objects.count():,} backups, {args.users + 1} users "
                f"({Backup.objects.filter(user=heavy).count():,} for one of them); "
                f"filled in {time.perf_counter() - started:.1f} s"
            )
            clients = {}
            for name, user in (("10,000 backups", heavy), ("60 backups", page), ("empty account", empty)):
                clients[name] = APIClient()
                clients[name].credentials(HTTP_AUTHORIZATION=f"Token {token_create(user=user, name='bench')[1]}")
            last_page = -(-args.backups // 50)
            cases = [
                ("10,000 backups", "first page", "/api/v1/backups"),
                ("10,000 backups", "?server=server3", "/api/v1/backups?server=server3"),
                ("10,000 backups", f"last page ({last_page})", f"/api/v1/backups?page={last_page}"),
                ("60 backups", "first page", "/api/v1/backups"),
                ("empty account", "first page", "/api/v1/backups"),
            ]
            print(f"\n{'account':<16} {'request':<18} {'count':>6} {'queries':>8} {'median ms':>10} {'p95 ms':>8}")
            for account, label, path in cases:
                times, queries, count = measure(clients[account], path, args.requests)
                p95 = statistics.quantiles(times, n=20)[-1]
                print(
                    f"{account:<16} {label:<18} {count:>6} {queries:>8} {statistics.median(times):>10.2f} {p95:>8.2f}"
                )
            print("\n(page size 50; queries per request include token authentication)")
    finally:
        connection.creation.destroy_test_db(old_name, verbosity=0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
