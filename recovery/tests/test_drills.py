"""Drills: the API, one drill per server, a failover cancels a drill, the teardown on every exit,
the schedule, the backup's `bootable`, and real drills in the local QEMU sandbox.

The drill tests here boot real guests (TCG under these machines): the disk
whose kernel panics and random data, stored in moto's S3 as the agent
stores them (seekable-zstd VHDs). The good disk, backed up by the real
agent, is drilled in tests/test_drill_agent_e2e.py.
"""

import hashlib
import shutil
import tempfile
import uuid
from datetime import timedelta
from pathlib import Path

import pytest
from django.core import mail
from django.utils import timezone

from backups.models import Backup
from backups.naming import backup_key
from backups.tests import vhds
from reclo_site import testing, testing_disks
from reclo_site.cloud import storage
from recovery import drill_services, drill_steps, engine, services
from recovery.drills import DRILL
from recovery.models import Drill

from .factories import ServerFactory

pytestmark = pytest.mark.django_db

DRILLS = "/api/v1/drills"


@pytest.fixture(autouse=True)
def drill_dir(settings):
    # Short: QEMU's control socket lives below it and a socket path holds 108 bytes.
    path = Path(tempfile.mkdtemp(prefix="rd-", dir="/tmp"))
    settings.RECLO_DRILL_DIR = path
    settings.RECLO_DRILL_TIME_LIMIT = 300
    settings.EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"
    yield path
    shutil.rmtree(path, ignore_errors=True)


def drive_drill(drill_id, *, max_goes: int = 20) -> Drill:
    """Run a drill's steps in this process, one go at a time, then its exit hook (as on_commit would)."""
    for _ in range(max_goes):
        drill = Drill.objects.get(pk=drill_id)
        if drill.status in Drill.FINISHED:
            if drill.torn_down is None:
                drill_steps.teardown(drill_id, drill.status)
            return Drill.objects.get(pk=drill_id)
        Drill.objects.filter(pk=drill_id).update(lease_until=None, lease_token=None)
        engine.run_step(drill_id, DRILL.step_for_status(drill.status), pipeline=DRILL)
    raise AssertionError(f"drill did not finish in {max_goes} goes")


def store_chain(user, server, objects: list[tuple[bytes, object]]) -> list[Backup]:
    """Verified restore points (full, then incrementals) whose stored objects are `objects`."""
    backups: list[Backup] = []
    now = timezone.now()
    for n, (data, info) in enumerate(objects):
        backup_id = uuid.uuid4()
        key = backup_key(user_id=user.pk, server=server.name, disk="sda", backup_id=backup_id)
        storage.put_object(key, data)
        backups.append(
            Backup.objects.create(
                id=backup_id, user=user, server=server, disk="sda",
                kind=Backup.Kind.FULL if n == 0 else Backup.Kind.INCREMENTAL,
                parent=backups[-1] if n else None, file_name=f"restore-{n}.vhd", key=key,
                virtual_size=info.virtual_size, file_size=len(data), sha256=hashlib.sha256(data).hexdigest(),
                vhd_unique_id=info.unique_id, status=Backup.Status.VERIFIED,
                date_created=now - timedelta(hours=len(objects) - n), completed_at=now, verified_at=now,
            )
        )  # fmt: skip
    return backups


def stored_etags(backups) -> list[str]:
    return [storage.head_object(b.key)["etag"] for b in backups]


# --- The API --------------------------------------------------------------------------------


