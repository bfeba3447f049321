"""``reclo-agent``: the command line (see agent/README.md for the full story).

    reclo-agent enroll --portal URL --key KEY
    reclo-agent login --portal URL --email EMAIL
    reclo-agent backup SOURCE [--server NAME] [--disk NAME] [--full] [--bandwidth-limit RATE]
                       [--freeze [--freeze-limit SECONDS]] [--pre-hook CMD] [--post-hook CMD]
    reclo-agent list [--json]
    reclo-agent restore BACKUP_ID TARGET [--force] [--changed-since BACKUP_ID]
    reclo-agent schedule install --every 1h [SOURCE ...] | schedule remove | schedule status
    reclo-agent status

Results go to stdout (``backup`` prints ``<backup id> <kind>``); log lines,
progress and errors to stderr. Every expected failure exits with its own
code (:mod:`.errors`) and a sentence saying what to do. The API token is
never printed or logged: it lives only in the config file (mode 0600).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import getpass
import json
import logging
import os
import re
import signal
import socket
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from . import __version__, config, files, names, preflight, schedule
from .api import PortalClient, normalize_portal_url
from .backup import BackupOptions, BackupRun
from .blockmap import PAGE_SIZES, MapStore
from .codes import Code
from .errors import (
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_OK,
    AgentError,
    PortalError,
    Terminated,
    TokenRejected,
    Unreachable,
    UsageError,
)
from .freeze import DEFAULT_LIMIT as DEFAULT_FREEZE_LIMIT
from .memory import keep_freed_buffers
from .progress import Reporter, human_bytes
from .restore import restore
from .state import UploadState
from .throttle import parse_rate

log = logging.getLogger("reclo_agent")

ENV_PASSWORD = "RECLO_PASSWORD"  # noqa: S105 - the variable's name, not a password
ENV_OTP = "RECLO_OTP"
RENEW_WITHIN = timedelta(days=14)
UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


# --- plumbing -------------------------------------------------------------------------


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time: while a rich progress
    bar is live it is rich's proxy, which prints log lines above the bar."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def _setup_logging(verbose: bool, quiet: bool) -> None:
    handler = _StderrHandler()
    # Timestamps with -v: they show where a slow run spends its time.
    fmt = "%(asctime)s reclo-agent: %(message)s" if verbose else "reclo-agent: %(message)s"
    handler.setFormatter(logging.Formatter(fmt))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    log.setLevel(logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO)
    # Never below WARNING: botocore's debug output includes request headers,
    # which carry the temporary credentials.
    for noisy in ("botocore", "boto3", "urllib3", "s3transfer"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _load_config(args) -> config.Config:
    return config.load(config.config_path(args.config))


def _client(cfg: config.Config) -> PortalClient:
    cfg.require_login()
    client = PortalClient(cfg.portal, cfg.token)
    _maybe_renew(cfg, client)
    return client


def _maybe_renew(cfg: config.Config, client: PortalClient) -> None:
    """Renew a token that expires within two weeks, so scheduled runs never lapse."""
    try:
        expires = datetime.fromisoformat(cfg.token_expires.replace("Z", "+00:00"))
    except ValueError:
        return
    if expires - datetime.now(UTC) > RENEW_WITHIN:
        return
    try:
        cfg.token_expires = client.renew_token()["token_expires"]
    except (Unreachable, PortalError) as exc:
        log.warning("could not renew the API token (expires %s): %s", cfg.token_expires, exc)
        return
    config.save(cfg)
    log.info("API token renewed; it now expires %s", cfg.token_expires)


def _page_size(text: str) -> int:
    text = text.strip().lower().removesuffix("b").removesuffix("i")
    try:
        value = int(text[:-1]) * 1024 if text.endswith("k") else int(text)
    except ValueError:
        value = 0
    if value not in PAGE_SIZES:
        raise argparse.ArgumentTypeError("page size must be one of 4K, 8K, 16K, 32K, 64K")
    return value


# --- commands --------------------------------------------------------------------------


def cmd_login(args) -> int:
    cfg = _load_config(args)
    portal = normalize_portal_url(args.portal)
    password = os.environ.get(ENV_PASSWORD)
    if password is None:
        if not sys.stdin.isatty():
            raise UsageError(f"No password: set {ENV_PASSWORD} or run login on a terminal to be asked.")
        password = getpass.getpass(f"Password for {args.email} at {portal}: ")
    client = PortalClient(portal)
    token_name = args.token_name or f"reclo-agent@{socket.gethostname()}"[:100]
    otp = args.otp or os.environ.get(ENV_OTP, "")
    try:
        try:
            body = client.login(args.email, password, token_name, otp=otp)
        except PortalError as exc:
            if exc.code != Code.LOGIN_FAILED or "otp" not in exc.fields or otp:
                raise
            # Two-factor is on and no code was given: ask for one on a terminal.
            if not sys.stdin.isatty():
                raise UsageError(
                    f"This account uses two-factor authentication: pass --otp CODE (or set {ENV_OTP})."
                ) from exc
            otp = input("Code from your authenticator app (or a recovery code): ").strip()
            body = client.login(args.email, password, token_name, otp=otp)
    except PortalError as exc:
        if exc.code == Code.LOGIN_FAILED:
            what = "two-factor code" if otp else "email and password"
            raise UsageError(f"The portal did not accept that {what}.") from exc
        raise
    cfg.portal, cfg.token, cfg.token_expires = portal, body["token"], body.get("token_expires", "")
    cfg.email, cfg.user_id, cfg.server = args.email, body.get("user_id"), ""
    if args.state_dir:
        cfg.state_dir = str(Path(args.state_dir).expanduser().resolve())
    elif not cfg.state_dir:
        cfg.state_dir = str(config.default_state_dir())
    config.save(cfg)
    print(f"Logged in to {portal} as {args.email}; token saved in {cfg.path} (expires {cfg.token_expires}).")
    return EXIT_OK


def cmd_enroll(args) -> int:
    cfg = _load_config(args)
    portal = normalize_portal_url(args.portal)
    key = args.key.strip()
    hostname = socket.gethostname()[:255]
    try:
        body = PortalClient(portal).enroll(key, hostname)
    except PortalError as exc:
        if exc.code == Code.BAD_ENROLLMENT_KEY:
            raise UsageError(
                "The portal did not accept that enrollment key: it is unknown, already used or older than "
                "24 hours. Make a new one in the portal (Add a server) and run this again."
            ) from exc
        raise
    cfg.portal, cfg.token, cfg.token_expires = portal, body["token"], body.get("token_expires", "")
    cfg.server, cfg.email, cfg.user_id = body["server"], "", None
    if args.state_dir:
        cfg.state_dir = str(Path(args.state_dir).expanduser().resolve())
    elif not cfg.state_dir:
        cfg.state_dir = str(config.default_state_dir())
    config.save(cfg)
    print(f"Enrolled at {portal} as server {cfg.server}; its credential is saved in {cfg.path} "
          f"(expires {cfg.token_expires}, renewed automatically).")  # fmt: skip
    print(f"Next: reclo-agent backup /dev/sda   (backs up as server {cfg.server})")
    return EXIT_OK


def cmd_logout(args) -> int:
    cfg = _load_config(args)
    cfg.require_login()
    try:
        PortalClient(cfg.portal, cfg.token).logout()
    except TokenRejected:
        pass  # already unusable: forgetting it is all that is left
    cfg.token, cfg.token_expires = "", ""
    config.save(cfg)
    print("Logged out; the token is revoked and removed from the config.")
    return EXIT_OK


def _server_name(cfg: config.Config, server: str | None) -> str:
    """The server to back up as: ``--server``, else the enrolled one, else this host's name."""
    if cfg.server and server and server != cfg.server:
        raise UsageError(
            f"This agent is enrolled as server {cfg.server}; its credential may not back up as {server}. "
            "Leave out --server, or enrol with a key made for that server."
        )
    if server:
        return names.check(server, "server name")
    return cfg.server or names.default_server()


