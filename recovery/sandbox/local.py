"""The local sandbox: boot a raw disk file in QEMU on this machine, isolated, then tear it down.

One run is one ``qemu-system-x86_64`` process in its own process group:

- the disk as NVMe (how EC2 presents EBS), opened with ``snapshot=on``: the
  guest's writes go to a temporary overlay in the run's folder and the raw
  file is opened read-only, so the restore point is never written;
- SeaBIOS (``bios``, its messages mirrored to the serial port) or OVMF
  (``uefi``, with a private copy of the variable store);
- KVM only when :func:`kvm_works` (a tiny guest under KVM printed its line
  within a timeout), TCG otherwise: on nested virtualisation ``/dev/kvm``
  may exist and hang the guest;
- no network but QEMU's user-mode networking with ``restrict=on`` (the guest
  reaches neither the host's networks nor the internet) and, when a port is
  probed, that guest port forwarded to a free port on 127.0.0.1;
- the serial console written to ``console.log``; a screenshot through QMP
  ``screendump`` (PNG, QEMU's own encoder);
- a hard time limit; teardown always (QMP ``quit``, then SIGKILL to the
  process group), the run's folder removed, evidence copied out first.

A worker that is SIGKILLed cannot tear down, so two things stand in for it:
QEMU is started with ``PR_SET_PDEATHSIG`` = SIGKILL (the kernel kills it
when the thread that started it dies), and each run leaves a lease
(``lease.json`` in its folder under ``state_dir``: the owner's and QEMU's
pid and start time, the deadline) that :meth:`LocalSandbox.reap` -- called
at the start of every run and meant for a periodic job -- honours: a run
whose owner is gone or whose deadline has passed has its QEMU killed and
its folder removed.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import time
import uuid
import zlib
from functools import lru_cache
from pathlib import Path

from . import verdict as judge
from .base import BootRequest, Check, Sandbox, SandboxError, Verdict

QEMU = "qemu-system-x86_64"
OVMF_CODE = ("/usr/share/OVMF/OVMF_CODE_4M.fd", "/usr/share/OVMF/OVMF_CODE.fd")
OVMF_VARS = ("/usr/share/OVMF/OVMF_VARS_4M.fd", "/usr/share/OVMF/OVMF_VARS.fd")
TEARDOWN_GRACE = 60.0  # a lease outlives its deadline by this much before reap() ends it
KVM_PROBE_TIMEOUT = 6.0  # KVM runs the probe guest in well under a second; a hung one never
CPU = "max"  # every feature the accelerator offers; the KVM probe uses the same model
_PR_SET_PDEATHSIG = 1


def default_state_dir() -> Path:
    """Where runs keep their folders and leases: ``$TMPDIR/reclo-sandbox``."""
    return Path(tempfile.gettempdir()) / "reclo-sandbox"


_prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up here: the child must not load libraries


def _die_with_parent() -> None:  # runs in the child between fork and exec
    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def _start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (to tell a reused pid apart), or None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def _alive(pid: int | None, started: int | None) -> bool:
    return pid is not None and pid > 0 and started is not None and _start_time(pid) == started


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _opt(path) -> str:
    """A path as a QEMU option value: a comma would end it, so commas are doubled."""
    return str(path).replace(",", ",,")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# The probe guest: two sectors on an NVMe disk, as the drill boots one. The
# boot sector reads the second sector through the BIOS (SeaBIOS's NVMe
# driver), switches to 32-bit protected mode and jumps there; that code
# writes _PROBE_LINE to COM1 and halts. On this kind of host a boot sector
# that only writes to COM1 in real mode runs under nested KVM while GRUB
# hangs right after "GRUB loading.", so the probe must go as far as this.
# Source (GNU as, --32; ld -Ttext 0 --oformat binary):
#   .code16: cli; xor %ax,%ax; mov %ax,%ds/%es/%ss; mov $0x7c00,%sp; sti
#            mov $0x0201,%ax; mov $2,%cx; xor %dh,%dh; mov $0x7e00,%bx; int $0x13; jc fail
#            cli; lgdtl gdtr; cr0 |= 1; ljmpl $8,$pm32      fail: hlt; jmp fail
#   .code32: pm32: mov $0x10,%ax; mov %ax,%ds/%es/%ss; mov $0x7e00,%eax; jmp *%eax
#   gdt: null, flat code 0x00cf9a000000ffff, flat data 0x00cf92000000ffff; gdtr: .word 23, .long gdt
#   sector 2: mov $0x3f8,%dx; mov $msg,%esi; cld; 1: lodsb; test %al,%al; jz 2f; out %al,%dx; jmp 1b
#             2: cli; hlt; jmp 2b     msg: "RECLO-ACCEL-OK\r\n\0"
_PROBE_LINE = b"RECLO-ACCEL-OK"
_PROBE_BOOT = bytes.fromhex(
    "fa31c08ed88ec08ed0bc007cfbb80102b9020030f6bb007ecd137217fa660f0116607c0f20c00c010f22c066ea367c00000800"
    "f4ebfd66b810008ed88ec08ed0b8007e0000ffe0900000000000000000ffff0000009acf00ffff00000092cf001700487c"
)
_PROBE_PM = bytes.fromhex("66baf803be167e0000fcac84c07403eeebf8faf4ebfc") + _PROBE_LINE + b"\r\n\0"


def _probe_disk() -> bytes:
    """The probe guest's 1 MiB disk (SeaBIOS ignores an NVMe disk much smaller than that)."""
    boot = _PROBE_BOOT + bytes(510 - len(_PROBE_BOOT)) + b"\x55\xaa"
    return boot + _PROBE_PM + bytes(1024 * 1024 - len(boot) - len(_PROBE_PM))


