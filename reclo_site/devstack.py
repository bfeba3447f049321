"""`make run`: the whole system on one machine, until Ctrl-C.

Starts moto's server mode as the local AWS, prepares the database and the
bucket, then runs the portal, two Celery workers (backups, and failovers on
a queue of their own) and Celery beat side by side.
If any of them dies, everything is stopped, so a half-running stack never
looks healthy.

Each child runs in a process group of its own, so a Ctrl-C or a signal to
the terminal's group reaches only this process, which then stops the
children in order and waits for them. SIGINT, SIGTERM and SIGHUP (a closed
terminal) all stop the stack; further signals during the shutdown are
ignored so it is never cut short. On Linux each child also gets SIGTERM
from the kernel if this process dies without cleaning up (kill -9).
"""

import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from reclo_site.files import private_dir
from reclo_site.queues import recovery_queue_for

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def worker_commands(celery: list[str], env: dict) -> list[tuple[str, list[str]]]:
    """The Celery workers of `make run`: (title, command line) each.

    Two workers: backups (verification, retention, scrub) and failovers, so
    a flood of uploads never delays a failover. The file-system broker has
    no broadcast, so no mingle/gossip/heartbeat. It has no asynchronous I/O
    either, so a prefork worker would use billiard's blocking pool, whose
    idle processes wait on one shared queue while holding its read lock:
    one SIGKILLed while idle (the OOM killer) dies holding it, and its
    replacement and every other process wait forever. Threads have no such
    lock. (With Redis, production's prefork pool gives each process a pipe
    of its own and replaces dead ones.)
    """
    default_queue = env.get("CELERY_TASK_DEFAULT_QUEUE") or "celery"
    recovery_queue = env.get("CELERY_RECOVERY_QUEUE") or recovery_queue_for(default_queue)
    quiet = ["--without-mingle", "--without-gossip", "--without-heartbeat"]
    commands = []
    for title, name, queue, concurrency in (
        ("Celery worker (backups)", "backups", default_queue, "2"),
        ("Celery worker (failovers)", "recovery", recovery_queue, "1"),
    ):
        worker = [*celery, "worker", "-l", "info", "-n", f"{name}@%h", "-Q", queue, "--concurrency", concurrency]
        commands.append((title, [*worker, "--pool", "threads", *quiet]))
    return commands