def _backup_options(args, cfg: config.Config, source: str, server: str | None, disk: str | None,
                    read: dict | None = None) -> BackupOptions:  # fmt: skip
    """The options of one backup: the command line's, else those ``schedule install`` saved (``read``)."""
    read = read or {}
    rate = args.bandwidth_limit or cfg.bandwidth_limit
    return BackupOptions(
        source=source,
        server=_server_name(cfg, server),
        disk=names.check(disk, "disk name") if disk else names.default_disk(source),
        full=args.full,
        page_size=args.page_size,
        bandwidth=parse_rate(rate) if rate else None,
        freeze=args.freeze or bool(read.get("freeze")),
        freeze_limit=args.freeze_limit or read.get("freeze_limit") or DEFAULT_FREEZE_LIMIT,
        pre_hook=args.pre_hook or read.get("pre_hook"),
        post_hook=args.post_hook or read.get("post_hook"),
    )


def _report_backup(result, as_json: bool = False) -> None:
    detail = f"{human_bytes(result.file_size or 0)} stored"
    if result.kind == "incremental":
        detail += f" for {human_bytes(result.changed_bytes)} of changed pages"
    if result.skipped_parts:
        detail += f"; resumed, {result.skipped_parts} parts were already uploaded"
    log.info("backup %s (%s, %s) verified: %s", result.backup_id, result.kind, result.consistency, detail)
    if as_json:
        print(json.dumps(dataclasses.asdict(result)), flush=True)
    else:
        print(f"{result.backup_id} {result.kind}", flush=True)