class TestApi:
    def test_start_answers_202_and_the_drill_reads_back_with_its_steps(self, api, chain):
        backups, _ = chain
        response = api.post(DRILLS, {"backup_id": str(backups[-1].pk), "probe_port": 22}, format="json")
        assert response.status_code == 202, response.content
        body = response.json()
        assert body["status"] == "queued"
        detail = api.get(f"{DRILLS}/{body['drill_id']}").json()["drill"]
        assert (detail["backup_id"], detail["server"], detail["sandbox"]) == (
            str(backups[-1].pk),
            "front-desk",
            "local",
        )
        assert [s["name"] for s in detail["steps"]] == ["preparing", "booting", "checking"]
        assert (detail["checks"], detail["rto_seconds"], detail["report_url"], detail["error"]) == (
            [],
            None,
            None,
            None,
        )
        assert Drill.objects.get(pk=body["drill_id"]).probe_port == 22
        listed = api.get(DRILLS, {"server": "front-desk"}).json()["drills"]
        assert [d["drill_id"] for d in listed] == [body["drill_id"]]
        assert api.get(DRILLS, {"server": "elsewhere"}).json()["drills"] == []

    def test_one_drill_per_server_at_a_time(self, api, chain):
        backups, _ = chain
        assert api.post(DRILLS, {"backup_id": str(backups[0].pk)}, format="json").status_code == 202
        second = api.post(DRILLS, {"backup_id": str(backups[-1].pk)}, format="json")
        assert (second.status_code, second.json()["error"]) == (409, 409)

    def test_a_running_failover_refuses_a_drill(self, api, chain):
        backups, _ = chain
        services.recovery_start(user=backups[0].user, backup_id=backups[-1].pk)
        response = api.post(DRILLS, {"backup_id": str(backups[-1].pk)}, format="json")
        assert (response.status_code, response.json()["error"]) == (409, 409)

    def test_other_tenants_drill_is_410_and_their_backup_cannot_be_drilled(self, api, other_api, chain):
        backups, _ = chain
        drill_id = api.post(DRILLS, {"backup_id": str(backups[-1].pk)}, format="json").json()["drill_id"]
        for url in (f"{DRILLS}/{drill_id}", f"{DRILLS}/{drill_id}/report", f"{DRILLS}/not-a-uuid"):
            response = other_api.get(url)
            assert (response.status_code, response.json()["error"]) == (404, 410), url
        assert other_api.get(DRILLS).json()["drills"] == []
        response = other_api.post(DRILLS, {"backup_id": str(backups[-1].pk)}, format="json")
        assert response.status_code == 404 and response.json()["error"] != 410

    def test_bad_token_is_401(self, anon_api, chain):
        anon_api.credentials(HTTP_AUTHORIZATION="Token not-a-token")
        for method, url in (("get", DRILLS), ("post", DRILLS), ("get", f"{DRILLS}/{uuid.uuid4()}")):
            response = getattr(anon_api, method)(url)
            assert response.status_code == 401, url

    @pytest.mark.parametrize(
        "body",
        [[1, 2], {"probe_port": 22}, {"backup_id": 5}, {"backup_id": "x", "probe_port": 70000},
         {"backup_id": "x", "probe_port": "ssh"}],
    )  # fmt: skip
    def test_malformed_bodies_are_400_104(self, api, chain, body):
        response = api.post(DRILLS, body, format="json")
        assert (response.status_code, response.json()["error"]) == (400, 104), body

    def test_an_unavailable_sandbox_is_411(self, api, chain, settings):
        settings.RECLO_DRILL_SANDBOX = "vmware"  # a portal misconfigured with a sandbox ReClo has not got
        response = api.post(DRILLS, {"backup_id": str(chain[0][-1].pk)}, format="json")
        assert (response.status_code, response.json()["error"]) == (502, 411)


# --- The pipeline's exits and a real failover ----------------------------------------------


def test_a_failover_cancels_the_running_drill_and_tears_it_down(user, chain, django_capture_on_commit_callbacks):
    backups, _ = chain
    drill = drill_services.drill_start(user=user, backup_id=backups[-1].pk)
    Drill.objects.filter(pk=drill.pk).update(status="preparing")
    folder = drill_steps.work_dir(drill.pk)
    folder.mkdir(parents=True)
    (folder / "disk.raw").write_bytes(b"half a disk")
    with django_capture_on_commit_callbacks(execute=True):
        services.recovery_start(user=user, backup_id=backups[-1].pk)
    drill.refresh_from_db()
    assert (drill.status, drill.error) == ("failed", "Cancelled: a failover of front-desk started.")
    assert drill.torn_down is not None and not folder.exists()
    assert [r["removed"] is not None for r in drill.resources] == [True]
    # A cancelled drill says nothing about the restore point (the failover's own alert may be there).
    assert [m.subject for m in mail.outbox if "drill" in m.subject] == []
    # The worker that held the drill's lease has lost it: its next go claims nothing.
    assert engine.run_step(drill.pk, "preparing", pipeline=DRILL) == "not claimed"


