"""Load: 200 agents and 20 browser users against gunicorn + PostgreSQL + Redis, next to the framework's ceiling.

    .venv/bin/pip install -r bench/requirements.txt
    .venv/bin/python bench/load_bench.py [--duration 60] [--ceiling-duration 20]

Self-contained, loopback only. It starts moto's server (the AWS), makes a
fresh PostgreSQL database (`reclo_load` on 127.0.0.1:5432 as postgres; dropped
at the end) and uses a Redis database of its own (127.0.0.1:6379/11; flushed
before and after; refused if it holds keys), migrates, creates the bucket
(`manage.py setup_cloud`), seeds 200 agent accounts with tokens and 20 browser
users with a server and verified backups (bench/load_data.py), then starts a
Celery worker and gunicorn (`reclo_site.wsgi`, sync workers, DEBUG off, a
bench SECRET_KEY, API_RATE high enough that the per-token throttle does not
shape the figures).

Four locust runs against the same gunicorn follow (bench/load_locustfile.py):

1. the ceiling: as many users as the scenario, no think time, on
   /bench/ping, a bare Django view returning a constant (served through
   bench/load_settings.py, the portal's settings with one URL added);
2. the scenario: the agents back up on a schedule (one backup a minute
   each by default, first ones spread over the first minute: list, start
   upload, PUT into S3, complete, poll until verified) and the browser
   users log in and look at the dashboard and their server page;
3. the agent endpoints saturated: as many users as the ceiling's, no think
   time, each making an agent's portal calls back to back (list, start an
   upload, two status reads), measured exactly as the ceiling is;
4. the ceiling again (other work on the machine comes and goes).

It prints requests per second, p50/p95/p99 and errors per endpoint group and
per endpoint, over the steady window (every user spawned, before the stop),
where the machine's CPU went, and checks the database and bucket against
what the agents were told. PASS/FAIL per target; the exit status is 0 unless
the bench itself could not run. Everything is stopped and dropped at the
end, on Ctrl-C and on failure too. See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import defaultdict
from pathlib import Path

import psutil
import psycopg2
import redis

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
PYTHON = str(BIN / "python")

TARGET_RATIO = 0.50
TARGET_P99_MS = 1000.0


# --- processes -----------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(check, what: str, timeout: float = 60.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: the process exited with {proc.returncode}")
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(0.25)
    raise RuntimeError(f"{what}: not ready after {timeout:.0f}s")


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 - loopback URL we built
        return response.status == 200


class Stack:
    """The processes this bench started; each in its own session, stopped by process group."""

    def __init__(self, logs: Path):
        self.logs = logs
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, args: list[str], env: dict) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "ab")  # noqa: SIM115 - lives as long as the process
        proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs[name] = proc
        return proc

    def stop(self, name: str, timeout: float = 15.0) -> None:
        proc = self.procs.pop(name, None)
        if proc is None or proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)
        except ProcessLookupError:
            pass

    def stop_all(self) -> None:
        for name in reversed(list(self.procs)):
            self.stop(name)

    def tail(self, name: str, lines: int = 30) -> str:
        path = self.logs / f"{name}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""


def run(args: list[str], env: dict, what: str) -> None:
    done = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{what} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")


# --- CPU accounting --------------------------------------------------------------------


def tree_cpu(pid: int) -> float:
    """CPU seconds (user + system) of a process and its live children."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0.0
    total = 0.0
    for proc in procs:
        try:
            times = proc.cpu_times()
            total += times.user + times.system
        except psutil.Error:
            pass
    return total


def named_cpu(names: tuple[str, ...]) -> float:
    total = 0.0
    for proc in psutil.process_iter(["name", "cpu_times"]):
        if proc.info["name"] in names and proc.info["cpu_times"] is not None:
            total += proc.info["cpu_times"].user + proc.info["cpu_times"].system
    return total


