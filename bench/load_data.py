"""Seeding and auditing for bench/load_bench.py (which runs it with the bench's environment).

    python bench/load_data.py seed --agents 200 --browsers 20 --out seed.json
    python bench/load_data.py check --seed seed.json --ledger run.json --out check.json

`seed` creates the agent accounts (each with an API token, made by the
portal's own token service) and the browser users (each with a server of two
disks holding a chain of verified restore points), with their storage areas
provisioned as registration does. `check` compares the database and the
bucket with what the agents were told during the run.
"""

import argparse
import json
import os
import sys
import uuid
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "reclo_site.settings")

import django  # noqa: E402

django.setup()

from django.contrib.auth.hashers import make_password  # noqa: E402
from django.db import connection  # noqa: E402
from django.utils import timezone  # noqa: E402

from accounts.models import User  # noqa: E402
from accounts.services import token_create  # noqa: E402
from backups.models import Backup, Server  # noqa: E402
from backups.naming import backup_key  # noqa: E402
from reclo_site.cloud import storage  # noqa: E402
from reclo_site.cloud.clients import client  # noqa: E402

BROWSER_PASSWORD = "load-bench-Passw0rd!"
CHAIN = 14  # a full and 13 incrementals per disk: the default retention window


def seed(*, agents: int, browsers: int) -> dict:
    password = make_password(BROWSER_PASSWORD)  # Argon2 once; every seeded user shares the hash
    User.objects.bulk_create(
        [User(username=f"load.agent{n:03d}", email=f"agent{n:03d}@load.example", password=password)
         for n in range(agents)]
        + [User(username=f"load.person{n:02d}", email=f"person{n:02d}@load.example", password=password)
           for n in range(browsers)]
    )  # fmt: skip
    out = {"agents": [], "browsers": []}
    now = timezone.now()
    rows = []
    for user in User.objects.filter(username__startswith="load.").order_by("username"):
        storage.provision_tenant(user.pk, user.username)
        if user.username.startswith("load.agent"):
            _token, key = token_create(user=user, name="load-bench")
            out["agents"].append({"user_id": user.pk, "email": user.email, "token": key})
            continue
        server = Server.objects.create(user=user, name=f"office-{user.username[-2:]}")
        for disk in ("sda", "sdb"):
            parent = None
            for n in range(CHAIN):
                backup_id = uuid.uuid4()
                when = now - timedelta(hours=CHAIN - n)
                rows.append(
                    Backup(
                        id=backup_id, user=user, server=server, disk=disk,
                        kind="full" if n == 0 else "incremental", parent_id=parent,
                        file_name=f"{disk}-{n}.vhd.zst",
                        key=backup_key(user_id=user.pk, server=server.name, disk=disk, backup_id=backup_id),
                        virtual_size=64 * 1024**3, file_size=(6 * 1024**3 if n == 0 else 300 * 1024**2 + n),
                        sha256=f"{n:064x}", vhd_unique_id=uuid.uuid4(), status="verified",
                        date_created=when, completed_at=when, verified_at=when + timedelta(minutes=3),
                    )
                )  # fmt: skip
                parent = backup_id
        out["browsers"].append(
            {"email": user.email, "password": BROWSER_PASSWORD, "server_id": server.pk, "server_name": server.name}
        )
    Backup.objects.bulk_create(rows)
    with connection.cursor() as cursor:
        cursor.execute("VACUUM ANALYZE")  # as autovacuum would have, on a live database
    return out


def check(*, seed_data: dict, ledger: dict) -> dict:
    """The database and the bucket against what the agents were told.

    Lost: a backup an agent got from complete that is missing, not verified,
    or whose object is not in the bucket at its declared size. Duplicated or
    extra: an id told twice, or a row of an agent account that no agent was
    told about (e.g. an upload created by a request whose answer was lost).
    """
    agent_ids = {a["user_id"] for a in seed_data["agents"]}
    told_started, told_completed, told_final = [], [], {}
    for entry in ledger.values():
        told_started += entry["started"]
        told_completed += entry["completed"]
        told_final.update(entry["final"])
    rows = {
        str(b["id"]): b
        for b in Backup.objects.filter(user_id__in=agent_ids).values("id", "status", "key", "file_size", "failure")
    }
    started, completed = set(told_started), set(told_completed)
    s3 = client("s3")
    objects = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=storage.bucket_name(), Prefix="backups/"):
        for obj in page.get("Contents", []):
            objects[obj["Key"]] = obj["Size"]
    status_counts = {}
    for row in rows.values():
        status_counts[row["status"]] = status_counts.get(row["status"], 0) + 1
    missing = sorted(completed - rows.keys())
    not_verified = sorted(i for i in completed & rows.keys() if rows[i]["status"] != "verified")
    no_object = sorted(
        i for i in completed & rows.keys()
        if rows[i]["status"] == "verified" and objects.get(rows[i]["key"]) != rows[i]["file_size"]
    )  # fmt: skip
    disagree = sorted(i for i, s in told_final.items() if i in rows and rows[i]["status"] != s)
    result = {
        "told_started": len(told_started),
        "told_completed": len(told_completed),
        "told_verified": sum(1 for s in told_final.values() if s == "verified"),
        "rows": len(rows),
        "row_statuses": status_counts,
        "duplicates_told": len(told_started) - len(started) + len(told_completed) - len(completed),
        "completed_not_started": sorted(completed - started),
        "missing": missing,
        "not_verified": [[i, rows[i]["status"], rows[i]["failure"][:200]] for i in not_verified],
        "object_missing_or_wrong_size": no_object,
        "agent_and_db_disagree": disagree,
        "extra_rows": [[i, rows[i]["status"]] for i in sorted(rows.keys() - started)],
        "started_not_completed": [[i, rows.get(i, {}).get("status")] for i in sorted(started - completed)],
    }
    # An upload an agent started but never completed (its PUT or complete
    # failed) is no lost backup as long as the row is still pending: the
    # agent knows it has no backup there, and clean-up drops the row later.
    abandoned_not_pending = [i for i, status in result["started_not_completed"] if status != "pending"]
    result["abandoned_not_pending"] = abandoned_not_pending
    result["ok"] = not (
        result["duplicates_told"] or result["completed_not_started"] or missing or not_verified or no_object
        or disagree or result["extra_rows"] or abandoned_not_pending
    )  # fmt: skip
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_seed = sub.add_parser("seed")
    p_seed.add_argument("--agents", type=int, default=200)
    p_seed.add_argument("--browsers", type=int, default=20)
    p_seed.add_argument("--out", required=True)
    p_check = sub.add_parser("check")
    p_check.add_argument("--seed", required=True)
    p_check.add_argument("--ledger", required=True, nargs="+", help="what each locust run's agents were told")
    p_check.add_argument("--out", required=True)
    args = parser.parse_args()
    if args.command == "seed":
        data = seed(agents=args.agents, browsers=args.browsers)
    else:
        ledger = {}
        for path in args.ledger:
            for user_id, told in json.loads(Path(path).read_text())["ledger"].items():
                merged = ledger.setdefault(user_id, {"started": [], "completed": [], "final": {}})
                merged["started"] += told["started"]
                merged["completed"] += told["completed"]
                merged["final"].update(told["final"])
        data = check(seed_data=json.loads(Path(args.seed).read_text()), ledger=ledger)
    Path(args.out).write_text(json.dumps(data, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
