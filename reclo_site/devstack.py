"""`make run`: the whole system on one machine, until Ctrl-C.

Starts moto's server mode as the local AWS, prepares the database and the
bucket, then runs the portal, two Celery workers (backups, and failovers on
a queue of their own) and Celery beat side by side.
If any of them dies, everything is stopped, so a half-running stack never
looks healthy.
"""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

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


def main() -> int:
    moto_port = int(os.environ.get("MOTO_PORT", "5000"))
    web_port = int(os.environ.get("PORT", "8000"))
    env = _environment(moto_port, web_port)
    # A fresh clone has no var/ yet: settings make it, but moto starts first.
    var_dir = Path(env.get("RECLO_VAR_DIR") or ROOT / "var")
    var_dir.mkdir(parents=True, exist_ok=True)
    python = str(BIN / "python")
    procs: list[tuple[str, subprocess.Popen]] = []

    def start(name: str, args: list[str], log: Path | None = None) -> None:
        print(f"reclo: starting {name}" + (f" (log: {log})" if log else ""), flush=True)
        out = open(log, "ab") if log else None  # noqa: SIM115 - lives as long as the process
        procs.append((name, subprocess.Popen(args, cwd=ROOT, env=env, start_new_session=True, stdout=out,
                                             stderr=subprocess.STDOUT if out else None)))  # fmt: skip

    def stop_all() -> None:
        # A second Ctrl-C must not cut the shutdown short and leave orphans.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        for _name, proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for _name, proc in procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)

    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
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
        subprocess.run([*manage, "setup_cloud"], cwd=ROOT, env=env, check=True)
        celery = [str(BIN / "celery"), "-A", "reclo_site"]
        for title, args in worker_commands(celery, env):
            start(title, args)
        start("Celery beat", [*celery, "beat", "-l", "info"])
        start("portal", [*manage, "runserver", f"127.0.0.1:{web_port}", "--noreload", "--skip-checks"])
        _wait_for_port("127.0.0.1", web_port)
        print(
            "\n"
            f"  ReClo is running: http://127.0.0.1:{web_port}/  (sign up there)\n"
            f"  API docs:         http://127.0.0.1:{web_port}/api/v1/docs\n"
            f"  Local AWS:        {env['AWS_ENDPOINT_URL']}\n"
            "  Agent:            .venv/bin/reclo-agent --help\n"
            "  Press Ctrl-C to stop.\n",
            flush=True,
        )
        parent = os.getppid()
        while True:
            if os.getppid() != parent:  # `make` was killed: do not linger as orphans
                return 1
            for name, proc in procs:
                if proc.poll() is not None:
                    print(f"reclo: {name} exited with {proc.returncode}; stopping", file=sys.stderr)
                    return 1
            time.sleep(0.5)
    except KeyboardInterrupt:
        print("\nreclo: stopping", flush=True)
        return 0
    finally:
        stop_all()


if __name__ == "__main__":
    sys.exit(main())
