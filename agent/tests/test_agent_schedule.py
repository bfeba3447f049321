"""``schedule install|remove|status`` under a fake root (``--root``), with and without a running scheduler.

"A running cron daemon" is a real process named ``cron`` (a copy of
``sleep``) whose pid is in ``ROOT/run/crond.pid``: what the agent checks on a
real machine, minus the reading of ``/etc/cron.d``, which no daemon does for a
fake root. systemd cannot run under a fake root, so there the install must
fail -- and does, after enabling the timer offline with the real ``systemctl --root``.
"""

import json
import random
import subprocess
from datetime import UTC, datetime, timedelta

import pytest
from reclo_agent import cli, schedule
from reclo_agent.errors import UsageError


@pytest.fixture
def cfg(tmp_path, monkeypatch):
    path = tmp_path / "agent.json"
    path.write_text(json.dumps({"portal": "https://p.example", "token": "T" * 32,
                                "state_dir": str(tmp_path / "state")}))  # fmt: skip
    path.chmod(0o600)
    monkeypatch.setenv("RECLO_AGENT_CONFIG", str(path))
    # No portal answers in these tests: the schedule's report to it is best effort.
    monkeypatch.setattr(cli, "_tell_portal", lambda cfg, servers: None)
    return path


@pytest.fixture
def disk(tmp_path):
    path = tmp_path / "disk.img"
    path.write_bytes(b"\0" * 4096)
    return path


def test_parse_every():
    assert schedule.parse_every("1h") == 3600
    assert schedule.parse_every("30m") == 1800
    assert schedule.parse_every("1d") == 86400
    for bad in ("5m", "hourly", "1w", "", "7h", "45m"):
        with pytest.raises(UsageError):
            schedule.parse_every(bad)