def test_a_missed_deadline_fails_the_drill_and_tears_it_down(user, chain, django_capture_on_commit_callbacks):
    backups, _ = chain
    drill = drill_services.drill_start(user=user, backup_id=backups[-1].pk)
    DRILL.step_rows_of(drill.pk).filter(name="preparing").update(deadline=timezone.now() - timedelta(seconds=1))
    drill_steps.work_dir(drill.pk).mkdir(parents=True)
    with django_capture_on_commit_callbacks(execute=True):
        assert engine.run_step(drill.pk, "preparing", pipeline=DRILL) == "failed"
    drill.refresh_from_db()
    assert (drill.status, drill.error) == ("failed", "Preparing the disk did not finish in time.")
    assert drill.torn_down is not None and not drill_steps.work_dir(drill.pk).exists()
    assert [m.subject for m in mail.outbox] == ["ReClo: the drill of front-desk failed"]
    assert "did not finish in time" in mail.outbox[0].body


def test_a_killed_worker_is_taken_over_by_the_reconciler(user, chain, monkeypatch, django_capture_on_commit_callbacks):
    backups, _ = chain
    drill = drill_services.drill_start(user=user, backup_id=backups[-1].pk)
    # A worker claimed preparing, then died: its lease ran out.
    Drill.objects.filter(pk=drill.pk).update(
        status="preparing", lease_token=uuid.uuid4(), lease_until=timezone.now() - timedelta(seconds=1)
    )
    sent = []
    monkeypatch.setattr(
        engine, "enqueue", lambda rid, step, countdown=None, pipeline=None: sent.append((str(rid), step, pipeline.name))
    )
    with django_capture_on_commit_callbacks(execute=True):
        assert engine.reconcile(pipeline=DRILL) == 1
    assert sent == [(str(drill.pk), "preparing", "drill")]


@pytest.mark.parametrize(
    ("preflight", "mode"),
    [({"ok": True, "boot_mode": "uefi"}, "uefi"), ({"ok": True, "boot_mode": "bios"}, "bios"), (None, "bios")],
    ids=["uefi", "bios", "no-preflight"],
)
def test_the_drill_boots_with_the_firmware_of_the_servers_last_preflight(user, chain, preflight, mode):
    backups, _ = chain
    server = backups[-1].server
    type(server).objects.filter(pk=server.pk).update(preflight=preflight)
    drill = Drill.objects.select_related("server").get(
        pk=drill_services.drill_start(user=user, backup_id=backups[-1].pk).pk
    )
    request = drill_steps.boot_request(drill)
    assert request.boot_mode == mode and request.label == f"drill-{drill.pk}"


def test_the_account_picks_the_sandbox_and_the_portal_setting_is_the_default(user, chain, settings):
    from backups.models import AccountLimits

    backups, _ = chain
    assert drill_services.drill_sandbox(user) == "local"  # the default, in make run and the tests
    settings.RECLO_DRILL_SANDBOX = "aws"
    assert drill_services.drill_sandbox(user) == "aws"
    AccountLimits.objects.create(user=user, drill_sandbox="local")
    assert drill_services.drill_start(user=user, backup_id=backups[-1].pk).sandbox == "local"


def test_the_schedule_drills_the_newest_verified_restore_point_once(user, chain):
    backups, _ = chain
    first = drill_services.drills_schedule()
    assert len(first) == 1
    drill = Drill.objects.get(pk=first[0])
    assert (drill.backup_ref, drill.trigger) == (backups[-1].pk, "schedule")
    assert drill_services.drills_schedule() == []  # running, and then not due for a week
    Drill.objects.filter(pk=drill.pk).update(status="passed", finished=timezone.now())
    assert drill_services.drills_schedule() == []
    Drill.objects.filter(pk=drill.pk).update(created=timezone.now() - timedelta(days=8))
    assert len(drill_services.drills_schedule()) == 1


def test_the_schedule_is_bounded(user, aws):
    from .factories import backup_chain

    for n in range(3):
        backup_chain(user=user, server=ServerFactory(user=user, name=f"s{n}"), size=2 * 1024 * 1024, incrementals=0)
    assert len(drill_services.drills_schedule(limit=2)) == 2
    assert len(drill_services.drills_schedule(limit=2)) == 1


# --- Real drills in the local sandbox -------------------------------------------------------


