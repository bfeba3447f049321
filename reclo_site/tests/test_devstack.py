"""`make run` stops everything it started, whichever way it is told to stop.

Each test starts the real stack (moto's server, a Celery worker, beat and
the portal, on free ports and a temporary var/) under a real `make`, waits
until the portal answers, then signals it the way a terminal, a process
manager or a user would, and checks that every process it started is gone.
"""

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from reclo_site.testing import ROOT, agent_bundle, free_port, require_tool


def descendants(pid: int) -> set[int]:
    """Every living process below `pid` (children in their own sessions included), from /proc."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name may hold spaces and parentheses: fields follow the last ')'.
        fields = stat[stat.rindex(")") + 2 :].split()
        if fields[0] != "Z":
            parents.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return state[state.rindex(")") + 2] != "Z"


@pytest.fixture(scope="module")
def var_dir(tmp_path_factory):
    """One var/ for the module: the first run migrates, the next ones start in seconds."""
    return tmp_path_factory.mktemp("devstack") / "var"


def start_make_run(var_dir: Path, tmp_path: Path):
    """`make run` (a Makefile whose run target is the Makefile's), leading its own process group."""
    require_tool("make")
    makefile = tmp_path / "Makefile"
    makefile.write_text(f"run:\n\t{sys.executable} -m reclo_site.devstack\n")
    moto_port, web_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL", "CELERY_BROKER_URL")}
    env |= {"RECLO_VAR_DIR": str(var_dir), "MOTO_PORT": str(moto_port), "PORT": str(web_port)}
    # The bundle the test run built: make run's build_agent finds it up to date instead of taking a minute.
    env["RECLO_AGENT_BUNDLE_DIR"] = str(agent_bundle().parent)
    env.pop("AWS_ENDPOINT_URL", None)
    log = open(tmp_path / "make-run.log", "wb")  # noqa: SIM115 - closed by the caller
    make = subprocess.Popen(
        ["make", "-s", "-f", str(makefile), "run"],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    return make, web_port, log


def wait_for_portal(make, web_port: int, log_path: Path, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if make.poll() is not None:
            pytest.fail(f"make run exited with {make.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{web_port}/healthz", timeout=2) as response:  # noqa: S310
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    pytest.fail(f"the portal did not answer in {timeout:.0f}s:\n{log_path.read_text()[-3000:]}")


def devstack_pid(make) -> int:
    children = [
        pid for pid in descendants(make.pid) if b"reclo_site.devstack" in Path(f"/proc/{pid}/cmdline").read_bytes()
    ]
    assert len(children) == 1, children
    return children[0]


@pytest.mark.parametrize(
    ("signum", "target"),
    [
        (signal.SIGHUP, "group"),  # the terminal was closed
        (signal.SIGTERM, "group"),  # a process manager stops the job: kill -TERM -<pgid>
        (signal.SIGINT, "group"),  # Ctrl-C
        (signal.SIGKILL, "devstack"),  # kill -9: no clean-up runs, the kernel tells the children (Linux)
    ],
    ids=["SIGHUP-group", "SIGTERM-group", "SIGINT-group", "SIGKILL-devstack"],
)
def test_a_signal_stops_every_process_make_run_started(var_dir, tmp_path, signum, target):
    make, web_port, log = start_make_run(var_dir, tmp_path)
    started: set[int] = set()
    try:
        wait_for_portal(make, web_port, tmp_path / "make-run.log")
        with urllib.request.urlopen(f"http://127.0.0.1:{web_port}/agent/reclo-agent.tar.gz", timeout=30) as got:  # noqa: S310
            assert got.status == 200 and got.headers["X-Reclo-Agent-Version"]  # make run built the agent bundle
        stack = devstack_pid(make)
        started = descendants(stack)
        # moto, worker (and its pool), beat, portal: at least four.
        assert len(started) >= 4, started
        if target == "group":
            os.killpg(make.pid, signum)
        else:
            os.kill(stack, signum)
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline and any(alive(pid) for pid in started | {stack}):
            time.sleep(0.2)
        left = sorted(pid for pid in started | {stack} if alive(pid))
        commands = {pid: Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")[:100] for pid in left}
        assert not left, f"still running after {signal.Signals(signum).name}: {commands}"
    finally:
        for pid in started:  # never leave a stack behind, whatever the outcome
            if alive(pid):
                try:
                    os.killpg(os.getpgid(pid), signal.SIGKILL)
                except OSError:
                    pass
        if make.poll() is None:
            os.killpg(make.pid, signal.SIGKILL)
        make.wait()
        log.close()
