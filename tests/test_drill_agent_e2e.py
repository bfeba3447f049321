"""The real agent backs up a bootable disk (a full, then an incremental after changing a file inside),
and a drill of each restore point passes in the local QEMU sandbox.

The agent runs as its own process against the live portal and a moto server
(the fixtures of tests/test_agent_e2e.py); the portal's Celery is eager in
tests, so verification and then the whole drill (its steps and teardown)
run inside the calls that start them.
"""

import shutil

import pytest

from backups.models import Backup, Server
from reclo_site import testing, testing_disks
from reclo_site.cloud import storage
from recovery import drill_services, drill_steps
from recovery.models import Drill
from tests.test_agent_e2e import agent, cloud  # noqa: F401 - fixtures

pytestmark = pytest.mark.django_db(transaction=True)

RELEASE = b"ReClo drill test disk, incremental 1\n"


@pytest.fixture
def drill_dir(settings, tmp_path_factory):
    import tempfile
    from pathlib import Path

    # Short: QEMU's control socket lives below it and a socket path holds 108 bytes.
    path = Path(tempfile.mkdtemp(prefix="rd-", dir="/tmp"))
    settings.RECLO_DRILL_DIR = path
    settings.RECLO_DRILL_TIME_LIMIT = 300
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_a_drill_of_each_restore_point_the_agent_made_passes(agent, tmp_path, drill_dir):  # noqa: F811
    for tool in ("qemu-system-x86_64", "grub-mkimage", "mformat", "sfdisk", "mkfs.ext4", "debugfs"):
        testing.require_tool(tool)
    disks = testing_disks.test_disks()
    source = tmp_path / "disk.img"
    shutil.copy(disks.good, source)
    full_id, kind = agent("backup", str(source), "--server", "clinic-srv", "--disk", "sda", "--plain").stdout.split()
    assert kind == "full"
    testing_disks.replace_file(source, "/etc/reclo-release", RELEASE)
    inc_id, kind = agent("backup", str(source), "--server", "clinic-srv", "--disk", "sda", "--plain").stdout.split()
    assert kind == "incremental"
    backups = [Backup.objects.get(pk=full_id), Backup.objects.get(pk=inc_id)]
    assert [b.status for b in backups] == ["verified", "verified"]
    etags = [storage.head_object(b.key)["etag"] for b in backups]

    line = RELEASE.decode().strip()
    for backup, shows_change, firmware in zip(backups, (False, True), ("bios", "uefi"), strict=True):
        # The test disk boots either way (an MBR with GRUB and an EFI system
        # partition): the second drill follows a preflight that says UEFI.
        Server.objects.filter(pk=backup.server_id).update(preflight={"ok": True, "boot_mode": firmware})
        started = drill_services.drill_start(user=backup.user, backup_id=backup.pk, probe_port=testing_disks.HTTP_PORT)
        drill = Drill.objects.get(pk=started.pk)
        assert (drill.status, drill.error) == ("passed", ""), drill.console_excerpt
        checks = {c["name"]: c["passed"] for c in drill.checks}
        assert all(checks.values()) and f"port {testing_disks.HTTP_PORT} answers" in " ".join(checks)
        assert drill.rto_seconds and drill.rto_seconds > 0
        assert (line in drill.console_excerpt) is shows_change  # which restore point booted
        assert drill.screenshot_key and storage.head_object(drill.screenshot_key)["size"] > 1000
        assert drill.torn_down and not drill_steps.work_dir(drill.pk).exists()
        assert drill.resources and all(r["removed"] for r in drill.resources), drill.resources
        assert storage.head_object(drill.report_key)["size"] > 1000
        assert storage.head_object(drill_steps.evidence_key(drill, "report.json"))["size"] > 100
        verdict = drill.steps.get(name="booting").outputs["verdict"]
        assert verdict["details"]["boot_mode"] == firmware
        with storage.ObjectReader(**_pinned(drill.evidence["console.log"])) as reader:
            console = reader.read().decode(errors="replace")
        # OVMF (EDK II) or SeaBIOS, never both.
        assert ("by EDK II" in console, "SeaBIOS" in console) == (firmware == "uefi", firmware == "bios")
    # The stored restore points were only read.
    assert [storage.head_object(b.key)["etag"] for b in backups] == etags


def _pinned(record: dict) -> dict:
    return {"key": record["key"], "version_id": record["version_id"]}
