"""How a disk is read and what the restore point says about it: offline, crash, frozen, snapshot; hooks."""

import logging
import os
import signal
import subprocess
import threading

import pytest
from agent_helpers import FakePortal, make_image
from disk_images import attached_disk, run, write_synced
from moto import mock_aws
from reclo_agent import cli, consistency, freeze, lvm
from reclo_agent import source as source_module
from reclo_agent.backup import BackupOptions, BackupRun
from reclo_agent.errors import DiskError, Terminated, UsageError
from reclo_agent.hooks import HookFailed
from reclo_agent.mounts import Mount, mounts_of, parse_mountinfo
from reclo_agent.progress import Reporter
from reclo_agent.restore import restore

MiB = 1024 * 1024
QUIET = Reporter(quiet=True)


@pytest.fixture
def portal():
    with mock_aws():
        yield FakePortal()


def backup(portal, state, source, **kw):
    options = BackupOptions(source, "srv1", kw.pop("disk", "sda"), poll_interval=0.01, **kw)
    return BackupRun(portal, state, options, QUIET).run()


def still_frozen(mount) -> bool:
    """A second FIFREEZE answers EBUSY while the file system is frozen."""
    done = run("fsfreeze", "--freeze", str(mount), check=False)
    if done.returncode == 0:
        run("fsfreeze", "--unfreeze", str(mount))
        return False
    assert "busy" in done.stderr.lower(), done.stderr
    return True


def writable(mount, timeout: float = 10.0) -> bool:
    """Whether a write to ``mount`` finishes (it waits while frozen)."""
    done = threading.Event()

    def write():
        write_synced(mount / "probe.txt", b"probe")
        done.set()

    threading.Thread(target=write, daemon=True).start()
    return done.wait(timeout)


# --- offline and crash ------------------------------------------------------------------


def test_an_image_file_nobody_mounted_is_offline(portal, tmp_path, caplog):
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(make_image(4 * MiB)))
    with caplog.at_level(logging.WARNING, logger="reclo_agent"):
        result = backup(portal, tmp_path / "state", str(image))
    assert result.consistency == "offline"
    assert portal.backups[result.backup_id]["consistency"] == "offline"
    assert not [r for r in caplog.records if "crash-consistent" in r.getMessage()]


def test_a_mounted_disk_is_crash_consistent_and_the_agent_says_what_to_do(portal, tmp_path, caplog):
    with attached_disk(tmp_path, {"a.txt": b"a"}) as disk:
        assert [m.mount_point for m in mounts_of(disk.device)] == [str(disk.mount)]
        with caplog.at_level(logging.WARNING, logger="reclo_agent"):
            result = backup(portal, tmp_path / "state", disk.device)
        # The image file behind the loop device is in use too.
        assert [m.mount_point for m in mounts_of(str(disk.image))] == [str(disk.mount)]
        run("umount", str(disk.mount))
        try:
            unmounted = backup(portal, tmp_path / "state", disk.device, disk="sdb")
        finally:
            run("mount", disk.partition, str(disk.mount))
    assert result.consistency == "crash"
    assert portal.backups[result.backup_id]["consistency"] == "crash"
    lines = [r.getMessage() for r in caplog.records if "crash-consistent" in r.getMessage()]
    assert len(lines) == 1
    assert str(disk.mount) in lines[0] and "--freeze" in lines[0] and "LVM" in lines[0] and "--pre-hook" in lines[0]
    assert unmounted.consistency == "offline"


def test_mountinfo_parsing_unescapes_paths_and_finds_the_source():
    text = (
        "36 25 7:1 / /mnt/my\\040disk rw,relatime shared:1 - ext4 /dev/loop0p1 rw\n"
        "37 25 0:45 / /data rw - btrfs /dev/sdb2 rw,space_cache\n"
        "garbage line\n"
    )
    assert parse_mountinfo(text) == [
        Mount("7:1", "/mnt/my disk", "ext4", "/dev/loop0p1"),
        Mount("0:45", "/data", "btrfs", "/dev/sdb2"),
    ]


# --- frozen -------------------------------------------------------------------------------


