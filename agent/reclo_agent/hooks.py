"""``--pre-hook CMD`` / ``--post-hook CMD``: the server's own commands around the read.

A pre-hook makes the data on the disk whole (a database dump or flush, a
service paused); the post-hook undoes it. Each runs through ``/bin/sh -c``
with a time limit, its output going to the agent's log, and learns the
backup through the environment: ``RECLO_HOOK`` (``pre`` or ``post``),
``RECLO_SOURCE``, ``RECLO_SERVER``, ``RECLO_DISK``, and for the post-hook
``RECLO_READ_STATUS`` (``ok`` or ``failed``).

The post-hook runs whenever the pre-hook was started, even when the pre-hook
or the read failed, so a paused service is always resumed. A failing
pre-hook stops the backup (nothing is read); a failing post-hook is reported
and makes the command exit non-zero, but the restore point stands.
"""

from __future__ import annotations

import logging
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from .errors import AgentError

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 1800.0  # seconds


class HookFailed(AgentError):
    """A pre- or post-hook exited non-zero, could not start, or ran out of time."""


@dataclass
class Hooks:
    pre: str | None = None
    post: str | None = None
    env: dict = field(default_factory=dict)
    timeout: float = DEFAULT_TIMEOUT
    post_error: HookFailed | None = None  # set when the post-hook failed

    def _run(self, which: str, command: str, extra: dict) -> None:
        env = {**os.environ, **self.env, **extra, "RECLO_HOOK": which}
        log.info("running the %s-hook: %s", which, command)
        try:
            done = subprocess.run(["/bin/sh", "-c", command], env=env, capture_output=True, text=True,
                                  timeout=self.timeout, check=False)  # fmt: skip
        except subprocess.TimeoutExpired as exc:
            raise HookFailed(f"The {which}-hook ran out of its {self.timeout:.0f} s: {command}") from exc
        except OSError as exc:
            raise HookFailed(f"The {which}-hook could not start ({exc.strerror}): {command}") from exc
        for line in (done.stdout + done.stderr).splitlines()[-20:]:
            log.info("%s-hook: %s", which, line)
        if done.returncode != 0:
            last = (done.stderr or done.stdout).strip().splitlines()
            raise HookFailed(
                f"The {which}-hook failed (exit {done.returncode}): {command}" + (f" -- {last[-1]}" if last else "")
            )

    @contextmanager
    def around(self) -> Iterator[None]:
        """Run the pre-hook, the block, then always the post-hook (see the module doc)."""
        status = "failed"
        try:
            if self.pre:
                self._run("pre", self.pre, {})
            yield
            status = "ok"
        finally:
            if self.post:
                try:
                    self._run("post", self.post, {"RECLO_READ_STATUS": status})
                except HookFailed as exc:
                    log.error("%s", exc)
                    self.post_error = exc
