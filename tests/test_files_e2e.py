"""End to end: the agent backs up real partitioned disks; their files come back through the API and the agent.

Real parts throughout: the ``reclo-agent`` command in its own process, a
live portal, a real Celery worker process (verification and the file
browser's reads), PostgreSQL, Redis (the broker, and the cache through which
the worker hands listings and download chunks to the web process), moto's
server mode for S3 and STS. The disks are real ext4 + XFS (GPT) and FAT32 +
NTFS (MBR) images (reclo_site.testing_fsimages); each gets a full backup,
then an incremental after one file changed, one was deleted and one added.
"""

import io
import json
import os
import shutil
import zipfile

import pytest
from django.db import connection

from backups.models import Backup
from reclo_site import testing
from reclo_site.celery import app as celery_app
from reclo_site.cloud import storage
from reclo_site.testing_fsimages import DELETED, LAYOUT, TREE_V1, expected_files, fs_disks

from .test_agent_e2e import PASSWORD

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.integration]


@pytest.fixture
def stack(settings, tmp_path, live_server):
    """moto, a worker on a queue of our own, the shared Redis cache, and the logged-in agent."""
    testing.require_services()
    from accounts.models import User

    settings.CACHES = {"default": {"BACKEND": "reclo_site.cache.RedisCache", "LOCATION": os.environ["REDIS_URL"]}}
    queue = f"test-files-{os.getpid()}"
    previous = (celery_app.conf.task_always_eager, celery_app.conf.task_default_queue)
    celery_app.conf.task_always_eager, celery_app.conf.task_default_queue = False, queue
    with testing.moto_server(settings) as endpoint:
        env = {
            "DATABASE_URL": testing.test_database_url(connection),
            "REDIS_URL": os.environ["REDIS_URL"],
            "AWS_ENDPOINT_URL": endpoint,
            "RECLO_BUCKET": storage.bucket_name(),
            "CELERY_TASK_DEFAULT_QUEUE": queue,
        }
        with testing.celery_worker(env, queues=queue, concurrency=2):
            user = User.objects.create_user(username="dr.files", email="files@clinic.example", password=PASSWORD)
            agent_env = {
                **os.environ,
                "RECLO_AGENT_CONFIG": str(tmp_path / "agent" / "agent.json"),
                "RECLO_PASSWORD": PASSWORD,
                "PYTHONUNBUFFERED": "1",
            }

            def agent(*args, timeout=300):
                import subprocess
                import sys

                proc = subprocess.run([sys.executable, "-m", "reclo_agent", *args], env=agent_env,
                                      capture_output=True, text=True, timeout=timeout)  # fmt: skip
                if proc.returncode != 0:
                    pytest.fail(f"reclo-agent {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
                return proc.stdout

            agent("login", "--portal", live_server.url, "--email", "files@clinic.example",
                  "--state-dir", str(tmp_path / "state"))  # fmt: skip
            yield user, agent
    celery_app.conf.task_always_eager, celery_app.conf.task_default_queue = previous


def backed_up(agent, tmp_path, table: str) -> list[str]:
    """[full id, incremental id] of the disk `table`, both verified by the worker."""
    images = fs_disks()
    source = tmp_path / f"{table}.img"
    ids = []
    for version in (1, 2):
        shutil.copyfile(images[f"{table}-{version}"], source)
        backup_id, kind = agent("backup", str(source), "--server", "office", "--disk", table, "--plain").split()
        assert kind == ("full" if version == 1 else "incremental")
        testing.wait_until(
            lambda b=backup_id: Backup.objects.get(pk=b).status in ("verified", "failed"),
            timeout=180,
            what="verification",
        )
        assert Backup.objects.get(pk=backup_id).status == "verified", Backup.objects.get(pk=backup_id).failure
        ids.append(backup_id)
    return ids


def api_walk(client, backup_id, partition, path="/"):
    out = {}
    resp = client.get(f"/api/v1/backups/{backup_id}/files", {"partition": partition, "path": path})
    assert resp.status_code == 200, resp.content
    for e in resp.json()["entries"]:
        child = (path.rstrip("/") + "/" + e["name"]).lstrip("/")
        out.update(api_walk(client, backup_id, partition, "/" + child) if e["type"] == "dir" else {child: e})
    return out


@pytest.mark.parametrize("table", ["mbr", "gpt"])
def test_browse_and_take_back_files_of_real_disks(stack, tmp_path, table):
    from rest_framework.test import APIClient

    user, agent = stack
    ids = backed_up(agent, tmp_path, table)
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {testing.token_for(user)}")

    parts = json.loads(agent("files", ids[1], "--json"))
    assert [(p["partition"], p["filesystem"]) for p in parts] == sorted(LAYOUT[table].items())
    for version, backup_id in enumerate(ids, start=1):
        for partition, fs in LAYOUT[table].items():
            want = expected_files(version, fs)
            found = api_walk(client, backup_id, partition)
            assert set(found) == set(want)
            assert (DELETED in found) == (version == 1)  # in the full's listing, not in the incremental's
            for path, data in want.items():  # through the API...
                query = {"partition": partition, "path": "/" + path}
                resp = client.get(f"/api/v1/backups/{backup_id}/files/content", query)
                assert resp.status_code == 200 and b"".join(resp.streaming_content) == data, path
            # ...and through the agent: every file of the root, and the docs folder (a zip) with its files.
            root_files = [f"{partition}:/{p}" for p in want if "/" not in p]
            out = tmp_path / f"restored-{table}-{version}-{partition}"
            agent("restore-files", backup_id, *root_files, f"{partition}:/docs", "--to", str(out))
            restored = {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()}
            assert restored == want
            if fs in ("ext4", "xfs"):  # Unix modes where the file system has them
                assert (out / "docs" / "scan.bin").stat().st_mode & 0o777 == 0o600
                assert (out / "docs" / "old").stat().st_mode & 0o777 == 0o750
            if fs != "xfs":  # mkfs.xfs -p sets no times; the others keep the source's
                mtime = TREE_V1["docs/old/letter.txt"][2]
                assert abs((out / "docs" / "old" / "letter.txt").stat().st_mtime - mtime) <= 2

    listing = agent("files", ids[0], "1:/")
    assert DELETED in listing and "docs/" in listing
    assert DELETED not in agent("files", ids[1], "1:/")
    # A folder as a zip through the API, streamed from the worker.
    resp = client.get(f"/api/v1/backups/{ids[1]}/files/content", {"partition": 1, "path": "/docs"})
    with zipfile.ZipFile(io.BytesIO(b"".join(resp.streaming_content))) as zf:
        assert {i.filename for i in zf.infolist() if not i.is_dir()} >= {"scan.bin", "old/letter.txt"}