def test_freeze_holds_the_file_systems_still_for_the_read_and_thaws(portal, tmp_path, monkeypatch):
    seen = []
    real_read = source_module.Source.read_at

    def spying_read(self, offset, length):
        if not seen:
            seen.append(still_frozen(disk.mount))
        return real_read(self, offset, length)

    monkeypatch.setattr(source_module.Source, "read_at", spying_read)
    with attached_disk(tmp_path, {"a.txt": b"a"}) as disk:
        write_synced(disk.mount / "b.bin", os.urandom(MiB))
        result = backup(portal, tmp_path / "state", disk.device, freeze=True)
        assert seen == [True]
        assert not still_frozen(disk.mount)
        assert writable(disk.mount)
        # What the frozen read stored is the disk as it was (nothing wrote since but the probe).
        restore(portal, result.backup_id, str(tmp_path / "out.img"), QUIET)
    assert result.consistency == "frozen"
    assert portal.backups[result.backup_id]["consistency"] == "frozen"
    check = subprocess.run(["e2fsck", "-fn", str(_partition_of(tmp_path / "out.img", tmp_path))],
                           capture_output=True, text=True)  # fmt: skip
    assert check.returncode == 0, check.stdout


def _partition_of(image, tmp_path):
    from disk_images import PART_START

    part = tmp_path / "out.part"
    part.write_bytes(image.read_bytes()[PART_START:])
    return part


def test_a_freeze_that_outlives_its_limit_thaws_and_stops_the_backup(portal, tmp_path, monkeypatch):
    real_read = source_module.Source.read_at

    def slow_read(self, offset, length):
        threading.Event().wait(0.3)
        return real_read(self, offset, length)

    monkeypatch.setattr(source_module.Source, "read_at", slow_read)
    with attached_disk(tmp_path, {}) as disk:
        with pytest.raises(DiskError, match="reached its limit of 1 s"):
            backup(portal, tmp_path / "state", disk.device, freeze=True, freeze_limit=1.0)
        assert not still_frozen(disk.mount)
        assert writable(disk.mount)


def test_sigterm_during_a_frozen_read_thaws(portal, tmp_path, monkeypatch):
    real_read = source_module.Source.read_at

    def read_then_terminate(self, offset, length):
        if offset >= 4 * MiB:
            os.kill(os.getpid(), signal.SIGTERM)
            threading.Event().wait(5)  # the main thread unwinds meanwhile
        return real_read(self, offset, length)

    monkeypatch.setattr(source_module.Source, "read_at", read_then_terminate)
    previous = signal.signal(signal.SIGTERM, cli._terminate)
    try:
        with attached_disk(tmp_path, {}) as disk:
            with pytest.raises(Terminated):
                backup(portal, tmp_path / "state", disk.device, freeze=True)
            assert not still_frozen(disk.mount)
            assert writable(disk.mount)
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_freeze_refuses_the_root_and_the_state_folders_file_system(tmp_path):
    with pytest.raises(UsageError, match="root file system"):
        freeze.check_freezable([Mount("8:1", "/", "ext4", "/dev/sda1")], str(tmp_path))
    with pytest.raises(UsageError, match="state folder"):
        freeze.check_freezable([Mount("8:2", str(tmp_path), "ext4", "/dev/sda2")], str(tmp_path))


def test_a_failed_freeze_thaws_what_it_froze(tmp_path):
    calls = []

    def ioctl(fd, request, arg):
        calls.append(request)
        if request == freeze.FIFREEZE and calls.count(freeze.FIFREEZE) == 2:
            raise OSError(95, "Operation not supported")

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    mounts = [Mount("7:1", str(tmp_path / "a"), "ext4", "/dev/x1"), Mount("7:2", str(tmp_path / "b"), "vfat", "x2")]
    with pytest.raises(DiskError, match="vfat cannot be frozen"):
        freeze.Freezer(mounts, ioctl=ioctl).freeze()
    assert calls == [freeze.FIFREEZE, freeze.FIFREEZE, freeze.FITHAW]


# --- hooks -----------------------------------------------------------------------------------