def _report_status(client: PortalClient, cfg: config.Config, server: str, *, preflight_run: bool = True) -> None:
    """Tell the portal this agent's schedule (as the scheduler really has it), version, last
    scheduled run and (on Linux) bootability preflight.

    Best effort: a portal that cannot take it (an older one) costs a log line, not the backup.
    """
    state = schedule.status(state_dir=cfg.state)
    last = state.last_run or {}
    body = {
        # A schedule that would not run is no schedule: the portal shows "no schedule installed".
        "schedule": state.every if state.runs else None,
        "next_run": state.next_run.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ") if state.next_run else None,
        "agent_version": __version__,
        "last_run_at": last.get("at"),
        "last_result": last.get("result"),
        "last_message": last.get("message", ""),
        "preflight": None,
    }
    if preflight_run and sys.platform.startswith("linux"):
        try:
            body["preflight"] = preflight.run("/", disk=preflight.disk_of("/"), cache_dir=cfg.state)
        except OSError as exc:
            log.warning("the bootability preflight could not run: %s", exc)
        else:
            for check in body["preflight"]["checks"]:
                if check["status"] == preflight.FAIL:
                    log.warning("preflight: %s: %s. Fix: %s", check["name"], check["detail"], check["fix"])
    try:
        client.report_status(server, **body)
    except (PortalError, Unreachable) as exc:
        log.warning("could not report the agent's status to the portal: %s", exc)


def _run_backup(client, cfg, options, reporter, as_json: bool, *, report: bool = True) -> int:
    result = BackupRun(client, cfg.state, options, reporter).run()
    _report_backup(result, as_json)
    if report:
        _report_status(client, cfg, options.server)
    if result.hook_error:
        log.error("the restore point is stored, but %s", result.hook_error)
        return EXIT_FAILURE
    return EXIT_OK


def cmd_backup(args) -> int:
    cfg = _load_config(args)
    client = _client(cfg)
    reporter = Reporter(plain=args.plain or None, quiet=args.quiet)
    if args.scheduled:
        return _scheduled(args, cfg, client, reporter)
    if not args.source:
        raise UsageError("Give the SOURCE to back up: a block device (/dev/sda) or a raw disk image file.")
    options = _backup_options(args, cfg, args.source, args.server, args.disk)
    return _run_backup(client, cfg, options, reporter, args.json)


def _scheduled(args, cfg, client, reporter) -> int:
    jobs, meta = schedule.load_jobs(cfg.state)
    if not jobs:
        raise UsageError("No scheduled backups; set them up with: reclo-agent schedule install --every 1h SOURCE")
    worst = EXIT_OK
    failures = []
    finished = False
    # Reported as the run starts, so a long backup does not look late to the portal.
    for server in dict.fromkeys(job.server for job in jobs):
        _report_status(client, cfg, server, preflight_run=False)
    try:
        for job in jobs:
            try:
                options = _backup_options(args, cfg, job.source, job.server, job.disk, meta.get("read"))
                code = _run_backup(client, cfg, options, reporter, args.json, report=False)
                if code:
                    failures.append(f"{job.server}/{job.disk}: a hook failed")
                worst = worst or code
            except AgentError as exc:
                log.error("backup of %s (%s/%s) failed: %s", job.source, job.server, job.disk, exc)
                failures.append(f"{job.server}/{job.disk}: {exc}")
                worst = worst or exc.exit_code
                if isinstance(exc, TokenRejected):
                    break  # every other job would fail the same way
        finished = True
    finally:
        # Also when interrupted: the portal hears that this run did not finish.
        if not finished:
            failures.append("the run was interrupted")
        schedule.record_run(cfg.state, ok=not failures, message="; ".join(failures))
        for server in dict.fromkeys(job.server for job in jobs):
            _report_status(client, cfg, server)
    return worst