class CpuSampler(threading.Thread):
    """Once a second: CPU seconds per component and of the whole machine."""

    def __init__(self, stack: Stack):
        super().__init__(daemon=True)
        self.stack = stack
        self.samples: list[tuple[float, dict]] = []
        self.halt = threading.Event()

    def sample(self) -> dict:
        out = {name: tree_cpu(proc.pid) for name, proc in list(self.stack.procs.items())}
        out["postgresql (whole server)"] = named_cpu(("postgres", "postmaster"))
        out["redis (whole server)"] = named_cpu(("redis-server",))
        times = psutil.cpu_times()
        out["_busy"] = sum(times) - times.idle - getattr(times, "iowait", 0.0)
        return out

    def run(self):
        while not self.halt.is_set():
            self.samples.append((time.time(), self.sample()))
            self.halt.wait(1.0)

    def between(self, start: float, end: float) -> tuple[float, dict]:
        """Seconds and CPU seconds per component between the first and last samples within `start`..`end`."""
        if len(self.samples) < 2:
            return 0.0, {}
        inside = [s for s in self.samples if start <= s[0] <= end] or self.samples
        a, b = inside[0], inside[-1]
        # Clamped at 0: a PostgreSQL backend that ended takes its CPU seconds along.
        return b[0] - a[0], {k: max(0.0, b[1][k] - a[1][k]) for k in b[1] if k in a[1]}