def test_hooks_run_around_the_read_with_the_backup_in_their_environment(portal, tmp_path):
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(make_image(4 * MiB)))
    log = tmp_path / "hooks.log"
    hook = f'echo "$RECLO_HOOK $RECLO_SERVER $RECLO_DISK $RECLO_READ_STATUS" >> {log}'
    result = backup(portal, tmp_path / "state", str(image), pre_hook=hook, post_hook=hook)
    assert result.status == "verified" and result.hook_error == ""
    assert log.read_text().splitlines() == ["pre srv1 sda ", "post srv1 sda ok"]


def test_a_failing_pre_hook_stops_the_backup_and_the_post_hook_still_runs(portal, tmp_path):
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(make_image(4 * MiB)))
    log = tmp_path / "hooks.log"
    with pytest.raises(HookFailed, match=r"pre-hook failed \(exit 3\).*database is locked"):
        backup(portal, tmp_path / "state", str(image), pre_hook="echo database is locked >&2; exit 3",
               post_hook=f'echo "post $RECLO_READ_STATUS" >> {log}')  # fmt: skip
    assert log.read_text() == "post failed\n"
    assert not [b for b in portal.backups.values() if b["status"] == "verified"]


def test_a_failing_post_hook_is_reported_and_the_restore_point_stands(portal, tmp_path):
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(make_image(4 * MiB)))
    result = backup(portal, tmp_path / "state", str(image), post_hook="exit 4")
    assert result.status == "verified"
    assert "post-hook failed (exit 4)" in result.hook_error


# --- LVM snapshots (commands as built: device-mapper is missing on these machines) ------------


class FakeLVM:
    """Answers lvs like LVM 2.03 does and records every command; ``fail`` makes one fail."""

    def __init__(self, *, free=100, leftovers=(), fail=None):
        self.commands = []
        self.free = free
        self.leftovers = list(leftovers)
        self.fail = fail

    def __call__(self, argv):
        self.commands.append(argv)
        if self.fail and argv[0] == self.fail:
            raise lvm.LVMError(f"{argv[0]} failed (exit 5): Insufficient free space")
        if argv[0] == "lvs" and "vg_name,lv_name,lv_size,vg_extent_size,vg_free_count" in argv:
            return f"  vg0|data|{256 * 4 * MiB}|{4 * MiB}|{self.free}\n"
        if argv[0] == "lvs":
            return "".join(f"  vg0|{name}|{origin}\n" for name, origin in [("data", ""), ("root", ""),
                                                                          *self.leftovers])  # fmt: skip
        return ""


VOLUME = lvm.Volume("vg0", "data", 256, 100)


def test_a_snapshot_is_taken_read_and_removed_in_that_order():
    fake = FakeLVM(leftovers=[("reclo-snap-data", "data"), ("reclo-snap-root", "root"), ("mine", "data")])
    with lvm.snapshot(VOLUME, fake) as path:
        assert path == "/dev/vg0/reclo-snap-data"
        during = list(fake.commands)
    assert during == [
        ["lvs", "--noheadings", "--separator", "|", "-o", "vg_name,lv_name,origin", "vg0"],
        ["lvremove", "--yes", "--force", "vg0/reclo-snap-data"],  # the killed run's leftover, not root's
        ["lvcreate", "--snapshot", "--name", "reclo-snap-data", "--extents", "100", "vg0/data"],
    ]
    assert fake.commands[len(during) :] == [["lvremove", "--yes", "--force", "vg0/reclo-snap-data"]]


@pytest.mark.parametrize("exc", [DiskError("read failed"), KeyboardInterrupt(), Terminated()])
def test_the_snapshot_is_removed_on_every_exit_path(exc):
    fake = FakeLVM()
    with pytest.raises(type(exc)):
        with lvm.snapshot(VOLUME, fake):
            raise exc
    assert fake.commands[-1] == ["lvremove", "--yes", "--force", "vg0/reclo-snap-data"]
    assert [c[0] for c in fake.commands] == ["lvs", "lvcreate", "lvremove"]


def test_a_failed_lvcreate_is_reported_and_cleaned_up():
    fake = FakeLVM(fail="lvcreate")
    with pytest.raises(lvm.LVMError, match="Insufficient free space"):
        with lvm.snapshot(VOLUME, fake):
            pytest.fail("the block must not run without a snapshot")
    assert [c[0] for c in fake.commands] == ["lvs", "lvcreate", "lvremove"]


