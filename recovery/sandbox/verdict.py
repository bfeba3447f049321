"""Reading a boot: console patterns, the port probe, and the checks a person understands.

A boot is judged on its console text (serial port, firmware and boot loader
messages included): a *ready* pattern means the system came up (a login
prompt, systemd's multi-user target), a *failure* pattern means it will not
(a kernel panic, no root file system, dracut's timeout, emergency mode,
Windows' stop codes, no bootable device). Whichever is seen first decides;
neither within the time limit fails the boot. Then the optional port probe.
"""

from __future__ import annotations

import re
import socket
import time
from dataclasses import dataclass

from . import base


@dataclass(frozen=True)
class Pattern:
    """A console pattern with the words a person reads in the verdict."""

    name: str
    regex: re.Pattern


def _p(name: str, regex: str, flags: int = 0) -> Pattern:
    return Pattern(name, re.compile(regex, flags | re.MULTILINE))


READY_PATTERNS: tuple[Pattern, ...] = (
    # getty's prompt ("host login: ") ends its line, or a kernel message
    # ("[   14.0] ...") lands right after it.
    _p("login prompt", r"\blogin: *($|\[)"),
    _p(
        "systemd reached its multi-user or graphical target",
        r"Reached target .*(Multi-User System|Graphical Interface)",
    ),  # fmt: skip
    # The ReClo test disk's own ready line (reclo_site.testing_disks).
    _p("ready line", r"^reclo-test: ready\s*$"),
)

FAILURE_PATTERNS: tuple[Pattern, ...] = (
    _p("no root file system", r"VFS: Unable to mount root"),
    _p("kernel panic", r"Kernel panic"),
    _p("dracut timed out waiting for the root disk", r"dracut-initqueue.*timeout"),
    _p("emergency mode", r"emergency mode", re.IGNORECASE),
    _p("Windows could not reach its boot disk (INACCESSIBLE_BOOT_DEVICE)", r"INACCESSIBLE_BOOT_DEVICE"),
    _p("Windows started Automatic Repair", r"Automatic Repair"),
    _p("the firmware found nothing to boot", r"No bootable device|Boot failed: not a bootable disk"),
    _p("the firmware found nothing to boot", r"No bootable option or device was found"),
    _p("the boot loader could not find its disk", r"grub rescue>|error: no such device"),
)

_ANSI = re.compile(r"\x1b(\[[0-?]*[ -/]*[@-~]|[@-Z\\-_]|c)")


def clean(text: str) -> str:
    """Console text without terminal escapes and carriage returns, for matching and excerpts."""
    return _ANSI.sub("", text).replace("\r\n", "\n").replace("\r", "\n")


@dataclass(frozen=True)
class Match:
    """Where a pattern matched: ``kind`` is ``ready`` or ``failure``."""

    kind: str
    pattern: Pattern
    start: int
    end: int
    line: str


def scan(text: str, ready: tuple[Pattern, ...], failure: tuple[Pattern, ...]) -> Match | None:
    """The earliest ready or failure match in cleaned console ``text``."""
    # Earliest line first; on one line, failures before ready, then list order
    # (so "VFS: Unable to mount root" names a panic it causes).
    best, best_key = None, None
    for rank, (kind, pattern) in enumerate([("failure", p) for p in failure] + [("ready", p) for p in ready]):
        m = pattern.regex.search(text)
        if not m:
            continue
        line_start = text.rfind("\n", 0, m.start()) + 1
        if best_key is None or (line_start, rank) < best_key:
            line_end = text.find("\n", m.end())
            line = text[line_start : line_end if line_end >= 0 else len(text)].strip()
            best, best_key = Match(kind, pattern, m.start(), m.end(), line), (line_start, rank)
    return best


def excerpt(text: str, match: Match | None, *, before: int = 20, after: int = 5, limit: int = 4000) -> str:
    """The console lines that explain the outcome: around ``match``, else the last lines."""
    lines = text.split("\n")
    if match is None:
        chosen = lines[-(before + after) :]
    else:
        at = text.count("\n", 0, match.start)
        chosen = lines[max(0, at - before) : at + after + 1]
    out = "\n".join(line.rstrip() for line in chosen).strip("\n")
    return out[-limit:]


