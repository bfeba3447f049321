"""What every drill sandbox takes and returns: a boot request, checks, a verdict."""

from __future__ import annotations

import abc
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import verdict as patterns

BOOT_MODES = ("bios", "uefi")
DEFAULT_TIME_LIMIT = 600.0  # seconds: 10 minutes from power-on to "server answers"


class SandboxError(RuntimeError):
    """The sandbox itself could not be started (code 411, docs/api.md), as opposed to a guest that fails its checks."""


@dataclass(frozen=True)
class BootRequest:
    """How to boot one restore point and what counts as success.

    ``boot_mode`` is ``"bios"`` (SeaBIOS) or ``"uefi"`` (OVMF), as the
    restore point's preflight says. ``probe_port`` is the guest TCP port that
    must answer (the server's ``drill_probe_port``), or None. ``time_limit``
    bounds the whole boot and checks, in seconds. ``evidence_dir`` is where
    the console log and the screenshot are kept after teardown (created if
    missing); ``label`` names the run in process lists and leases (the drill
    id, say).
    """

    evidence_dir: Path
    boot_mode: str = "bios"
    probe_port: int | None = None
    time_limit: float = DEFAULT_TIME_LIMIT
    label: str = "drill"
    ready_patterns: tuple[patterns.Pattern, ...] = patterns.READY_PATTERNS
    failure_patterns: tuple[patterns.Pattern, ...] = patterns.FAILURE_PATTERNS
    memory_mib: int = 1024

    def __post_init__(self):
        if self.boot_mode not in BOOT_MODES:
            raise ValueError(f"boot_mode must be one of {BOOT_MODES}, not {self.boot_mode!r}")
        if self.probe_port is not None and not 1 <= self.probe_port <= 65535:
            raise ValueError(f"probe_port {self.probe_port} is not a TCP port")
        if self.time_limit <= 0:
            raise ValueError("time_limit must be positive")


@dataclass
class Check:
    """One check as a person reads it, e.g. ``port 80 answers``: passed or not, and why."""

    name: str
    passed: bool
    detail: str

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class Verdict:
    """The outcome of one boot: the checks, the evidence and the measured times.

    ``passed`` is true when every check passed. ``reason`` is empty when it
    passed, else the first failed check's detail. ``console_excerpt`` is the
    part of the console that shows why (around a failure signature, or the
    last lines); ``console_path`` and ``screenshot_path`` point into the
    request's ``evidence_dir`` (the screenshot is None when none could be
    taken). ``timings`` are seconds: ``prepare`` (the sandbox's own set-up
    until the machine is powered on), ``boot`` (power-on to the ready line or
    the failure), ``checks`` (port probe and screenshot) and ``total``.
    ``answered_after`` is power-on to "server answers" (the port when one is
    probed, else the ready line), None when it never answered.
    """

    passed: bool
    checks: list[Check]
    reason: str
    console_excerpt: str
    console_path: Path | None
    screenshot_path: Path | None
    timings: dict[str, float]
    answered_after: float | None
    sandbox: str
    details: dict = field(default_factory=dict)

    @classmethod
    def judged(
        cls,
        checks: list[Check],
        *,
        console_excerpt: str,
        console_path: Path | None,
        screenshot_path: Path | None,
        moments: tuple[float, float, float, float],
        answered_after: float | None,
        sandbox: str,
        details: dict,
    ) -> Verdict:
        """The verdict of ``checks``: passed when all passed, the first failure's detail as the reason.

        ``moments`` are the run's monotonic clock readings: started,
        powered on, booted (ready line, failure or limit), checked; the
        timings are the spans between them.
        """
        started, powered_on, booted, checked = moments
        failed = [c for c in checks if not c.passed]
        return cls(
            passed=not failed,
            checks=checks,
            reason=failed[0].detail if failed else "",
            console_excerpt=console_excerpt,
            console_path=console_path,
            screenshot_path=screenshot_path,
            timings={
                "prepare": round(powered_on - started, 3),
                "boot": round(booted - powered_on, 3),
                "checks": round(checked - booted, 3),
                "total": round(checked - started, 3),
            },
            answered_after=round(answered_after, 3) if answered_after is not None else None,
            sandbox=sandbox,
            details=details,
        )

    def as_dict(self) -> dict:
        """JSON-ready facts (paths as strings), e.g. for the drill's stored record."""
        return {
            "passed": self.passed,
            "checks": [c.as_dict() for c in self.checks],
            "reason": self.reason,
            "console_excerpt": self.console_excerpt,
            "console_path": str(self.console_path) if self.console_path else None,
            "screenshot_path": str(self.screenshot_path) if self.screenshot_path else None,
            "timings": dict(self.timings),
            "answered_after": self.answered_after,
            "sandbox": self.sandbox,
            "details": dict(self.details),
        }


class Sandbox(abc.ABC):
    """A place to boot a restore point in isolation, check it and tear everything down.

    ``run`` blocks until the verdict (at most about ``request.time_limit``
    plus teardown), always tears down what it started, and raises
    :class:`SandboxError` only when the sandbox could not be started at all;
    a guest that does not boot is a failed :class:`Verdict`, not an error.
    ``reap`` tears down what runs of dead processes left behind; call it
    from a periodic job (``run`` calls it too).
    """

    name: str = ""

    @abc.abstractmethod
    def run(self, source, request: BootRequest) -> Verdict:
        """Boot ``source`` (what this sandbox boots: a raw disk file for ``local``), check it, tear down."""

    @abc.abstractmethod
    def reap(self) -> list[str]:
        """Tear down leftovers of runs whose process died; return what was removed, in words."""