def test_volume_info_and_snapshot_size():
    fake = FakeLVM(free=300)
    volume = lvm.volume_info("/dev/vg0/data", fake)
    assert fake.commands[0][:2] == ["lvs", "--noheadings"] and fake.commands[0][-1] == "/dev/vg0/data"
    assert volume == lvm.Volume("vg0", "data", 256, 300)
    assert lvm.snapshot_extents(volume) == 256  # never more than the volume itself
    assert not lvm.can_snapshot(lvm.Volume("vg0", "data", 256, 0))


def test_an_lvm_volume_in_use_is_read_from_a_snapshot(portal, tmp_path, monkeypatch):
    """The backup's path through the snapshot, with a plain image file standing in for the volume.

    Device-mapper is missing here, so "is an LVM volume" and "in use" are
    patched and the snapshot device is an image file; the commands are the
    real ones, recorded.
    """
    image = tmp_path / "lv.img"
    image.write_bytes(bytes(make_image(4 * MiB)))
    snap = tmp_path / "snap.img"
    snap.write_bytes(image.read_bytes())
    monkeypatch.setattr(consistency, "mounts_of", lambda *a, **k: [Mount("253:0", "/srv", "ext4", str(image))])
    monkeypatch.setattr(lvm, "is_logical_volume", lambda *a, **k: True)
    monkeypatch.setattr(lvm, "tools_present", lambda: True)
    monkeypatch.setattr(lvm.Volume, "snapshot_path", property(lambda self: str(snap)))
    fake = FakeLVM()
    options = BackupOptions(str(image), "srv1", "lv", poll_interval=0.01, pre_hook="true", post_hook="true")
    result = BackupRun(portal, tmp_path / "state", options, QUIET, lvm_run=fake).run()
    assert result.consistency == "snapshot"
    assert portal.backups[result.backup_id]["consistency"] == "snapshot"
    assert [c[0] for c in fake.commands] == ["lvs", "lvs", "lvcreate", "lvremove"]
    restore(portal, result.backup_id, str(tmp_path / "out.img"), QUIET)
    assert (tmp_path / "out.img").read_bytes() == snap.read_bytes()


def test_partitions_and_the_devices_built_on_them_count_as_the_disks(tmp_path):
    """sysfs as the kernel lays it out for sda with sda1 under LVM (dm-0): device-mapper is missing here."""
    from reclo_agent.mounts import related_devices

    sys_dir = tmp_path / "sys"
    sda = sys_dir / "devices" / "pci0000:00" / "block" / "sda"
    (sda / "sda1" / "holders").mkdir(parents=True)
    (sda / "sda2").mkdir()
    (sda / "queue").mkdir()  # not a partition
    (sda / "dev").write_text("8:0\n")
    for name, dev in (("sda1", "8:1"), ("sda2", "8:2")):
        (sda / name / "dev").write_text(dev + "\n")
        (sda / name / "partition").write_text(name[-1] + "\n")
    (sda / "sda1" / "holders" / "dm-0").mkdir()
    dm0 = sys_dir / "devices" / "virtual" / "block" / "dm-0"
    (dm0 / "holders").mkdir(parents=True)
    (dm0 / "dev").write_text("253:0\n")
    (sys_dir / "dev" / "block").mkdir(parents=True)
    (sys_dir / "class" / "block").mkdir(parents=True)
    for name, dev, target in (("sda", "8:0", sda), ("sda1", "8:1", sda / "sda1"), ("sda2", "8:2", sda / "sda2"),
                              ("dm-0", "253:0", dm0)):  # fmt: skip
        (sys_dir / "dev" / "block" / dev).symlink_to(target)
        (sys_dir / "class" / "block" / name).symlink_to(target)
    assert related_devices(os.makedev(8, 0), sys_dir=str(sys_dir)) == {"8:0", "8:1", "8:2", "253:0"}
    assert related_devices(os.makedev(8, 2), sys_dir=str(sys_dir)) == {"8:2"}