# --- figures ---------------------------------------------------------------------------


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list (nan when empty)."""
    if not sorted_values:
        return math.nan
    return sorted_values[max(0, math.ceil(q * len(sorted_values)) - 1)]


def group_of(name: str) -> str:
    return name.split(":", 1)[0]


def summarise(data: dict) -> dict:
    """Per group and per endpoint: count, req/s, p50/p95/p99 over the steady window; errors over the whole run."""
    marks = data["marks"]
    t0, t1 = marks.get("steady_from", 0.0), marks.get("steady_to", marks.get("end", 0.0))
    window = max(t1 - t0, 1e-9)
    times: dict[str, list[float]] = defaultdict(list)
    errors: dict[str, int] = defaultdict(int)
    total: dict[str, int] = defaultdict(int)
    for start, ms, name, ok in data["records"]:
        keys = (group_of(name), name)
        for key in keys:
            total[key] += 1
            if not ok:
                errors[key] += 1
        if name == "agent: verdict":  # a backup's outcome, not a request: errors only
            continue
        if t0 <= start < t1:
            for key in keys:
                times[key].append(ms)
    out = {}
    for key in sorted(set(total) | set(times)):
        values = sorted(times.get(key, []))
        out[key] = {
            "requests": len(values),
            "rps": len(values) / window,
            "p50": percentile(values, 0.50),
            "p95": percentile(values, 0.95),
            "p99": percentile(values, 0.99),
            "max": values[-1] if values else math.nan,
            "errors": errors.get(key, 0),
            "all_requests": total.get(key, 0),
        }
    return {"window": window, "t0": t0, "t1": t1, "rows": out}


def print_table(title: str, summary: dict) -> None:
    print(f"\n{title} (steady window {summary['window']:.1f} s; errors counted over the whole run)")
    heads = ("requests", "req/s", "p50 ms", "p95 ms", "p99 ms", "max ms")
    print(f"  {'endpoint':44} " + " ".join(f"{h:>8}" for h in heads) + f" {'errors':>6}")
    rows = summary["rows"]
    for group in sorted(k for k in rows if ":" not in k):
        for key in [group, *sorted(k for k in rows if k.startswith(group + ":"))]:
            r = rows[key]
            label = f"{group.upper()} (all)" if key == group else "  " + key.split(":", 1)[1].strip()
            print(
                f"  {label:44} {r['requests']:8d} {r['rps']:8.1f} {r['p50']:8.1f} {r['p95']:8.1f} "
                f"{r['p99']:8.1f} {r['max']:8.1f} {r['errors']:6d}"
            )


def print_cpu(title: str, seconds: float, cpu: dict, requests: int) -> float:
    """Where the machine's CPU went in a window; returns gunicorn's CPU ms per portal request."""
    if not seconds:
        return math.nan
    cores = psutil.cpu_count() or 1
    cpu = dict(cpu)
    busy = cpu.pop("_busy", 0.0)
    ours = sum(cpu.values())
    print(f"\n  CPU during {title} ({cores} cores = {cores * 100}%; machine busy {busy / seconds * 100:.0f}%):")
    for name, value in sorted(cpu.items(), key=lambda kv: -kv[1]):
        print(f"    {name:32} {value / seconds * 100:6.0f}%")
    other = max(0.0, busy - ours) / seconds * 100
    print(f"    {'other processes on the machine':32} {other:6.0f}%")
    if other > 20:
        print(f"    WARNING: other processes took {other:.0f}% of the machine: these figures are distorted by them")
    if not requests or "gunicorn" not in cpu:
        return math.nan
    per_request = cpu["gunicorn"] / requests * 1000
    print(f"    gunicorn CPU per portal request: {per_request:.2f} ms")
    return per_request


def log_problems(path: Path, limit: int = 8) -> list[str]:
    """Distinct ERROR/CRITICAL/Traceback/timeout lines of a log, first `limit`."""
    if not path.exists():
        return []
    seen, out = set(), []
    for line in path.read_text(errors="replace").splitlines():
        if any(w in line for w in (" ERROR ", " CRITICAL ", "Traceback", "WORKER TIMEOUT", "[ERROR]", "[CRITICAL]")):
            key = line[24:200]
            if key not in seen:
                seen.add(key)
                out.append(line[:400])
    return out[:limit] + ([f"... and {len(out) - limit} more distinct lines"] if len(out) > limit else [])


# --- the run ---------------------------------------------------------------------------


def main() -> int:  # noqa: PLR0915 - one linear script
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=120, help="seconds of the scenario (default 120)")
    parser.add_argument("--ceiling-duration", type=float, default=20, help="seconds of the ceiling run (default 20)")
    parser.add_argument("--agents", type=int, default=200)
    parser.add_argument("--browsers", type=int, default=20)
    parser.add_argument("--spawn-rate", type=float, default=50, help="users started per second")
    parser.add_argument("--max-backups", type=int, default=0, help="stop agents after this many backups (0: time only)")
    parser.add_argument(
        "--agent-pacing",
        type=float,
        default=60,
        help="seconds between an agent's backup starts (default 60, 15x the agent's most frequent schedule; "
        "0: back to back, a stress test that saturates the machine)",
    )
    parser.add_argument("--poll-interval", type=float, default=0.5, help="agents' seconds between verdict polls")
    parser.add_argument("--verify-timeout", type=float, default=120, help="an agent gives up waiting after this")
    parser.add_argument("--browser-wait", type=float, nargs=2, default=(1.0, 3.0), metavar=("MIN", "MAX"))
    parser.add_argument("--gunicorn-workers", type=int, default=4)
    parser.add_argument("--celery-concurrency", type=int, default=2)
    parser.add_argument("--api-rate", default="1000000/min")
    parser.add_argument("--postgres", default="postgres://postgres@127.0.0.1:5432", help="server URL (no database)")
    parser.add_argument("--db-name", default="reclo_load")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379", help="server URL (no database)")
    parser.add_argument("--redis-db", type=int, default=11)
    parser.add_argument("--keep", action="store_true", help="keep the logs and JSON in the temporary folder")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="reclo-load-"))
    (work / "var").mkdir()
    stack = Stack(work)
    sampler = CpuSampler(stack)
    db_url = f"{args.postgres.rstrip('/')}/{args.db_name}"
    redis_url = f"{args.redis.rstrip('/')}/{args.redis_db}"
    admin = None
    red = redis.Redis.from_url(redis_url)
    made_db = flush_redis = False
    keep = args.keep
    started = time.time()

    def sigterm(*_):
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started in the background
    signal.signal(signal.SIGTERM, sigterm)
    if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:  # nohup stays nohup
        signal.signal(signal.SIGHUP, sigterm)
    try:
        # --- services on this machine
        if red.dbsize():
            raise RuntimeError(f"Redis database {redis_url} holds keys; pick a free one with --redis-db")
        flush_redis = True
        admin = psycopg2.connect(f"{args.postgres.rstrip('/')}/postgres")
        admin.autocommit = True
        with admin.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{args.db_name}" WITH (FORCE)')  # a killed run's leftover
            cur.execute(f'CREATE DATABASE "{args.db_name}"')
        made_db = True

        moto_port, web_port = free_port(), free_port()
        base = f"http://127.0.0.1:{web_port}"
        env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "PYTHONUNBUFFERED": "1",
            "DJANGO_SETTINGS_MODULE": "reclo_site.settings",
            "DATABASE_URL": db_url,
            "REDIS_URL": redis_url,
            "CELERY_BROKER_URL": redis_url,
            "CELERY_TASK_DEFAULT_QUEUE": "reclo-load",
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{moto_port}",
            "AWS_ACCESS_KEY_ID": "reclo-load",
            "AWS_SECRET_ACCESS_KEY": "reclo-load",
            "AWS_REGION": "us-east-1",
            "DEBUG": "false",
            "SECRET_KEY": "reclo-load-bench-" + secrets.token_urlsafe(40),
            "ALLOWED_HOSTS": "127.0.0.1,localhost",
            "SITE_URL": base,
            "RECLO_VAR_DIR": str(work / "var"),
            "API_RATE": args.api_rate,
            # Retention would merge and drop restore points while the check
            # counts them; a window this wide keeps every one of the run.
            "RECLO_RETENTION_KEEP": "1000000",
        }
        for name in ("RECLO_HTTPS", "EMAIL_URL", "RECLO_UPLOAD_ROLE_ARN", "CELERY_TASK_ALWAYS_EAGER"):
            env.pop(name, None)

        print(f"load: work folder {work}", flush=True)
        moto = stack.start("moto", [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(moto_port)], env)
        wait_until(lambda: port_open(moto_port), "moto", proc=moto)
        manage = [PYTHON, "manage.py"]
        print("load: migrate, collectstatic, setup_cloud", flush=True)
        run([*manage, "migrate", "--no-input", "-v", "0"], env, "migrate")
        run([*manage, "collectstatic", "--no-input", "-v", "0"], env, "collectstatic")
        run([*manage, "setup_cloud"], env, "setup_cloud")
        print(f"load: seeding {args.agents} agent accounts and {args.browsers} browser users", flush=True)
        seed_path = work / "seed.json"
        run([PYTHON, "bench/load_data.py", "seed", "--agents", str(args.agents), "--browsers", str(args.browsers),
             "--out", str(seed_path)], env, "seeding")  # fmt: skip

        celery = stack.start(
            "celery",
            [str(BIN / "celery"), "-A", "reclo_site", "worker", "-l", "info", "--concurrency",
             str(args.celery_concurrency), "--without-mingle", "--without-gossip", "-n", "reclo-load@%h"],
            env,
        )  # fmt: skip
        gunicorn = stack.start(
            "gunicorn",
            [str(BIN / "gunicorn"), "reclo_site.wsgi", "--bind", f"127.0.0.1:{web_port}",
             "--workers", str(args.gunicorn_workers)],
            {**env, "DJANGO_SETTINGS_MODULE": "bench.load_settings"},
        )  # fmt: skip
        wait_until(lambda: http_ok(base + "/healthz"), "gunicorn", proc=gunicorn)
        wait_until(lambda: b" ready." in (work / "celery.log").read_bytes(), "celery worker", proc=celery)
        for _ in range(20 * args.gunicorn_workers):  # every worker imports its views before the clock runs
            http_ok(base + "/bench/ping")
        sampler.start()

        def locust(phase: str, classes: list[str], duration: float) -> dict:
            out = work / f"{phase}.json"
            users = args.agents + args.browsers
            print(f"load: {phase}: {users} users, {duration:.0f} s", flush=True)
            proc = stack.start(
                f"locust-{phase}",
                [str(BIN / "locust"), "-f", "bench/load_locustfile.py", "--headless", "--host", base,
                 "-u", str(users), "-r", str(args.spawn_rate), "-t", f"{duration:.0f}s",
                 "--stop-timeout", str(int(args.verify_timeout + 60)), "--only-summary",
                 "--exit-code-on-error", "0", "--loglevel", "WARNING", *classes],
                {
                    **env,
                    "LOAD_SEED": str(seed_path),
                    "LOAD_OUT": str(out),
                    "LOAD_AGENTS": str(args.agents),
                    "LOAD_BROWSERS": str(args.browsers),
                    "LOAD_AGENT_PACING": str(args.agent_pacing),
                    "LOAD_POLL_INTERVAL": str(args.poll_interval),
                    "LOAD_VERIFY_TIMEOUT": str(args.verify_timeout),
                    "LOAD_MAX_BACKUPS": str(args.max_backups),
                    "LOAD_BROWSER_WAIT_MIN": str(args.browser_wait[0]),
                    "LOAD_BROWSER_WAIT_MAX": str(args.browser_wait[1]),
                },
            )  # fmt: skip
            proc.wait(timeout=duration + args.verify_timeout + 180)
            stack.stop(f"locust-{phase}")
            if not out.exists():
                raise RuntimeError(f"locust ({phase}) wrote no figures:\n{stack.tail(f'locust-{phase}')}")
            return json.loads(out.read_text())

        ceiling = locust("ceiling-before", ["CeilingUser"], args.ceiling_duration)
        if args.agents and args.browsers:
            classes = ["AgentUser", "BrowserUser"]
        else:
            classes = ["AgentUser"] if args.agents else ["BrowserUser"]
        scenario = locust("scenario", classes, args.duration)
        capacity = locust("agent-capacity", ["AgentApiUser"], args.ceiling_duration) if args.agents else None
        # Measured again after: other work on the machine comes and goes.
        ceiling_after = locust("ceiling-after", ["CeilingUser"], args.ceiling_duration)
        time.sleep(1.5)
        sampler.halt.set()

        print("load: checking the database and the bucket against what the agents were told", flush=True)
        ledgers = [str(p) for p in (work / "scenario.json", work / "agent-capacity.json") if p.exists()]
        run([PYTHON, "bench/load_data.py", "check", "--seed", str(seed_path), "--ledger", *ledgers,
             "--out", str(work / "check.json")], env, "check")  # fmt: skip
        audit = json.loads((work / "check.json").read_text())

        # --- report
        c_sum, s_sum, c2_sum = summarise(ceiling), summarise(scenario), summarise(ceiling_after)
        print("\n" + "=" * 100)
        print(
            f"ReClo load bench: {args.agents} agents + {args.browsers} browser users, scenario {args.duration:.0f} s, "
            f"ceiling {args.ceiling_duration:.0f} s; gunicorn {args.gunicorn_workers} sync workers, "
            f"Celery {args.celery_concurrency} processes, PostgreSQL, Redis, moto; "
            f"{psutil.cpu_count()} cores, load average before {os.getloadavg()[0]:.1f}"
        )
        ceiling_cost = []
        for label, summary in (("before", c_sum), ("after", c2_sum)):
            print_table(f"CEILING {label.upper()} the scenario: bare Django view, same gunicorn, no wait", summary)
            requests = summary["rows"].get("ceiling", {}).get("requests", 0)
            window_cpu = sampler.between(summary["t0"], summary["t1"])
            ceiling_cost.append(print_cpu(f"the ceiling {label}", *window_cpu, requests))
        pacing = f"every {args.agent_pacing:g} s" if args.agent_pacing else "back to back"
        print_table(
            f"SCENARIO: agents back up {pacing} (poll every {args.poll_interval:g} s), browsers wait "
            f"{args.browser_wait[0]:g}-{args.browser_wait[1]:g} s between pages",
            s_sum,
        )
        portal_requests = sum(s_sum["rows"].get(g, {}).get("requests", 0) for g in ("agent", "pages"))
        scenario_cost = print_cpu("the scenario", *sampler.between(s_sum["t0"], s_sum["t1"]), portal_requests)

        ceil_rps = [x["rows"].get("ceiling", {"rps": 0.0})["rps"] for x in (c_sum, c2_sum)]
        ceil_row = {"rps": sum(ceil_rps) / 2}
        agent_row = s_sum["rows"].get("agent", {"rps": 0.0, "p99": math.nan, "errors": 0})
        pages_row = s_sum["rows"].get("pages", {"rps": 0.0, "p99": math.nan, "errors": 0})
        ceiling_ms = sum(ceiling_cost) / len(ceiling_cost)
        scenario_ratio = agent_row["rps"] / ceil_row["rps"] if ceil_row["rps"] else 0.0
        print(
            f"\n  the scenario's agent requests: {agent_row['rps']:.1f} req/s ({scenario_ratio:.1%} of the ceiling; "
            "set by the scenario's pace, S3 uploads and verification, not by the portal's capacity)"
        )
        if not math.isnan(ceiling_ms) and not math.isnan(scenario_cost):
            print(
                f"  gunicorn CPU: {scenario_cost:.2f} ms per scenario request (agent + pages), "
                f"{ceiling_ms:.2f} ms per ceiling request"
            )
        ratio = 0.0
        if capacity is not None:
            k_sum = summarise(capacity)
            print_table(
                "AGENT ENDPOINTS SATURATED: as many users as the ceiling's, no wait; each task lists its server's "
                "backups, starts an upload (row + STS credentials) and reads its status twice",
                k_sum,
            )
            k_row = k_sum["rows"].get("agent", {"rps": 0.0, "requests": 0})
            k_cost = print_cpu("the agent endpoints saturated", *sampler.between(k_sum["t0"], k_sum["t1"]),
                               k_row["requests"])  # fmt: skip
            ratio = k_row["rps"] / ceil_row["rps"] if ceil_row["rps"] else 0.0
            print(
                f"\n  agent endpoints: {k_row['rps']:.1f} req/s = {ratio:.1%} of the ceiling's "
                f"{ceil_row['rps']:.1f} req/s (mean of {ceil_rps[0]:.1f} before and {ceil_rps[1]:.1f} after)"
            )
            if not math.isnan(ceiling_ms) and not math.isnan(k_cost):
                print(
                    f"  cross-check by gunicorn's CPU, robust to other load on the machine: {k_cost:.2f} ms per agent "
                    f"request against {ceiling_ms:.2f} ms per ceiling request = {ceiling_ms / k_cost:.1%}"
                )
        errors = scenario["errors"] + ceiling["errors"] + ceiling_after["errors"] + (capacity or {}).get("errors", [])
        if errors:
            print("\n  errors (endpoint, what, count):")
            for name, what, count in errors[:15]:
                print(f"    {count:5d}  {name}: {what}")
        for log_name in ("gunicorn", "celery", "moto"):
            problems = log_problems(work / f"{log_name}.log")
            if problems:
                print(f"\n  {log_name} log problems:")
                for line in problems:
                    print("    " + line)

        print(
            f"\n  backups: agents were told of {audit['told_started']} uploads, {audit['told_completed']} completed, "
            f"{audit['told_verified']} verified; the database holds {audit['rows']} rows of agent accounts "
            f"{audit['row_statuses']}"
        )
        left = audit["started_not_completed"]
        if left:
            still = sum(1 for _id, status in left if status == "pending")
            print(f"    uploads started and never completed (the saturation run's, by design): {len(left)}, "
                  f"{still} of them still pending as they should be")  # fmt: skip
        for key in ("missing", "not_verified", "object_missing_or_wrong_size", "agent_and_db_disagree", "extra_rows",
                    "abandoned_not_pending", "completed_not_started"):  # fmt: skip
            if audit[key]:
                print(f"    {key}: {len(audit[key])}, e.g. {audit[key][:3]}")
        if audit["duplicates_told"]:
            print(f"    ids told twice: {audit['duplicates_told']}")

        error_count = sum(n for _name, _what, n in errors)
        p99s = [r["p99"] for r in (agent_row, pages_row) if not math.isnan(r["p99"])]
        targets = [
            (ratio >= TARGET_RATIO, f"agent endpoints saturated >= {TARGET_RATIO:.0%} of the ceiling ({ratio:.1%})"),
            (
                bool(p99s) and max(p99s) < TARGET_P99_MS,
                f"p99 < {TARGET_P99_MS:.0f} ms in the scenario (agent {agent_row['p99']:.0f} ms, "
                f"pages {pages_row['p99']:.0f} ms)",
            ),
            (error_count == 0, f"zero errors ({error_count})"),
            (audit["ok"], "zero lost or duplicated backups (database and bucket agree with the agents)"),
        ]
        print()
        for ok, text in targets:
            print(f"  {'PASS' if ok else 'FAIL'}  {text}")
        print(f"\n  (whole bench {time.time() - started:.0f} s)")
        return 0
    except KeyboardInterrupt:
        print("\nload: interrupted; tearing down", file=sys.stderr, flush=True)
        return 130
    except Exception as exc:  # noqa: BLE001 - report, tear down, keep the logs
        keep = True
        print(f"\nload: {exc}", file=sys.stderr, flush=True)
        for name in list(stack.procs):
            if stack.procs[name].poll() is not None:
                print(f"--- {name} exited {stack.procs[name].returncode}:\n{stack.tail(name)}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not leave orphans
        sampler.halt.set()
        stack.stop_all()
        if made_db and admin is not None:
            try:
                with admin.cursor() as cur:
                    cur.execute(f'DROP DATABASE IF EXISTS "{args.db_name}" WITH (FORCE)')
            except psycopg2.Error as exc:
                print(f"load: could not drop database {args.db_name}: {exc}", file=sys.stderr)
        if admin is not None:
            admin.close()
        if flush_redis:
            try:
                red.flushdb()
            except redis.RedisError as exc:
                print(f"load: could not flush {redis_url}: {exc}", file=sys.stderr)
        if keep:
            print(f"load: logs and figures kept in {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
        signal.signal(signal.SIGINT, signal.default_int_handler)


if __name__ == "__main__":
    sys.exit(main())