def _wait_for_port(host: str, port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            sock.settimeout(0.5)
            if sock.connect_ex((host, port)) == 0:
                return
        time.sleep(0.2)
    raise SystemExit(f"nothing answered on {host}:{port} after {timeout:.0f}s")


def _port_busy(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def _environment(moto_port: int, web_port: int) -> dict:
    env = dict(os.environ)
    env.setdefault("DJANGO_SETTINGS_MODULE", "reclo_site.settings")
    env.setdefault("AWS_ENDPOINT_URL", f"http://127.0.0.1:{moto_port}")
    # moto accepts any credentials; real ones never reach the emulator.
    if "127.0.0.1" in env["AWS_ENDPOINT_URL"] or "localhost" in env["AWS_ENDPOINT_URL"]:
        env.setdefault("AWS_ACCESS_KEY_ID", "reclo-local")
        env.setdefault("AWS_SECRET_ACCESS_KEY", "reclo-local")
    env.setdefault("AWS_REGION", "us-east-1")
    env.setdefault("SITE_URL", f"http://127.0.0.1:{web_port}")
    env["PYTHONUNBUFFERED"] = "1"
    return env


# The signals that stop the stack, whoever sends them.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


class Stop(BaseException):
    """Raised in the main thread by one of STOP_SIGNALS (a BaseException, like KeyboardInterrupt)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_stop(signum, _frame):
    raise Stop(signum)


def _say(text: str, *, error: bool = False) -> None:
    """Print, but never fail: after SIGHUP the terminal may be gone (EIO)."""
    try:
        print(text, file=sys.stderr if error else sys.stdout, flush=True)
    except OSError:
        pass


def _child_setup(parent: int):
    """What each child does between fork and exec: take the signals again, die with us."""

    def setup() -> None:
        # The parent blocks the stop signals while it starts a child (so
        # none is lost between the fork and noting the child); the mask is
        # inherited across exec, so undo it here.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
        if sys.platform.startswith("linux"):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
            if os.getppid() != parent:  # the parent died before prctl took effect
                os._exit(1)

    return setup


def main() -> int:
    for signum in STOP_SIGNALS:
        signal.signal(signum, _raise_stop)
    moto_port = int(os.environ.get("MOTO_PORT", "5000"))
    web_port = int(os.environ.get("PORT", "8000"))
    env = _environment(moto_port, web_port)
    # A fresh clone has no var/ yet: settings make it, but moto starts first.
    var_dir = private_dir(Path(env.get("RECLO_VAR_DIR") or ROOT / "var"))
    python = str(BIN / "python")
    procs: list[tuple[str, subprocess.Popen]] = []

    def start(name: str, args: list[str], log: Path | None = None) -> None:
        _say(f"reclo: starting {name}" + (f" (log: {log})" if log else ""))
        out = open(log, "ab") if log else None  # noqa: SIM115 - lives as long as the process
        # No stop signal between the fork and noting the child: it would be orphaned.
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            proc = subprocess.Popen(
                args,
                cwd=ROOT,
                env=env,
                start_new_session=True,
                stdout=out,
                stderr=subprocess.STDOUT if out else None,
                preexec_fn=_child_setup(os.getpid()),  # safe: this process runs no threads
            )
            procs.append((name, proc))
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)

    def stop_all() -> None:
        # A second Ctrl-C (or SIGTERM, SIGHUP) must not cut the shutdown short.
        for signum in STOP_SIGNALS:
            signal.signal(signum, signal.SIG_IGN)
        # The portal first, the emulator last: the reverse of the start.
        for _name, proc in reversed(procs):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for name, proc in reversed(procs):
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _say(f"reclo: {name} did not stop in time; killing it", error=True)
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            # Its own children (the worker's pool) share its group.
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    try:
        if env["AWS_ENDPOINT_URL"].startswith(f"http://127.0.0.1:{moto_port}"):
            if _port_busy("127.0.0.1", moto_port):
                raise SystemExit(f"port {moto_port} is taken; set MOTO_PORT to a free port")
            start(
                "local AWS emulator (moto)",
                [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(moto_port)],
                log=var_dir / "moto.log",
            )
            _wait_for_port("127.0.0.1", moto_port)
        if _port_busy("127.0.0.1", web_port):
            raise SystemExit(f"port {web_port} is taken; set PORT to a free port")
        manage = [python, "manage.py"]
        subprocess.run([*manage, "migrate", "--no-input", "-v", "0"], cwd=ROOT, env=env, check=True)
        subprocess.run([*manage, "collectstatic", "--no-input", "-v", "0"], cwd=ROOT, env=env, check=True)
        # The agent bundle /agent/install.sh installs (rebuilt only when agent/ changed).
        subprocess.run([*manage, "build_agent"], cwd=ROOT, env=env, check=True)
        subprocess.run([*manage, "setup_cloud"], cwd=ROOT, env=env, check=True)
        celery = [str(BIN / "celery"), "-A", "reclo_site"]
        for title, args in worker_commands(celery, env):
            start(title, args)
        start("Celery beat", [*celery, "beat", "-l", "info"])
        start("portal", [*manage, "runserver", f"127.0.0.1:{web_port}", "--noreload", "--skip-checks"])
        _wait_for_port("127.0.0.1", web_port)
        _say(
            "\n"
            f"  ReClo is running: http://127.0.0.1:{web_port}/  (sign up there)\n"
            f"  API docs:         http://127.0.0.1:{web_port}/api/v1/docs\n"
            f"  Local AWS:        {env['AWS_ENDPOINT_URL']}\n"
            "  Agent:            .venv/bin/reclo-agent --help\n"
            "  Press Ctrl-C to stop.\n"
        )
        parent = os.getppid()
        while True:
            if os.getppid() != parent:  # `make` was killed: do not linger as orphans
                return 1
            for name, proc in procs:
                if proc.poll() is not None:
                    _say(f"reclo: {name} exited with {proc.returncode}; stopping", error=True)
                    return 1
            time.sleep(0.5)
    except Stop as stop:
        _say(f"\nreclo: stopping ({stop})")
        return 0
    finally:
        stop_all()


if __name__ == "__main__":
    sys.exit(main())