def cmd_list(args) -> int:
    client = _client(_load_config(args))
    backups = list(client.iter_backups(server=args.server))
    if args.json:
        json.dump(backups, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return EXIT_OK
    if not backups:
        print("No backups yet.")
        return EXIT_OK
    header = ("BACKUP ID", "SERVER", "DISK", "KIND", "STATUS", "STORED", "DISK SIZE", "CREATED")
    rows = [
        (
            str(b.get("backup_id")),
            str(b.get("server")),
            str(b.get("disk")),
            str(b.get("kind")),
            str(b.get("status")),
            human_bytes(b["file_size"]) if b.get("file_size") is not None else "-",
            human_bytes(b["virtual_size"]) if b.get("virtual_size") is not None else "-",
            str(b.get("date_created") or ""),
        )
        for b in backups
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    failed = [b for b in backups if b.get("status") == "failed" and b.get("failure")]
    for b in failed:
        print(f"  {b['backup_id']} failed: {b['failure']}")
    return EXIT_OK


def _resolve_backup_id(client: PortalClient, given: str) -> str:
    """The full id of a restore point given by its id or a unique prefix of it (like git).

    An unknown or ambiguous id is a usage error naming the closest match, never
    the portal's "no such endpoint" (a short id is not an id in a URL).
    """
    text = given.strip().lower()
    if UUID_RE.match(text):
        try:
            client.get_backup(text)
            return text
        except PortalError as exc:
            if exc.code != Code.NOT_FOUND:
                raise
    ids = [str(b.get("backup_id")) for b in client.iter_backups()]
    matches = [i for i in ids if i.startswith(text)] if text else []
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise UsageError(
            f"{given!r} is the start of {len(matches)} restore points ({', '.join(matches[:3])}"
            f"{', ...' if len(matches) > 3 else ''}); give more of the id."
        )
    closest = difflib.get_close_matches(text, ids, n=1, cutoff=0) if ids else []
    hint = f" The closest is {closest[0]}." if closest else " This account has no restore points yet."
    raise UsageError(f"There is no restore point with that id ({given}).{hint} `reclo-agent list` shows them all.")


def cmd_restore(args) -> int:
    client = _client(_load_config(args))
    reporter = Reporter(plain=args.plain or None, quiet=args.quiet)
    changed_since = _resolve_backup_id(client, args.changed_since) if args.changed_since else None
    result = restore(client, _resolve_backup_id(client, args.backup_id), args.target, reporter, force=args.force,
                     changed_since=changed_since)  # fmt: skip
    if args.json:
        print(json.dumps(dataclasses.asdict(result)))
        return EXIT_OK
    size = human_bytes(result.virtual_size)
    objects = f"{result.layers} object" + ("s" if result.layers != 1 else "")
    print(f"Restored {result.backup_id} ({size}, {objects}) to {args.target}.")
    return EXIT_OK


def _schedule_jobs(args, cfg: config.Config) -> list[schedule.Job]:
    """The disks to schedule, with absolute, readable sources (checked now, not at the first run)."""
    if not args.sources:
        return [schedule.Job(schedule.absolute_source(m.source), m.server, m.disk)
                for m in MapStore(cfg.state).all() if m.source]  # fmt: skip
    if args.disk and len(args.sources) > 1:
        raise UsageError("--disk names one disk; with several sources each is named after its file.")
    return [
        schedule.Job(
            source=schedule.absolute_source(src),
            server=_server_name(cfg, args.server),
            disk=names.check(args.disk, "disk name") if args.disk else names.default_disk(src),
        )
        for src in args.sources
    ]


def _tell_portal(cfg: config.Config, servers) -> None:
    """Report a schedule change to the portal (best effort: the schedule stands either way)."""
    if not cfg.token:
        return
    try:
        client = _client(cfg)
    except AgentError as exc:
        log.warning("could not report the schedule to the portal: %s", exc)
        return
    for server in dict.fromkeys(servers):
        _report_status(client, cfg, server, preflight_run=False)


def cmd_files(args) -> int:
    client = _client(_load_config(args))
    place = files.parse_place(args.path)
    body = client.files(args.backup_id, place.partition, place.path)
    if args.json:
        print(json.dumps(body.get("partitions", body.get("entries")), indent=2))
        return EXIT_OK
    for line in files.listing_lines(body):
        print(line)
    return EXIT_OK


def cmd_restore_files(args) -> int:
    client = _client(_load_config(args))
    places = [files.parse_place(p) for p in args.paths]
    done = files.restore_files(client, args.backup_id, places, args.to)
    if args.json:
        print(json.dumps(done))
        return EXIT_OK
    for d in done:
        print(f"Restored {d['path']} to {d['written']} ({d['files']} file(s), {human_bytes(d['bytes'])}).")
    return EXIT_OK


def cmd_schedule(args) -> int:
    cfg = _load_config(args)
    if args.action == "status":
        return _print_schedule(cfg, args.root)
    if args.action == "remove":
        jobs, _ = schedule.load_jobs(cfg.state)
        removed = schedule.remove(state_dir=cfg.state, method=args.method, root=args.root)
        print("Scheduled backups removed." if removed else "No scheduled backups were installed.")
        _tell_portal(cfg, [j.server for j in jobs] or ([cfg.server] if cfg.server else []))
        return EXIT_OK
    cfg.require_login()
    jobs = _schedule_jobs(args, cfg)
    installed = schedule.install(
        jobs=jobs,
        every=args.every,
        config_path=cfg.path,
        state_dir=cfg.state,
        method=args.method,
        root=args.root,
        read={"freeze": args.freeze, "freeze_limit": args.freeze_limit, "pre_hook": args.pre_hook,
              "post_hook": args.post_hook},
    )  # fmt: skip
    print(f"Scheduled a backup every {args.every} of: " + ", ".join(f"{j.source} ({j.server}/{j.disk})" for j in jobs))
    print(f"Runs by {installed.where}; next backup at {_when(installed.next_run)}.")
    _tell_portal(cfg, [j.server for j in jobs])
    return EXIT_OK


def _when(at: datetime) -> str:
    return at.astimezone().strftime("%Y-%m-%d %H:%M %Z")


def _print_schedule(cfg: config.Config, root: str | None) -> int:
    """The schedule line(s) of ``status``; non-zero when a recorded schedule would not run."""
    state = schedule.status(state_dir=cfg.state, root=root)
    code = EXIT_OK
    if not state.jobs:
        print("schedule:   none (reclo-agent schedule install --every 1h SOURCE)")
    elif state.runs:
        when = _when(state.next_run) if state.next_run else "unknown (install the schedule again)"
        print(f"schedule:   every {state.every} via {state.method}, next run {when}: "
              + ", ".join(f"{j.source} ({j.server}/{j.disk})" for j in state.jobs))  # fmt: skip
    else:
        print(f"schedule:   NOT RUNNING: every {state.every} via {state.method} is recorded, but {state.problem}. "
              "Fix that, or run schedule install again.")  # fmt: skip
        code = schedule.ScheduleError.exit_code
    last = state.last_run
    if last:
        detail = f": {last['message']}" if last.get("message") else ""
        print(f"last run:   {last.get('at')} {last.get('result')}{detail}")
    elif state.jobs:
        print("last run:   none yet")
    return code


def cmd_status(args) -> int:
    cfg = _load_config(args)
    code = EXIT_OK
    mode = f"mode {oct(cfg.path.stat().st_mode & 0o777)[2:]}" if cfg.path.exists() else "missing"
    print(f"config:     {cfg.path} ({mode})")
    print(f"portal:     {cfg.portal or '-'}")
    if not cfg.token:
        print("logged in:  no (reclo-agent enroll --portal URL --key KEY, or login --portal URL --email EMAIL)")
        code = 3
    else:
        try:
            client = _client(cfg)
            next(iter(client.iter_backups()), None)
            check = "token accepted"
        except TokenRejected:
            check, code = "token REJECTED: log in again", 3
        except Unreachable as exc:
            check, code = f"portal unreachable ({exc})", 4
        who = f"enrolled as server {cfg.server}" if cfg.server else (cfg.email or "?")
        print(f"logged in:  {who}, token expires {cfg.token_expires or '?'}; {check}")
    print(f"state:      {cfg.state}")
    maps = MapStore(cfg.state).all()
    for m in maps:
        print(f"disk:       {m.server}/{m.disk} from {m.source or '?'} ({human_bytes(m.virtual_size)}): "
              f"last restore point {m.backup_id} ({m.kind}, {m.created})")  # fmt: skip
    if not maps:
        print("disk:       none backed up yet")
    for server, disk, data in UploadState.all(cfg.state):
        print(f"unfinished: {server}/{disk} {data.get('kind')} upload {data.get('upload_id')} ({data.get('phase')}); "
              "the next backup of this disk resumes it")  # fmt: skip
    return code or _print_schedule(cfg, args.root)


# --- parser ---------------------------------------------------------------------------


def _common_options(*, suppress: bool) -> argparse.ArgumentParser:
    """Options accepted before and after the command name.

    After it they default to SUPPRESS: otherwise a subcommand's default
    would overwrite a value given before the command name.
    """
    common = argparse.ArgumentParser(add_help=False)
    default: dict[str, Any] = {"default": argparse.SUPPRESS} if suppress else {}
    common.add_argument(
        "--config", help=f"config file (default: ${config.ENV_CONFIG}, or {config.default_config_path()})", **default
    )
    common.add_argument("-v", "--verbose", action="store_true", help="debug log lines", **default)
    common.add_argument("-q", "--quiet", action="store_true", help="errors only, no progress", **default)
    common.add_argument("--plain", action="store_true", help="log lines instead of a progress bar", **default)
    return common


def _read_options(p: argparse.ArgumentParser) -> None:
    """How the disk is read: the freeze and the hooks (backup, and schedule install for every run)."""
    p.add_argument(
        "--freeze",
        action="store_true",
        help="freeze the disk's mounted file systems while it is read (small or quiet disks)",
    )
    p.add_argument(
        "--freeze-limit",
        type=float,
        default=None,
        metavar="SECONDS",
        help=f"thaw and stop the backup if the read takes longer (default {DEFAULT_FREEZE_LIMIT:.0f})",
    )
    p.add_argument("--pre-hook", metavar="CMD", help="shell command run before the disk is read (a database dump)")
    p.add_argument("--post-hook", metavar="CMD", help="shell command run after the read; runs even if it failed")


def build_parser() -> argparse.ArgumentParser:
    common = _common_options(suppress=True)
    parser = argparse.ArgumentParser(
        prog="reclo-agent",
        description="ReClo backup agent: image backups of this server's disks to the ReClo cloud.",
        parents=[_common_options(suppress=False)],
    )
    parser.add_argument("--version", action="version", version=f"reclo-agent {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("enroll", parents=[common], help="enrol this server with a one-time key from the portal")
    p.add_argument("--portal", required=True, help="portal URL, e.g. https://reclo.example.com")
    p.add_argument("--key", required=True, help="the enrollment key from the portal's Add a server (works once)")
    p.add_argument("--state-dir", help=f"state folder (default {config.default_state_dir()})")
    p.set_defaults(func=cmd_enroll)

    p = sub.add_parser("login", parents=[common], help="log in with the owner's password (for scripts)")
    p.add_argument("--portal", required=True, help="portal URL, e.g. https://reclo.example.com")
    p.add_argument("--email", required=True)
    p.add_argument("--state-dir", help=f"state folder (default {config.default_state_dir()})")
    p.add_argument("--token-name", help="name of the token in the portal (default reclo-agent@HOST)")
    p.add_argument("--otp", help="two-factor code, when the account has it on (asked on a terminal otherwise)")
    p.set_defaults(func=cmd_login)

    p = sub.add_parser("logout", parents=[common], help="revoke the API token and forget it")
    p.set_defaults(func=cmd_logout)

    p = sub.add_parser("backup", parents=[common], help="back up a disk (prints the backup id and kind)")
    p.add_argument("source", nargs="?", metavar="SOURCE", help="block device or raw disk image file")
    p.add_argument("--server", help="server name (default: the enrolled server, else this host's name)")
    p.add_argument("--disk", help="disk name (default: the source's file name)")
    p.add_argument("--full", action="store_true", help="make a full backup even if an incremental is possible")
    p.add_argument("--bandwidth-limit", metavar="RATE", help="upload at most RATE bytes/s, e.g. 10M, 512K")
    p.add_argument("--page-size", type=_page_size, default=4096, metavar="SIZE",
                   help="change-tracking page: 4K (default) to 64K; changing it forces a full backup")  # fmt: skip
    _read_options(p)
    p.add_argument("--scheduled", action="store_true", help="back up the disks `schedule install` set up")
    p.add_argument("--json", action="store_true", help="print the result as JSON (sizes, parts, timings)")
    p.set_defaults(func=cmd_backup)

    p = sub.add_parser("list", parents=[common], help="list the backups in the portal")
    p.add_argument("--json", action="store_true", help="the backup objects of the portal's API as JSON")
    p.add_argument("--server", help="only this server's backups")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("restore", parents=[common], help="write a restore point to a disk or image file")
    p.add_argument("backup_id", metavar="BACKUP_ID")
    p.add_argument("target", metavar="TARGET", help="block device or image file to write")
    p.add_argument("--force", action="store_true", help="overwrite an existing file or a block device")
    p.add_argument("--changed-since", metavar="BACKUP_ID",
                   help="TARGET already holds this earlier restore point of the chain: write only the blocks "
                   "that differ from it (a failback onto the repaired disk)")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print the result as JSON (sizes, timings)")
    p.set_defaults(func=cmd_restore)

    p = sub.add_parser("files", parents=[common], help="list a restore point's partitions, or a folder's files")
    p.add_argument("backup_id", metavar="BACKUP_ID")
    p.add_argument("path", metavar="PATH", nargs="?", help="PARTITION:/folder, e.g. 1:/home (none: the partitions)")
    p.add_argument("--json", action="store_true", help="the API's partitions or entries as JSON")
    p.set_defaults(func=cmd_files)

    p = sub.add_parser("restore-files", parents=[common], help="take files or folders back from a restore point")
    p.add_argument("backup_id", metavar="BACKUP_ID")
    p.add_argument("paths", metavar="PATH", nargs="+", help="PARTITION:/path of a file or a folder")
    p.add_argument("--to", required=True, metavar="DIR", help="the folder to write them into")
    p.add_argument("--json", action="store_true", help="print what was written as JSON")
    p.set_defaults(func=cmd_restore_files)

    p = sub.add_parser("schedule", parents=[common], help="install or remove recurring backups")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    place = _common_options(suppress=True)
    place.add_argument("--method", choices=["systemd", "cron"], help="default: systemd where it runs, else cron")
    place.add_argument("--root", metavar="DIR", help="system paths under DIR instead of / (tests, images)")
    q = actions.add_parser("install", parents=[place], help="back up every --every (systemd timer or cron)")
    q.add_argument("sources", nargs="*", metavar="SOURCE",
                   help="disks to back up (default: every disk backed up before)")  # fmt: skip
    q.add_argument("--every", default="1h", help="interval: 30m, 1h, 6h, 1d (default 1h)")
    q.add_argument("--server", help="server name (default: this host's name)")
    q.add_argument("--disk", help="disk name, with one SOURCE")
    _read_options(q)
    q.set_defaults(func=cmd_schedule)
    q = actions.add_parser("remove", parents=[place], help="remove the timer or cron entry")
    q.set_defaults(func=cmd_schedule)
    q = actions.add_parser("status", parents=[place], help="whether the timer really runs, the next and last run")
    q.set_defaults(func=cmd_schedule)

    p = sub.add_parser("status", parents=[common], help="configuration, login, disks, unfinished uploads, schedule")
    p.add_argument("--root", metavar="DIR", help="the schedule's system paths under DIR (as schedule install --root)")
    p.set_defaults(func=cmd_status)
    return parser


def _terminate(signum, frame) -> None:
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose, args.quiet)
    keep_freed_buffers()
    # SIGTERM unwinds like Ctrl-C: frozen file systems are thawed, snapshots removed.
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        return args.func(args)
    except AgentError as exc:
        print(f"reclo-agent: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except Terminated:
        print("reclo-agent: terminated. Run the same command again: an upload resumes where it stopped.",
              file=sys.stderr)  # fmt: skip
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print("reclo-agent: interrupted. Run the same command again: an upload resumes where it stopped.",
              file=sys.stderr)  # fmt: skip
        return EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - last resort: one line, details with -v
        if args.verbose:
            log.exception("unexpected error")
        print(f"reclo-agent: unexpected error: {type(exc).__name__}: {exc} (run with -v for details)",
              file=sys.stderr)  # fmt: skip
        return EXIT_FAILURE
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    raise SystemExit(main())
