"""The files API over real restore points in moto's S3 (eager Celery: the task runs inline, its parser in a child).

The restore points are VHDs of real partitioned disks (FAT32 and NTFS in an
MBR table, reclo_site.testing_fsimages): a full, then an incremental of the
same disk with one file changed, one deleted and one added.
"""

import io
import zipfile

import pytest

from accounts.models import AuditEvent
from backups.models import Backup
from reclo_site.testing_fsimages import DELETED, expected_files, fs_disks

from . import vhds
from .conftest import Disk


@pytest.fixture
def points(user, aws):
    """(full, incremental) of the MBR disk."""
    images = fs_disks()
    disk = Disk(user)
    raw1, raw2 = images["mbr-1"].read_bytes(), images["mbr-2"].read_bytes()
    data, info = vhds.full(raw1)
    full = disk._store(data, info, kind=Backup.Kind.FULL, parent=None, status=Backup.Status.VERIFIED, when=None)
    data, info2 = vhds.incremental(raw1, raw2, info)
    inc = disk._store(data, info2, kind=Backup.Kind.INCREMENTAL, parent=full, status=Backup.Status.VERIFIED, when=None)
    return full, inc


def listing(api, backup, partition, path="/"):
    resp = api.get(f"/api/v1/backups/{backup.pk}/files", {"partition": partition, "path": path})
    assert resp.status_code == 200, resp.content
    return resp.json()["entries"]


def test_partitions_of_a_restore_point(api, points):
    resp = api.get(f"/api/v1/backups/{points[1].pk}/files")
    assert resp.status_code == 200
    parts = resp.json()["partitions"]
    assert [(p["partition"], p["filesystem"]) for p in parts] == [(1, "fat32"), (2, "ntfs")]
    assert parts[0]["size"] == 81920 * 512 and parts[1]["size"] == 49152 * 512


@pytest.mark.parametrize("partition", [1, 2])
def test_the_deleted_file_is_in_the_full_and_not_in_the_incremental(api, points, partition):
    full, inc = points
    assert DELETED in {e["name"] for e in listing(api, full, partition)}
    root = listing(api, inc, partition)
    assert DELETED not in {e["name"] for e in root}
    assert "new.txt" in {e["name"] for e in root}
    # Folders first, then files by name.
    assert [e["type"] for e in root][0] == "dir" and root[0]["name"] == "docs"


@pytest.mark.parametrize("partition", [1, 2])
def test_every_file_downloads_with_its_bytes_at_that_restore_point(api, points, partition):
    for version, backup in enumerate(points, start=1):
        for path, data in expected_files(version).items():
            resp = api.get(f"/api/v1/backups/{backup.pk}/files/content", {"partition": partition, "path": "/" + path})
            assert resp.status_code == 200, (path, resp.content[:200])
            assert b"".join(resp.streaming_content) == data, path
            assert resp["Content-Length"] == str(len(data))
            assert "attachment;" in resp["Content-Disposition"]
            assert resp["Last-Modified"]


def test_a_folder_downloads_as_a_zip_and_every_download_is_audited(api, points, user):
    resp = api.get(f"/api/v1/backups/{points[1].pk}/files/content", {"partition": 2, "path": "/docs"})
    assert resp.status_code == 200 and resp["Content-Type"] == "application/zip"
    assert 'filename="docs.zip"' in resp["Content-Disposition"]
    with zipfile.ZipFile(io.BytesIO(b"".join(resp.streaming_content))) as zf:
        got = {i.filename: zf.read(i) for i in zf.infolist() if not i.is_dir()}
    assert got == {p.removeprefix("docs/"): d for p, d in expected_files(2).items() if p.startswith("docs/")}
    event = AuditEvent.objects.filter(user=user, kind=AuditEvent.Kind.FILES_DOWNLOADED).get()
    assert event.details["path"] == "/docs" and event.details["partition"] == 2
    assert event.details["backup_id"] == str(points[1].pk) and event.details["what"] == "zip"


def test_another_tenants_restore_point_is_not_found(other_api, points):
    for url in ("files", "files/content?partition=1&path=/readme.txt"):
        resp = other_api.get(f"/api/v1/backups/{points[0].pk}/{url}")
        assert resp.status_code == 404 and resp.json()["error"] == 105
    assert not AuditEvent.objects.filter(kind=AuditEvent.Kind.FILES_DOWNLOADED).exists()


def test_bad_tokens_are_refused(client, points):
    for header in ("Token nope", "Bearer x", ""):
        resp = client.get(f"/api/v1/backups/{points[0].pk}/files", HTTP_AUTHORIZATION=header)
        assert resp.status_code == 401 and resp.json()["error"] == 102


@pytest.mark.parametrize(
    "query",
    [{"partition": "x"}, {"partition": "0"}, {"partition": "1", "path": "relative"}, {"partition": "-1"},
     {"partition": "1", "path": "/" + "a" * 5000}],
)  # fmt: skip
def test_malformed_queries_answer_104(api, points, query):
    for url in ("files", "files/content"):
        resp = api.get(f"/api/v1/backups/{points[0].pk}/{url}", query)
        assert resp.status_code == 400 and resp.json()["error"] == 104


def test_content_needs_a_partition(api, points):
    resp = api.get(f"/api/v1/backups/{points[0].pk}/files/content", {"path": "/readme.txt"})
    assert resp.status_code == 400 and "partition" in resp.json()["fields"]


@pytest.mark.parametrize(("partition", "path"), [(3, "/"), (1, "/no/such/folder"), (2, "/readme.txt/x")])
def test_what_is_not_there_answers_314(api, points, partition, path):
    resp = api.get(f"/api/v1/backups/{points[0].pk}/files", {"partition": partition, "path": path})
    assert resp.status_code == 404 and resp.json()["error"] == 314


def test_a_restore_point_not_verified_is_not_browsed(api, points):
    Backup.objects.filter(pk=points[0].pk).update(status=Backup.Status.VERIFYING)
    resp = api.get(f"/api/v1/backups/{points[1].pk}/files")
    assert resp.status_code == 404 and resp.json()["error"] == 401  # NO_RESTORABLE_BACKUP, as a restore grant


def test_a_disk_of_no_known_file_system_answers_315(api, user, aws):
    raw = vhds.raw_disk(3)  # random pages: no partition table, no file system
    data, info = vhds.full(raw)
    backup = Disk(user)._store(data, info, kind=Backup.Kind.FULL, parent=None, status=Backup.Status.VERIFIED, when=None)
    parts = api.get(f"/api/v1/backups/{backup.pk}/files").json()["partitions"]
    assert parts == [{"partition": 1, "filesystem": "unknown", "size": len(raw), "label": ""}]
    resp = api.get(f"/api/v1/backups/{backup.pk}/files", {"partition": 1})
    assert resp.status_code == 422 and resp.json()["error"] == 315