# What to send when a service waits for the client to speak first.
RDP_CONNECTION_REQUEST = bytes.fromhex("030000130ee000000000000100080003000000")
_SMB_DIALECTS = b"".join(b"\x02" + d + b"\x00" for d in (b"NT LM 0.12", b"SMB 2.002", b"SMB 2.???"))
_SMB = (b"\xffSMB\x72" + bytes(4) + b"\x18\x01\x28" + bytes(14) + b"\xff\xfe" + bytes(4) + b"\x00"
        + len(_SMB_DIALECTS).to_bytes(2, "little") + _SMB_DIALECTS)  # fmt: skip
SMB_NEGOTIATE = b"\x00" + len(_SMB).to_bytes(3, "big") + _SMB
PROBES = {3389: RDP_CONNECTION_REQUEST, 445: SMB_NEGOTIATE}
GENERIC_PROBE = b"HEAD / HTTP/1.0\r\n\r\n"


def probe_once(host: str, port: int, guest_port: int, *, timeout: float = 3.0) -> tuple[bool, str]:
    """Whether the service behind ``host:port`` answers: it sends a byte, first or after our probe.

    Through QEMU's user-mode networking a connect to the forwarded port
    always succeeds at first (QEMU accepts it, then connects to the guest),
    so only bytes coming back prove the guest's service is there. Banner
    protocols (SSH, SMTP) speak first; for the others a protocol-fitting
    request is sent (RDP's X.224 connection request for 3389, an SMB
    negotiate for 445, an HTTP HEAD otherwise).
    """
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.settimeout(min(1.5, timeout))
            try:
                data = sock.recv(64)
                if not data:
                    return False, "the connection was closed without an answer"
                return True, f"answered with {len(data)} bytes first"
            except TimeoutError:
                pass
            sock.settimeout(timeout)
            sock.sendall(PROBES.get(guest_port, GENERIC_PROBE))
            data = sock.recv(64)
            if not data:
                return False, "the connection was closed without an answer"
            return True, f"answered a probe with {len(data)} bytes"
    except TimeoutError:
        return False, "no answer"
    except OSError as exc:
        return False, f"no answer ({exc.strerror or exc})"


def probe_until(host: str, port: int, guest_port: int, deadline: float) -> tuple[bool, str, float]:
    """Probe about once a second until it answers or ``deadline`` (monotonic) passes."""
    last = "no answer"
    while True:
        ok, detail = probe_once(host, port, guest_port, timeout=max(0.5, min(3.0, deadline - time.monotonic())))
        if ok:
            return True, detail, time.monotonic()
        last = detail
        if time.monotonic() + 1 >= deadline:
            return False, last, time.monotonic()
        time.sleep(1)


BOOT_CHECK = "reached a login prompt or the system's ready line"
LIMIT_CHECK = "answered within the time limit"


def port_check_name(port: int) -> str:
    return f"port {port} answers"


def boot_check(match: Match | None, *, boot_seconds: float, stopped: str | None, time_limit: float) -> base.Check:
    """The first check: what the console showed."""
    if match is not None and match.kind == "ready":
        return base.Check(BOOT_CHECK, True, f"{match.pattern.name} after {boot_seconds:.0f} s: {match.line!r}")
    if match is not None:
        return base.Check(BOOT_CHECK, False, f"{match.pattern.name}: {match.line!r}")
    if stopped:
        return base.Check(BOOT_CHECK, False, stopped)
    return base.Check(BOOT_CHECK, False, f"no login prompt or ready line within {time_limit:.0f} s")


def limit_check(answered_after: float | None, time_limit: float) -> base.Check:
    """The last check: did the server answer within the limit."""
    if answered_after is None:
        return base.Check(LIMIT_CHECK, False, f"the server did not answer (limit {time_limit:.0f} s)")
    passed = answered_after <= time_limit
    return base.Check(LIMIT_CHECK, passed, f"answered after {answered_after:.0f} s (limit {time_limit:.0f} s)")
