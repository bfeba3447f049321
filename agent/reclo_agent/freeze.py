"""``--freeze``: hold the disk's mounted file systems still while it is read.

``FIFREEZE`` (the ioctl behind ``fsfreeze -f``) writes a file system's
dirty data and journal to the disk and blocks every writer until
``FITHAW``: the disk then holds one consistent state, which is what the
backup reads. Writers on the server wait meanwhile, so a freeze is for
small or quiet disks, and it has a hard time limit: a watchdog thread thaws
when it runs out, whatever the main thread is doing, and the read then
fails (the image would no longer be of one moment). The file systems are
thawed on every exit path: the end of the block, an exception, Ctrl-C,
and SIGTERM (the command line turns it into an exception). Only a SIGKILL
or a power cut can leave one frozen; ``fsfreeze -u MOUNTPOINT`` thaws it.

The agent must not write to a file system it froze (the write would wait
for the thaw): its state folder may not be on one, and the root file
system is never frozen.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import threading
import time
from collections.abc import Callable

from .errors import DiskError, UsageError
from .mounts import Mount

log = logging.getLogger(__name__)

# <linux/fs.h>: _IOWR('X', 119, int) and _IOWR('X', 120, int).
FIFREEZE = 0xC0045877
FITHAW = 0xC0045878
DEFAULT_LIMIT = 600.0  # seconds


def check_freezable(mounts: list[Mount], state_dir: str) -> None:
    """UsageError unless every mount may be frozen while the agent runs."""
    state_dev = os.stat(state_dir).st_dev
    for mount in mounts:
        if mount.mount_point == "/":
            raise UsageError(
                f"--freeze would freeze the root file system (on {mount.source}), which the agent and the "
                "system need while the disk is read. Back up a snapshot (LVM) or leave out --freeze."
            )
        if os.stat(mount.mount_point).st_dev == state_dev:
            raise UsageError(
                f"The state folder {state_dir} is on {mount.mount_point}, which --freeze would freeze: the "
                "agent writes its block map there while reading. Put the state folder on another disk "
                "(login --state-dir) or leave out --freeze."
            )


class Freezer:
    """Freeze ``mounts`` for a ``with`` block, thawing after ``limit`` seconds at the latest.

    ``on_expire`` is called (from the watchdog thread) when the limit ran
    out, after the thaw; ``expired`` tells afterwards.
    """

    def __init__(self, mounts: list[Mount], *, limit: float = DEFAULT_LIMIT,
                 on_expire: Callable[[], None] | None = None, ioctl=fcntl.ioctl) -> None:  # fmt: skip
        self.mounts = mounts
        self.limit = limit
        self.on_expire = on_expire
        self.expired = False
        self._ioctl = ioctl
        self._frozen: list[tuple[Mount, int]] = []
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None
        self.frozen_for = 0.0
        self._since = 0.0

    def __enter__(self) -> Freezer:
        self.freeze()
        return self

    def __exit__(self, *exc) -> None:
        self.thaw()

    def freeze(self) -> None:
        """Freeze every mount, in order; on any failure thaw those already frozen and raise DiskError."""
        try:
            for mount in self.mounts:
                fd = os.open(mount.mount_point, os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0))
                try:
                    self._ioctl(fd, FIFREEZE, 0)
                except OSError as exc:
                    os.close(fd)
                    why = "it is frozen already (fsfreeze -u to thaw it)" if exc.errno == errno.EBUSY else exc.strerror
                    if exc.errno == errno.EOPNOTSUPP:
                        why = f"{mount.fs_type} cannot be frozen"
                    raise DiskError(f"Cannot freeze {mount.mount_point} ({mount.source}): {why}.") from exc
                with self._lock:
                    self._frozen.append((mount, fd))
                log.info("froze %s (%s) for at most %.0f s", mount.mount_point, mount.source, self.limit)
        except BaseException:
            self.thaw()
            raise
        self._since = time.monotonic()
        self._timer = threading.Timer(self.limit, self._expire)
        self._timer.daemon = True
        self._timer.start()

    def _expire(self) -> None:
        if not self._frozen:
            return
        self.expired = True
        log.warning("the freeze reached its limit of %.0f s: thawing now; this backup cannot be consistent",
                    self.limit)  # fmt: skip
        self.thaw()
        if self.on_expire:
            self.on_expire()

    def thaw(self) -> None:
        """Thaw whatever is frozen (newest first). Safe to call twice and from any thread."""
        if self._timer is not None and threading.current_thread() is not self._timer:
            self._timer.cancel()
        with self._lock:
            frozen, self._frozen = self._frozen, []
        if frozen and self._since:
            self.frozen_for = time.monotonic() - self._since
        for mount, fd in reversed(frozen):
            try:
                self._ioctl(fd, FITHAW, 0)
                log.info("thawed %s after %.1f s", mount.mount_point, self.frozen_for)
            except OSError as exc:
                log.error("could not thaw %s: %s; run: fsfreeze -u %s", mount.mount_point, exc.strerror,
                          mount.mount_point)  # fmt: skip
            finally:
                os.close(fd)
