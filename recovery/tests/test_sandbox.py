"""The local drill sandbox against real guests: a Debian disk that boots, one that panics, random data.

Each disk is booted once (module-scoped fixtures) and every check reads the
same verdict. The guests run under TCG unless KVM really works here; the
whole module takes about two minutes on a loaded 2-core machine.
"""

import hashlib
import io
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import pytest
from reclo_agent import vhd

from backups.tests import vhds
from reclo_site import testing, testing_disks
from recovery.sandbox import BootRequest, LocalSandbox, SandboxError, accel_works, choose_accel, materialise_chain
from recovery.sandbox import verdict as judge

BOOT_CHECK = "reached a login prompt or the system's ready line"
TOOLS = ["qemu-system-x86_64", "grub-mkimage", "mformat", "mcopy", "sfdisk", "mkfs.ext4", "apt-get", "modinfo"]


@pytest.fixture(scope="module")
def disks():
    for tool in TOOLS:
        testing.require_tool(tool)
    try:
        return testing_disks.test_disks()
    except testing_disks.BootDiskError as exc:
        if testing.IN_CI:
            pytest.fail(f"could not build the test disks: {exc}", pytrace=False)
        pytest.skip(f"could not build the test disks: {exc}")


@pytest.fixture(scope="module")
def state_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("sandbox-state")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def sandbox_processes(label: str) -> list[int]:
    """Pids of QEMU processes of the run named ``label`` (QEMU's -name carries it)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes()
            except OSError:
                continue
            if f"reclo-sandbox:{label}".encode() in cmdline:
                pids.append(int(proc.name))
    return pids


class WritingSandbox(LocalSandbox):
    """The local sandbox, plus a write through QEMU's block layer to the disk before the screenshot.

    Proves the raw file is never written even when the guest writes (the
    test disk's guest mounts its root read-only and would not). ``qemu-io``
    prints to QEMU's stdout, which the sandbox keeps in ``qemu.stderr``.
    """

    qemu_io_output = ""
    overlay = ""

    def _screenshot(self, run_dir, evidence):
        from recovery.sandbox.local import _QMP

        qmp = _QMP(run_dir / "qmp.sock")
        try:
            for command in ('qemu-io disk0 "write -P 0xab 0 1M"', 'qemu-io disk0 "read -P 0xab 0 1M"'):
                qmp.command("human-monitor-command", **{"command-line": command})
            self.overlay = json.loads(qmp.command("query-block")[0]["inserted"]["image"]["filename"][5:])
            # QEMU's own PPM of the same screen, for the fallback converter.
            qmp.command("screendump", filename=str(run_dir / "screen-test.ppm"))
            self.ppm = (run_dir / "screen-test.ppm").read_bytes()
        finally:
            qmp.close()
        self.qemu_io_output = (run_dir / "qemu.stderr").read_text()
        self.run_dir = run_dir
        return super()._screenshot(run_dir, evidence)


RELEASE = b"ReClo drill test disk, incremental 1\n"


@pytest.fixture(scope="module")
def materialised(disks, tmp_path_factory):
    """The good disk backed up (a full, then an incremental after changing a file inside), read back
    through the chain reader into a sparse raw file; (raw path, bytes written, the changed disk)."""
    work = tmp_path_factory.mktemp("materialised")
    changed = work / "changed.raw"
    shutil.copy(disks.good, changed)
    testing_disks.replace_file(changed, "/etc/reclo-release", RELEASE)
    old, new = disks.good.read_bytes(), changed.read_bytes()
    base, base_info = vhds.full(old)
    top, _ = vhds.incremental(old, new, base_info)
    raw = work / "disk.raw"
    written = materialise_chain(vhd.open_chain([vhd.open_seekable(io.BytesIO(o)) for o in (base, top)]), raw)
    return raw, written, changed


@pytest.fixture(scope="module")
def good_bios(materialised, state_dir, tmp_path_factory):
    raw = materialised[0]
    before = sha256(raw)
    sandbox = WritingSandbox(state_dir)  # accelerator: probed, as in production
    request = BootRequest(
        evidence_dir=tmp_path_factory.mktemp("evidence-good"), probe_port=testing_disks.HTTP_PORT,
        time_limit=300, label="test-good-bios",
    )  # fmt: skip
    verdict = sandbox.run(raw, request)
    return verdict, sandbox, raw, before


@pytest.fixture(scope="module")
def panics(disks, state_dir, tmp_path_factory):
    request = BootRequest(evidence_dir=tmp_path_factory.mktemp("evidence-panics"), time_limit=300, label="test-panics")
    return LocalSandbox(state_dir).run(disks.panics, request)


@pytest.fixture(scope="module")
def random_disk(disks, state_dir, tmp_path_factory):
    # A comma in the path: QEMU's option syntax needs it doubled.
    disk = tmp_path_factory.mktemp("random") / "random,data.raw"
    shutil.copy(disks.random, disk)
    request = BootRequest(evidence_dir=tmp_path_factory.mktemp("evidence-random"), time_limit=120, label="test-random")
    return LocalSandbox(state_dir).run(disk, request)


def check(verdict, name):
    found = [c for c in verdict.checks if c.name == name]
    assert found, f"no check named {name!r} in {verdict.checks}"
    return found[0]


def png_size(path: Path) -> tuple[int, int]:
    """Width and height of a PNG after checking its chunks' CRCs and inflating its pixels."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, header = 8, b"", None
    while pos < len(data):
        (length,), kind = struct.unpack(">I", data[pos : pos + 4]), data[pos + 4 : pos + 8]
        body = data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert zlib.crc32(kind + body) == crc, f"bad CRC in {kind!r}"
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    width, height, depth, colour = header[:4]
    channels = {0: 1, 2: 3, 4: 2, 6: 4}[colour]
    assert len(zlib.decompress(idat)) == height * (1 + width * channels * depth // 8)
    return width, height


# -- the disk the drill boots --------------------------------------------


def test_materialised_disk_is_the_backed_up_disk_with_holes(materialised):
    raw, written, changed = materialised
    assert sha256(raw) == sha256(changed)
    # Blocks no VHD layer stores were never written: they are holes.
    assert written < raw.stat().st_size
    assert raw.stat().st_blocks * 512 <= written + 1024 * 1024


def test_replace_file_changes_only_that_file(disks, materialised):
    changed = materialised[2]
    assert testing_disks.read_file(changed, "/etc/reclo-release") == RELEASE
    assert testing_disks.read_file(changed, "/srv/www/index.html") == testing_disks.read_file(
        disks.good, "/srv/www/index.html"
    )
    assert subprocess.run(["e2fsck", "-fn", f"{changed}?offset={testing_disks.ROOT_START * 512}"],
                          capture_output=True).returncode == 0  # fmt: skip


# -- a disk that boots ----------------------------------------------------


def test_good_disk_passes_every_check(good_bios):
    verdict = good_bios[0]
    assert verdict.passed, verdict.reason + "\n" + verdict.console_excerpt
    assert [c.name for c in verdict.checks] == [BOOT_CHECK, "port 80 answers", "answered within the time limit"]
    assert all(c.passed for c in verdict.checks)
    assert verdict.reason == ""
    assert "reclo-test: ready" in check(verdict, BOOT_CHECK).detail


def test_good_disk_console_shows_the_login_prompt(good_bios):
    verdict = good_bios[0]
    console = judge.clean(verdict.console_path.read_text(errors="replace"))
    assert "reclo-initramfs: root is /dev/nvme0n1p2" in console  # booted from NVMe, as on EC2
    assert f"reclo-test: {RELEASE.decode().strip()}" in console  # the incremental's file, not the full's
    assert "reclo-test login:" in console


def test_good_disk_port_answers(good_bios):
    detail = check(good_bios[0], "port 80 answers").detail
    assert detail.startswith("answered")


def test_good_disk_screenshot_is_a_png(good_bios):
    verdict = good_bios[0]
    assert verdict.screenshot_path.name == "screenshot.png"
    width, height = png_size(verdict.screenshot_path)
    assert width >= 640 and height >= 400


def test_qemus_ppm_screendump_converts_to_the_same_size_png(good_bios, tmp_path):
    from recovery.sandbox.local import ppm_to_png

    png = tmp_path / "from-ppm.png"
    png.write_bytes(ppm_to_png(good_bios[1].ppm))
    assert png_size(png) == png_size(good_bios[0].screenshot_path)


def test_ppm_screenshots_become_valid_pngs(tmp_path):
    from recovery.sandbox.local import ppm_to_png

    width, height = 5, 3
    pixels = b"".join(bytes((x * 40, y * 80, 200)) for y in range(height) for x in range(width))
    png = tmp_path / "shot.png"
    png.write_bytes(ppm_to_png(b"P6\n# QEMU\n5 3\n255\n" + pixels))
    assert png_size(png) == (5, 3)
    assert zlib.decompress(_idat(png.read_bytes()))[1:16] == pixels[:15]  # first row, after its filter byte
    with pytest.raises(ValueError):
        ppm_to_png(b"P5\n5 3\n255\n" + bytes(15))


def _idat(data: bytes) -> bytes:
    at = data.index(b"IDAT")
    (length,) = struct.unpack(">I", data[at - 4 : at])
    return data[at + 4 : at + 4 + length]


def test_good_disk_timings_and_json(good_bios):
    verdict = good_bios[0]
    timings = verdict.timings
    assert set(timings) == {"prepare", "boot", "checks", "total"}
    assert 0 < timings["boot"] < timings["total"]
    assert timings["total"] >= timings["prepare"] + timings["boot"] + timings["checks"] - 0.01
    assert 0 < verdict.answered_after <= 300
    assert verdict.details["accel"] in ("kvm", "tcg")
    facts = json.loads(json.dumps(verdict.as_dict()))
    assert facts["checks"][0] == {"name": BOOT_CHECK, "passed": True, "detail": check(verdict, BOOT_CHECK).detail}


def test_the_disk_file_is_never_written(good_bios):
    verdict, sandbox, raw, before = good_bios
    # A megabyte went through QEMU's block layer and reads back...
    assert "wrote 1048576/1048576 bytes at offset 0" in sandbox.qemu_io_output
    assert "read 1048576/1048576 bytes at offset 0" in sandbox.qemu_io_output
    assert "Pattern verification failed" not in sandbox.qemu_io_output
    # ...into a copy-on-write overlay in the run's folder, over the raw file...
    assert sandbox.overlay["backing"]["file"]["filename"] == str(raw)
    assert Path(sandbox.overlay["file"]["filename"]).parent == sandbox.run_dir
    # ...and not into the file.
    assert sha256(raw) == before


def test_teardown_leaves_no_process_and_no_files(good_bios, state_dir):
    assert sandbox_processes("test-good-bios") == []
    assert list(state_dir.iterdir()) == []
    # Only the evidence is kept.
    evidence = good_bios[0].console_path.parent
    assert sorted(p.name for p in evidence.iterdir()) == ["console.log", "screenshot.png"]


def test_good_disk_boots_under_uefi(disks, state_dir, tmp_path):
    request = BootRequest(evidence_dir=tmp_path, boot_mode="uefi", time_limit=300, label="test-good-uefi")
    verdict = LocalSandbox(state_dir).run(disks.good, request)
    assert verdict.passed, verdict.reason + "\n" + verdict.console_excerpt
    assert [c.name for c in verdict.checks] == [BOOT_CHECK, "answered within the time limit"]
    # OVMF (EDK II) handed the kernel its EFI tables; SeaBIOS never ran.
    console = verdict.console_path.read_text(errors="replace")
    assert "by EDK II" in console and "SeaBIOS" not in console
    assert "reclo-test: ready" in console
    assert sandbox_processes("test-good-uefi") == [] and list(state_dir.iterdir()) == []


# -- disks that do not boot -------------------------------------------------


def test_panicking_kernel_fails_with_the_panic_as_reason(panics, state_dir):
    assert not panics.passed
    boot = check(panics, BOOT_CHECK)
    assert not boot.passed
    assert boot.detail.startswith("no root file system:")
    assert panics.reason == boot.detail
    assert "Kernel panic - not syncing: VFS: Unable to mount root fs" in panics.console_excerpt
    assert not check(panics, "answered within the time limit").passed
    assert panics.answered_after is None
    assert sandbox_processes("test-panics") == [] and list(state_dir.iterdir()) == []


def test_random_disk_fails_with_the_firmware_message_as_reason(random_disk, state_dir):
    assert not random_disk.passed
    boot = check(random_disk, BOOT_CHECK)
    assert boot.detail.startswith("the firmware found nothing to boot:")
    assert "not a bootable disk" in random_disk.console_excerpt
    assert "No bootable device" in random_disk.reason or "not a bootable disk" in random_disk.reason
    assert sandbox_processes("test-random") == [] and list(state_dir.iterdir()) == []


def test_port_that_nothing_serves_fails(disks, state_dir, tmp_path):
    # The random disk never comes up, so the port check says it was not probed.
    request = BootRequest(evidence_dir=tmp_path, probe_port=3389, time_limit=60, label="test-random-port")
    verdict = LocalSandbox(state_dir).run(disks.random, request)
    port = check(verdict, "port 3389 answers")
    assert not port.passed and "did not come up" in port.detail


def test_missing_disk_is_a_sandbox_error(state_dir, tmp_path):
    testing.require_tool("qemu-system-x86_64")
    with pytest.raises(SandboxError, match="no disk file"):
        LocalSandbox(state_dir).run(tmp_path / "nothing.raw", BootRequest(evidence_dir=tmp_path))


def test_bad_requests_are_refused(tmp_path):
    with pytest.raises(ValueError, match="boot_mode"):
        BootRequest(evidence_dir=tmp_path, boot_mode="coreboot")
    with pytest.raises(ValueError, match="probe_port"):
        BootRequest(evidence_dir=tmp_path, probe_port=70000)
    with pytest.raises(ValueError, match="time_limit"):
        BootRequest(evidence_dir=tmp_path, time_limit=0)


# -- a killed worker ----------------------------------------------------------

KILLED_WORKER = """
import sys
from pathlib import Path
from recovery.sandbox import BootRequest, LocalSandbox
LocalSandbox(Path(sys.argv[1]), accel="tcg").run(
    Path(sys.argv[2]), BootRequest(evidence_dir=Path(sys.argv[3]), time_limit=300, label="test-killed"))
"""


def test_a_sigkilled_worker_leaves_nothing_behind(disks, tmp_path):
    state = tmp_path / "state"
    worker = subprocess.Popen([sys.executable, "-c", KILLED_WORKER, str(state), str(disks.good), str(tmp_path / "ev")],
                              cwd=testing.ROOT)  # fmt: skip
    try:

        def qemu_started():
            leases = list(state.glob("run-*/lease.json"))
            return leases and json.loads(leases[0].read_text()).get("qemu_pid")

        qemu_pid = testing.wait_until(qemu_started, timeout=60, what="the worker's QEMU")
        worker.send_signal(signal.SIGKILL)
        worker.wait()
        # PR_SET_PDEATHSIG: the kernel kills QEMU with its parent.
        testing.wait_until(lambda: not Path(f"/proc/{qemu_pid}").exists() or _zombie(qemu_pid), timeout=10,
                           what="QEMU to die with its worker")  # fmt: skip
        assert sandbox_processes("test-killed") == []
        # The folder stays until the next run (or a periodic job) reaps the lease.
        assert len(list(state.glob("run-*"))) == 1
        removed = LocalSandbox(state).reap()
        assert len(removed) == 1 and "test-killed" in removed[0]
        assert list(state.iterdir()) == []
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_reap_kills_the_qemu_of_a_dead_owner(disks, tmp_path):
    """A lease whose owner died but whose QEMU lives on (no PR_SET_PDEATHSIG, e.g. a reparented QEMU)."""
    from recovery.sandbox.local import _start_time

    state = tmp_path / "state"
    run_dir = state / "run-deadowner01"
    run_dir.mkdir(parents=True)
    gone = subprocess.Popen(["true"])
    gone.wait()
    qemu = subprocess.Popen(["qemu-system-x86_64", "-S", "-display", "none", "-nodefaults", "-name",
                             "reclo-sandbox:test-dead-owner"], start_new_session=True)  # fmt: skip
    try:
        testing.wait_until(lambda: _start_time(qemu.pid), what="qemu to start")
        lease = {"label": "test-dead-owner", "owner_pid": gone.pid, "owner_started": 1, "deadline": time.time() + 600,
                 "qemu_pid": qemu.pid, "qemu_started": _start_time(qemu.pid)}  # fmt: skip
        (run_dir / "lease.json").write_text(json.dumps(lease))
        removed = LocalSandbox(state).reap()
        assert removed == ["run-deadowner01 (test-dead-owner)"]
        assert qemu.wait(timeout=10) == -signal.SIGKILL
        assert list(state.iterdir()) == []
    finally:
        if qemu.poll() is None:
            qemu.kill()
            qemu.wait()


def test_reap_leaves_a_live_run_alone(tmp_path):
    state = tmp_path / "state"
    run_dir = state / "run-liveowner01"
    run_dir.mkdir(parents=True)
    from recovery.sandbox.local import _start_time

    me = os.getpid()
    lease = {"label": "live", "owner_pid": me, "owner_started": _start_time(me), "deadline": time.time() + 600,
             "qemu_pid": None, "qemu_started": None}  # fmt: skip
    (run_dir / "lease.json").write_text(json.dumps(lease))
    assert LocalSandbox(state).reap() == []
    assert run_dir.exists()


# -- the accelerator ----------------------------------------------------------


def test_accel_probe_guest_runs_under_tcg():
    testing.require_tool("qemu-system-x86_64")
    # The probe guest itself is sound, so "kvm does not work" means KVM, not the probe.
    assert accel_works("tcg")
    assert choose_accel() in ("kvm", "tcg")


def test_a_probe_guest_that_does_not_answer_within_the_timeout_means_no(monkeypatch):
    testing.require_tool("qemu-system-x86_64")
    # What a hung nested KVM looks like to the probe: no line in time. QEMU
    # alone takes longer than this to start, so even TCG "does not work".
    started = time.monotonic()
    assert accel_works("tcg", timeout=0.01) is False
    assert time.monotonic() - started < 10  # the guest was killed, not waited for


def test_the_sandbox_uses_kvm_only_when_the_probe_guest_ran_under_it(monkeypatch):
    testing.require_tool("qemu-system-x86_64")
    monkeypatch.delenv("RECLO_SANDBOX_ACCEL", raising=False)
    choose_accel.cache_clear()
    try:
        # On these machines /dev/kvm exists but nested KVM hangs the guest: the probe decides, not the device.
        assert choose_accel() == ("kvm" if accel_works("kvm") else "tcg")
        monkeypatch.setenv("RECLO_SANDBOX_ACCEL", "tcg")
        choose_accel.cache_clear()
        assert choose_accel() == "tcg"
    finally:
        choose_accel.cache_clear()


@pytest.mark.parametrize("mode", ["bios", "uefi"])
def test_the_firmware_is_the_one_the_boot_mode_names(mode, tmp_path):
    # The real boots are above (test_good_disk_passes_every_check, test_good_disk_boots_under_uefi).
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    request = BootRequest(evidence_dir=tmp_path, boot_mode=mode, label="test-firmware")
    cmd = " ".join(LocalSandbox(tmp_path, accel="tcg")._command(tmp_path / "disk.raw", request, run_dir, None))
    if mode == "uefi":
        assert "if=pflash,format=raw,unit=0,readonly=on,file=/usr/share/OVMF/OVMF_CODE" in cmd
        assert (run_dir / "ovmf_vars.fd").is_file() and "sercon-port" not in cmd
    else:
        assert "pflash" not in cmd and "name=etc/sercon-port" in cmd  # SeaBIOS, QEMU's default


# -- the verdict's parts --------------------------------------------------------


@pytest.mark.parametrize(
    ("console", "kind", "name"),
    [
        ("Debian GNU/Linux 12 web1 ttyS0\n\nweb1 login: ", "ready", "login prompt"),
        ("[  OK  ] Reached target Multi-User System.\n", "ready", "systemd reached its multi-user or graphical target"),
        ("[  OK  ] Reached target Local File Systems.\n", None, None),
        ("dracut-initqueue[301]: Warning: dracut-initqueue timeout - starting timeout scripts\n", "failure",
         "dracut timed out waiting for the root disk"),
        ("You are in emergency mode. After logging in, type \"journalctl -xb\"\n", "failure", "emergency mode"),
        ("Your PC ran into a problem\nStop code: INACCESSIBLE_BOOT_DEVICE\n", "failure",
         "Windows could not reach its boot disk (INACCESSIBLE_BOOT_DEVICE)"),
        ("Preparing Automatic Repair\n", "failure", "Windows started Automatic Repair"),
        ("BdsDxe: No bootable option or device was found.\n", "failure", "the firmware found nothing to boot"),
        ("Kernel panic - not syncing: Attempted to kill init!\n", "failure", "kernel panic"),
        ("\x1b[2J\x1b[0mweb1 login: \r", "ready", "login prompt"),
        ("web1 login: [   13.99] e1000e: eth0 NIC Link is Up\n", "ready", "login prompt"),
        ("pam_unix(login:session): session opened\n", None, None),
    ],
)  # fmt: skip
def test_console_patterns(console, kind, name):
    match = judge.scan(judge.clean(console), judge.READY_PATTERNS, judge.FAILURE_PATTERNS)
    if kind is None:
        assert match is None
    else:
        assert (match.kind, match.pattern.name) == (kind, name)


def test_the_earliest_line_decides():
    text = "Kernel panic - not syncing: VFS: Unable to mount root fs\nweb1 login: "
    assert judge.scan(text, judge.READY_PATTERNS, judge.FAILURE_PATTERNS).pattern.name == "no root file system"
    text = "web1 login: \n... later: emergency mode"
    assert judge.scan(text, judge.READY_PATTERNS, judge.FAILURE_PATTERNS).kind == "ready"


def test_excerpt_is_around_the_failure():
    lines = [f"line {n}" for n in range(100)] + ["Kernel panic - boom"] + [f"after {n}" for n in range(20)]
    text = "\n".join(lines)
    match = judge.scan(text, judge.READY_PATTERNS, judge.FAILURE_PATTERNS)
    out = judge.excerpt(text, match).split("\n")
    assert out[0] == "line 80" and "Kernel panic - boom" in out and out[-1] == "after 4"


def _serve(handler):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()

    def loop():
        conn, _ = server.accept()
        with conn:
            handler(conn)
        server.close()

    threading.Thread(target=loop, daemon=True).start()
    return server.getsockname()[1]


def test_probe_banner_service_answers():
    port = _serve(lambda conn: conn.sendall(b"SSH-2.0-OpenSSH_9.2\r\n"))
    assert judge.probe_once("127.0.0.1", port, 22) == (True, "answered with 21 bytes first")


def test_probe_rdp_service_answers_the_connection_request():
    def rdp(conn):
        request = conn.recv(64)
        if request == judge.RDP_CONNECTION_REQUEST:
            conn.sendall(bytes.fromhex("0300001302d00000123400020f080001000000"))

    port = _serve(rdp)
    ok, detail = judge.probe_once("127.0.0.1", port, 3389)
    assert ok and detail == "answered a probe with 19 bytes"


def test_probe_closed_or_silent_service_does_not_answer():
    port = _serve(lambda conn: None)  # accepts, then closes: what user-mode networking does with no guest service
    assert judge.probe_once("127.0.0.1", port, 8080) == (False, "the connection was closed without an answer")
    port = testing.free_port()
    ok, detail = judge.probe_once("127.0.0.1", port, 8080)
    assert not ok and detail.startswith("no answer")