def accel_works(accel: str, *, timeout: float = KVM_PROBE_TIMEOUT) -> bool:
    """Whether QEMU with ``accel`` (``kvm`` or ``tcg``) runs a tiny guest to its line within ``timeout``."""
    if accel == "kvm" and not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False
    with tempfile.TemporaryDirectory(prefix="reclo-accel-") as tmp:
        disk = Path(tmp) / "probe.img"
        disk.write_bytes(_probe_disk())
        cmd = [QEMU, "-machine", "q35", "-accel", accel, "-cpu", CPU, "-m", "32", "-display", "none",
               "-nodefaults", "-no-user-config", "-drive", f"file={disk},format=raw,if=none,id=disk0,snapshot=on",
               "-device", "nvme,drive=disk0,serial=probe,bootindex=0",
               "-serial", "stdio", "-monitor", "none"]  # fmt: skip
        try:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                    start_new_session=True, preexec_fn=_die_with_parent)  # fmt: skip
        except OSError:
            return False
        stdout = proc.stdout
        assert stdout is not None  # stdout=PIPE
        try:
            deadline = time.monotonic() + timeout
            out = b""
            os.set_blocking(stdout.fileno(), False)
            while time.monotonic() < deadline and _PROBE_LINE not in out and proc.poll() is None:
                time.sleep(0.05)
                out += stdout.read() or b""
            return _PROBE_LINE in out
        finally:
            _kill_group(proc.pid)
            proc.wait()
            stdout.close()


@lru_cache(maxsize=1)
def choose_accel() -> str:
    """``kvm`` when it really runs a guest here, else ``tcg``; ``RECLO_SANDBOX_ACCEL`` forces one.

    Probed once per process (about a second under TCG; up to
    ``KVM_PROBE_TIMEOUT`` when KVM hangs).
    """
    forced = os.environ.get("RECLO_SANDBOX_ACCEL", "").strip().lower()
    if forced in ("kvm", "tcg"):
        return forced
    return "kvm" if accel_works("kvm") else "tcg"