@pytest.fixture(scope="session")
def disks():
    for tool in ("qemu-system-x86_64", "grub-mkimage", "mformat", "mcopy", "sfdisk", "mkfs.ext4", "debugfs"):
        testing.require_tool(tool)
    try:
        return testing_disks.test_disks()
    except testing_disks.BootDiskError as exc:
        if testing.IN_CI:
            pytest.fail(f"could not build the test disks: {exc}", pytrace=False)
        pytest.skip(f"could not build the test disks: {exc}")


@pytest.mark.parametrize(
    ("disk", "reason"), [("panics", "Kernel panic"), ("random", "")], ids=["kernel-panics", "random-data"]
)
def test_a_disk_that_cannot_boot_fails_with_the_console_as_reason(user, aws, disks, disk, reason, settings):
    settings.RECLO_DRILL_TIME_LIMIT = 120
    data = getattr(disks, disk).read_bytes()
    server = ServerFactory(user=user, name=f"broken-{disk}")
    (backup,) = store_chain(user, server, [vhds.full(data)])
    drill = drive_drill(drill_services.drill_start(user=user, backup_id=backup.pk).pk)
    assert drill.status == "failed"
    assert drill.error and drill.console_excerpt
    assert any(not c["passed"] for c in drill.checks)
    if reason:
        assert reason in drill.console_excerpt and reason.lower() in drill.error.lower()
    assert drill.torn_down and not drill_steps.work_dir(drill.pk).exists()
    assert [m.subject for m in mail.outbox] == [f"ReClo: the drill of broken-{disk} failed"]
    assert drill.error in mail.outbox[0].body


def test_a_server_drilled_every_0_days_is_never_scheduled(user, chain):
    server = chain[0][0].server
    type(server).objects.filter(pk=server.pk).update(drill_every_days=0)
    assert drill_services.drills_schedule() == []
    type(server).objects.filter(pk=server.pk).update(drill_every_days=None)  # empty: the default, 7 days
    assert len(drill_services.drills_schedule()) == 1


def test_a_restore_point_a_running_drill_boots_cannot_be_deleted(user, chain):
    from backups import services as backup_services
    from reclo_site.errors import Code, ServiceError

    backups, _ = chain
    drill = drill_services.drill_start(user=user, backup_id=backups[-1].pk)
    Drill.objects.filter(pk=drill.pk).update(status="booting")
    with pytest.raises(ServiceError) as refused:
        backup_services.backup_delete(user=user, backup_id=backups[-1].pk)
    assert refused.value.code == Code.HAS_DEPENDENTS and "drill of front-desk" in refused.value.message
    assert Backup.objects.filter(pk=backups[-1].pk).exists()
    Drill.objects.filter(pk=drill.pk).update(status="failed")
    backup_services.backup_delete(user=user, backup_id=backups[-1].pk)
    assert not Backup.objects.filter(pk=backups[-1].pk, deleted_at__isnull=True).exists()


def _pin(backups, *, versions: bool) -> None:
    """Record what verification records: the version (versioned bucket) and the ETag."""
    for backup in backups:
        info = storage.head_object(backup.key)
        Backup.objects.filter(pk=backup.pk).update(version_id=info["version_id"] if versions else "", etag=info["etag"])


def _prepared(drill: Drill) -> dict:
    return next(step for step in drill.steps.all() if step.name == "preparing").outputs


def test_a_chain_written_over_after_verification_is_never_seen_by_a_drill(user, chain):
    backups, _ = chain
    _pin(backups, versions=True)
    before = drive_drill(drill_services.drill_start(user=user, backup_id=backups[-1].pk).pk)
    storage.put_object(backups[0].key, b"forged by ransomware")  # a new current version of the base
    after = drive_drill(drill_services.drill_start(user=user, backup_id=backups[-1].pk).pk)
    # The drill read the verified versions: the same disk, the same verdict, as before the forgery.
    assert _prepared(after)["bytes_written"] == _prepared(before)["bytes_written"] > 0
    assert after.error == before.error


def test_a_drill_refuses_a_changed_object_where_only_its_etag_pins_it(user, chain):
    backups, _ = chain
    _pin(backups, versions=False)
    storage.put_object(backups[0].key, b"forged by ransomware")
    drill = drive_drill(drill_services.drill_start(user=user, backup_id=backups[-1].pk).pk)
    assert drill.status == "failed" and "not the version that was verified" in drill.error