@pytest.mark.parametrize("every", ["15m", "30m", "1h", "6h", "12h", "1d"])
def test_the_systemd_calendar_the_cron_fields_and_the_next_run_agree(every):
    slot = schedule.Slot.pick(schedule.parse_every(every), random.Random(every))
    now = datetime(2026, 12, 2, 10, 7, 30, tzinfo=UTC)
    runs = [slot.next_after(now)]
    for _ in range(3):
        runs.append(slot.next_after(runs[-1]))
    assert all(b - a == timedelta(seconds=slot.every) for a, b in zip(runs, runs[1:], strict=False))
    assert timedelta(0) < runs[0] - now <= timedelta(seconds=slot.every)
    # systemd itself reads the calendar: its next elapses are ours.
    base = runs[0].astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    out = subprocess.run(
        ["systemd-analyze", "calendar", "--iterations=4", slot.calendar(), "--base-time", base],
        capture_output=True, text=True, env={"TZ": "UTC", "PATH": "/usr/bin:/bin"}, check=True,
    ).stdout  # fmt: skip
    theirs = [
        line.split(": ", 1)[1].split()[1:3] for line in out.splitlines() if "Next elapse" in line or "Iter." in line
    ]
    ours = [r.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S").split() for r in [*runs[1:], slot.next_after(runs[3])]]
    assert theirs == ours
    minute, hour = slot.cron().split()[:2]
    assert minute.startswith(str(slot.minute))


def test_without_a_running_scheduler_install_fails_and_records_nothing(cfg, root, disk, capsys):
    assert cli.main(["schedule", "install", "--every", "1h", str(disk), "--root", str(root)]) == 9
    err = capsys.readouterr().err
    assert "no cron daemon is running" in err and "Nothing was installed" in err
    assert not (root / "etc" / "cron.d" / "reclo-agent").exists()
    assert schedule.load_jobs(cfg.parent / "state") == ([], {})
    assert cli.main(["schedule", "status", "--root", str(root)]) == 0
    assert "schedule:   none" in capsys.readouterr().out


def test_with_a_running_cron_install_succeeds_and_status_follows_the_daemon(cfg, root, disk, cron_daemon, capsys,
                                                                             monkeypatch):  # fmt: skip
    monkeypatch.chdir(disk.parent)
    assert cli.main(["schedule", "install", "--every", "30m", "disk.img", "--root", str(root)]) == 0
    out = capsys.readouterr().out
    assert f"{disk} (" in out and "next backup at" in out
    line = next(x for x in (root / "etc/cron.d/reclo-agent").read_text().splitlines() if "--scheduled" in x)
    assert "-59/30 * * * * root /" in line and f"--config {cfg.resolve()}" in line  # absolute paths only
    jobs, meta = schedule.load_jobs(cfg.parent / "state")
    assert jobs[0].source == str(disk) and meta["method"] == "cron"

    assert cli.main(["schedule", "status", "--root", str(root)]) == 0
    out = capsys.readouterr().out
    assert "every 30m via cron, next run" in out and "last run:   none yet" in out
    state = schedule.status(state_dir=cfg.parent / "state", root=root)
    assert state.runs and timedelta(0) < state.next_run - datetime.now(UTC) <= timedelta(minutes=30)

    cron_daemon.stop()
    assert cli.main(["schedule", "status", "--root", str(root)]) == 9
    assert (
        "NOT RUNNING" in capsys.readouterr().out
        and "no cron daemon" in schedule.status(state_dir=cfg.parent / "state", root=root).problem
    )


def test_systemd_under_a_fake_root_is_refused_after_enabling_it_offline(cfg, root, disk, capsys):
    (root / "run" / "systemd" / "system").mkdir(parents=True)
    assert cli.main(["schedule", "install", "--every", "6h", str(disk), "--root", str(root)]) == 9
    err = capsys.readouterr().err
    assert "no systemd is running" in err and "only enabled" in err  # systemctl --root did enable it
    assert list((root / "etc" / "systemd" / "system").glob("reclo-agent-backup.*")) == []
    assert schedule.load_jobs(cfg.parent / "state")[0] == []


def test_the_units_run_persistently_on_the_calendar_with_absolute_paths(cfg):
    slot = schedule.Slot(every=3600, minute=17)
    units = schedule.systemd_units(schedule.agent_command(cfg), slot, user=False)
    service, timer = units["reclo-agent-backup.service"], units["reclo-agent-backup.timer"]
    assert "Type=oneshot" in service and "backup --scheduled" in service
    assert f"ExecStart=/{' '.join(schedule.agent_command(cfg))[1:]}" in service
    assert "OnCalendar=*-*-* *:17:00" in timer and "Persistent=true" in timer and "WantedBy=timers.target" in timer


def test_an_unreadable_source_is_refused_at_install(cfg, root, cron_daemon, tmp_path, capsys):
    assert cli.main(["schedule", "install", str(tmp_path / "gone.img"), "--root", str(root)]) == 5
    assert "Cannot read" in capsys.readouterr().err
    assert not (root / "etc" / "cron.d" / "reclo-agent").exists()


def test_cron_install_keeps_other_entries_and_remove_takes_only_ours(cfg, root, disk, cron_daemon):
    cron = root / "etc" / "cron.d" / "reclo-agent"
    cron.parent.mkdir(parents=True)
    cron.write_text("MAILTO=ops@example.com\n17 3 * * * root /usr/local/bin/other-job\n")
    assert cli.main(["schedule", "install", "--every", "30m", str(disk), "--root", str(root)]) == 0
    text = cron.read_text()
    assert "other-job" in text and "MAILTO" in text
    assert sum("--scheduled" in line for line in text.splitlines()) == 1
    # Installing again replaces our entry (same slot for the same interval) instead of adding a second one.
    assert cli.main(["schedule", "install", "--every", "30m", str(disk), "--root", str(root)]) == 0
    assert cron.read_text() == text
    assert cli.main(["schedule", "remove"]) == 0  # the root is remembered
    assert cron.read_text() == "MAILTO=ops@example.com\n17 3 * * * root /usr/local/bin/other-job\n"


def test_install_without_sources_uses_the_disks_backed_up_before(cfg, root, capsys):
    assert cli.main(["schedule", "install", "--root", str(root)]) == 2
    assert "make a first backup" in capsys.readouterr().err


def test_an_enrolled_agent_schedules_its_own_server(cfg, root, disk, cron_daemon, capsys):
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "server": "front-desk"}))
    assert cli.main(["schedule", "install", str(disk), "--root", str(root)]) == 0
    assert schedule.load_jobs(cfg.parent / "state")[0] == [schedule.Job(str(disk), "front-desk", "disk.img")]
    assert cli.main(["schedule", "install", str(disk), "--server", "web1", "--root", str(root)]) == 2
    assert "enrolled as server front-desk" in capsys.readouterr().err