def ppm_to_png(ppm: bytes) -> bytes:
    """A binary PPM (P6, 8-bit, what QEMU's screendump writes) as an RGB PNG."""
    fields: list[bytes] = []
    pos = 0
    while len(fields) < 4:  # magic, width, height, maxval, separated by whitespace and # comments
        while ppm[pos : pos + 1].isspace() or ppm[pos : pos + 1] == b"#":
            if ppm[pos : pos + 1] == b"#":
                pos = ppm.index(b"\n", pos)
            pos += 1
        end = pos
        while not ppm[end : end + 1].isspace():
            end += 1
        fields.append(ppm[pos:end])
        pos = end
    if fields[0] != b"P6" or fields[3] != b"255":
        raise ValueError("not an 8-bit binary PPM")
    width, height = int(fields[1]), int(fields[2])
    pixels = ppm[pos + 1 : pos + 1 + width * height * 3]
    if len(pixels) != width * height * 3:
        raise ValueError("PPM pixel data is cut short")
    stride = width * 3
    raw = b"".join(b"\0" + pixels[y * stride : (y + 1) * stride] for y in range(height))

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b"")


class _QMP:
    """QEMU's machine protocol over its unix socket: JSON lines, commands answered in order."""

    def __init__(self, path: Path, timeout: float = 10.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self.file = self.sock.makefile("rb")
        self._read()  # the greeting
        self.command("qmp_capabilities")

    def _read(self) -> dict:
        while True:
            line = self.file.readline()
            if not line:
                raise ConnectionError("QEMU closed its QMP socket")
            message = json.loads(line)
            if "event" not in message:
                return message

    def command(self, name: str, **arguments) -> dict:
        request = {"execute": name, **({"arguments": arguments} if arguments else {})}
        self.sock.sendall(json.dumps(request).encode() + b"\n")
        reply = self._read()
        if "error" in reply:
            raise SandboxError(f"QMP {name}: {reply['error'].get('desc')}")
        return reply.get("return", {})

    def close(self) -> None:
        self.file.close()
        self.sock.close()


class LocalSandbox(Sandbox):
    """Boots a raw disk file in QEMU on this machine. See the module docstring."""

    name = "local"

    def __init__(self, state_dir: Path | None = None, *, accel: str | None = None) -> None:
        self.state_dir = Path(state_dir) if state_dir else default_state_dir()
        self._accel = accel

    @property
    def accel(self) -> str:
        return self._accel or choose_accel()

    # -- leases ------------------------------------------------------------

    def reap(self) -> list[str]:
        """Kill the QEMU and remove the folder of every run whose owner died or whose deadline passed."""
        removed: list[str] = []
        if not self.state_dir.is_dir():
            return removed
        now = time.time()
        for run_dir in sorted(self.state_dir.glob("run-*")):
            try:
                lease = json.loads((run_dir / "lease.json").read_text())
            except (OSError, ValueError):
                lease = None
            if lease is None:
                # A folder without a lease: a run that died while starting,
                # or one being set up right now; leave fresh ones alone.
                try:
                    if now - run_dir.stat().st_mtime < TEARDOWN_GRACE:
                        continue
                except OSError:
                    continue
            else:
                owner_alive = _alive(lease.get("owner_pid"), lease.get("owner_started"))
                if owner_alive and now < lease.get("deadline", 0) + TEARDOWN_GRACE:
                    continue
                if _alive(lease.get("qemu_pid"), lease.get("qemu_started")):
                    _kill_group(lease["qemu_pid"])
            shutil.rmtree(run_dir, ignore_errors=True)
            removed.append(f"{run_dir.name} ({lease.get('label') if lease else 'no lease'})")
        return removed

    def _write_lease(self, run_dir: Path, **fields) -> None:
        tmp = run_dir / "lease.json.tmp"
        tmp.write_text(json.dumps(fields))
        tmp.replace(run_dir / "lease.json")

    # -- one run -----------------------------------------------------------

    def _command(self, disk: Path, request: BootRequest, run_dir: Path, host_port: int | None) -> list[str]:
        accel = self.accel
        qdisk, qdir = _opt(disk), _opt(run_dir)
        cmd = [
            QEMU, "-name", f"reclo-sandbox:{request.label}",
            "-machine", "q35", "-accel", accel, "-cpu", CPU,
            "-smp", "1", "-m", str(request.memory_mib),
            "-nodefaults", "-no-user-config", "-display", "none", "-vga", "std",
            "-drive", f"file={qdisk},format=raw,if=none,id=disk0,snapshot=on",
            "-device", "nvme,drive=disk0,serial=reclo-drill,bootindex=0",
            "-chardev", f"file,id=console,path={qdir}/console.log", "-serial", "chardev:console",
            "-qmp", f"unix:{qdir}/qmp.sock,server=on,wait=off",
            "-no-reboot", "-boot", "strict=on",
        ]  # fmt: skip
        netdev = "user,id=net0,restrict=on"
        if host_port is not None:
            netdev += f",hostfwd=tcp:127.0.0.1:{host_port}-:{request.probe_port}"
        # No option ROM: no iPXE, so the machine can never boot from the network.
        cmd += ["-netdev", netdev, "-device", "e1000e,netdev=net0,romfile="]
        if request.boot_mode == "uefi":
            code = next((p for p in OVMF_CODE if Path(p).exists()), None)
            varstore = next((p for p in OVMF_VARS if Path(p).exists()), None)
            if code is None or varstore is None:
                raise SandboxError("UEFI boot needs OVMF (apt-get install ovmf)")
            shutil.copy(varstore, run_dir / "ovmf_vars.fd")
            cmd += ["-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={_opt(code)}",
                    "-drive", f"if=pflash,format=raw,unit=1,file={qdir}/ovmf_vars.fd"]  # fmt: skip
        else:
            # SeaBIOS mirrors its screen to this serial port, so "No bootable
            # device" reaches the console log.
            (run_dir / "sercon-port").write_bytes((0x3F8).to_bytes(2, "little"))
            cmd += ["-fw_cfg", f"name=etc/sercon-port,file={qdir}/sercon-port"]
        return cmd

    def run(self, source, request: BootRequest) -> Verdict:
        """Boot the raw disk file ``source``, judge it, tear down; see :class:`~.base.Sandbox`."""
        disk = Path(source)
        started = time.monotonic()
        if shutil.which(QEMU) is None:
            raise SandboxError(f"{QEMU} is not installed (apt-get install qemu-system-x86)")
        if not disk.is_file():
            raise SandboxError(f"no disk file at {disk}")
        self.reap()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        run_dir = self.state_dir / f"run-{uuid.uuid4().hex[:12]}"
        if len(str(run_dir / "qmp.sock")) > 100:  # sun_path holds 108 bytes
            raise SandboxError(f"state_dir {self.state_dir} is too deep for QEMU's control socket")
        run_dir.mkdir()
        evidence = Path(request.evidence_dir)
        evidence.mkdir(parents=True, exist_ok=True)
        proc = None
        try:
            host_port = free_port() if request.probe_port else None
            cmd = self._command(disk, request, run_dir, host_port)
            deadline = time.time() + request.time_limit
            me = os.getpid()
            self._write_lease(run_dir, label=request.label, owner_pid=me, owner_started=_start_time(me),
                              deadline=deadline, qemu_pid=None, qemu_started=None)  # fmt: skip
            stderr = open(run_dir / "qemu.stderr", "wb")  # noqa: SIM115 - closed in finally
            try:
                proc = subprocess.Popen(
                    cmd, stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr, cwd=run_dir,
                    env={**os.environ, "TMPDIR": str(run_dir)},  # snapshot=on's overlay lives here
                    start_new_session=True, preexec_fn=_die_with_parent,
                )  # fmt: skip
            finally:
                stderr.close()
            self._write_lease(run_dir, label=request.label, owner_pid=me, owner_started=_start_time(me),
                              deadline=deadline, qemu_pid=proc.pid, qemu_started=_start_time(proc.pid))  # fmt: skip
            powered_on = time.monotonic()
            return self._judge(proc, request, run_dir, evidence, host_port, started, powered_on)
        finally:
            if proc is not None:
                self._stop(proc, run_dir)
            shutil.rmtree(run_dir, ignore_errors=True)

    def _judge(self, proc, request, run_dir, evidence, host_port, started, powered_on) -> Verdict:
        limit_at = powered_on + request.time_limit
        log = run_dir / "console.log"
        text, match, stopped = "", None, None
        while True:
            try:
                text = judge.clean(log.read_bytes().decode("utf-8", "replace"))
            except FileNotFoundError:
                text = ""
            match = judge.scan(text, request.ready_patterns, request.failure_patterns)
            if match is not None:
                if match.kind == "failure":
                    # A panic's next lines (the call trace, "end Kernel
                    # panic") belong in the excerpt: give them a moment.
                    time.sleep(1)
                    text = judge.clean(log.read_bytes().decode("utf-8", "replace"))
                    match = judge.scan(text, request.ready_patterns, request.failure_patterns)
                break
            code = proc.poll()
            if code is not None:
                stopped = f"the machine stopped (QEMU exited with {code}) before it was ready"
                if code != 0:
                    err = (run_dir / "qemu.stderr").read_text(errors="replace").strip()
                    if err and not text.strip():
                        raise SandboxError(f"QEMU could not start the machine: {err[-500:]}")
                break
            if time.monotonic() >= limit_at:
                break
            time.sleep(0.25)
        booted = time.monotonic()
        boot_seconds = booted - powered_on
        checks: list[Check] = [
            judge.boot_check(match, boot_seconds=boot_seconds, stopped=stopped, time_limit=request.time_limit)
        ]
        ready = match is not None and match.kind == "ready"
        answered_at = booted if ready else None
        if request.probe_port:
            name = judge.port_check_name(request.probe_port)
            if ready:
                ok, detail, when = judge.probe_until("127.0.0.1", host_port, request.probe_port, limit_at)
                checks.append(Check(name, ok, f"{detail} after {when - powered_on:.0f} s" if ok else detail))
                answered_at = when if ok else None
            else:
                checks.append(Check(name, False, "not probed: the system did not come up"))
        answered_after = answered_at - powered_on if answered_at is not None else None
        checks.append(judge.limit_check(answered_after, request.time_limit))

        screenshot = None
        if proc.poll() is None:
            screenshot = self._screenshot(run_dir, evidence)
        checked = time.monotonic()
        # The console as it stands after the checks, for the evidence.
        try:
            raw = log.read_bytes()
        except FileNotFoundError:
            raw = b""
        console_path = evidence / "console.log"
        console_path.write_bytes(raw)
        return Verdict.judged(
            checks,
            console_excerpt=judge.excerpt(text, match),
            console_path=console_path,
            screenshot_path=screenshot,
            moments=(started, powered_on, booted, checked),
            answered_after=answered_after,
            sandbox=self.name,
            details={
                "accel": self.accel,
                "boot_mode": request.boot_mode,
                "matched": match.pattern.name if match else None,
            },
        )

    def _screenshot(self, run_dir: Path, evidence: Path) -> Path | None:
        target = evidence / "screenshot.png"
        try:
            qmp = _QMP(run_dir / "qmp.sock")
            try:
                try:
                    qmp.command("screendump", filename=str(target), format="png")
                except SandboxError:
                    # A QEMU built without libpng (or before 7.1) writes only PPM.
                    ppm = run_dir / "screen.ppm"
                    qmp.command("screendump", filename=str(ppm))
                    target.write_bytes(ppm_to_png(ppm.read_bytes()))
            finally:
                qmp.close()
        except (OSError, SandboxError, ValueError):
            return None
        return target if target.exists() and target.stat().st_size else None

    def _stop(self, proc: subprocess.Popen, run_dir: Path) -> None:
        if proc.poll() is None:
            try:
                qmp = _QMP(run_dir / "qmp.sock", timeout=3)
                try:
                    qmp.command("quit")
                finally:
                    qmp.close()
                proc.wait(timeout=5)
            except (OSError, SandboxError, ValueError, subprocess.TimeoutExpired):
                pass
        # The whole group, whatever QMP said: nothing of the run may outlive it.
        _kill_group(proc.pid)
        proc.wait()
