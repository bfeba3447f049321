"""``schedule install|remove``: systemd units or a cron entry, and their removal."""

import json
import random

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
    return path


def test_parse_every():
    assert schedule.parse_every("1h") == 3600
    assert schedule.parse_every("30m") == 1800
    assert schedule.parse_every("1d") == 86400
    for bad in ("5m", "hourly", "1w", ""):
        with pytest.raises(UsageError):
            schedule.parse_every(bad)


def test_cron_spec_spreads_the_minute_but_keeps_the_interval():
    rnd = random.Random(3)
    minute, hour, *_ = schedule.cron_spec(3600, rnd).split()
    assert minute.isdigit() and hour == "*"
    assert schedule.cron_spec(1800, rnd).split()[0].endswith("-59/30")
    assert schedule.cron_spec(6 * 3600, rnd).split()[1].endswith("-23/6")
    assert schedule.cron_spec(86400, rnd).split()[2:] == ["*", "*", "*"]
    with pytest.raises(UsageError, match="cron cannot"):
        schedule.cron_spec(7 * 3600, rnd)


def test_systemd_install_and_remove(cfg, tmp_path, capsys):
    units = tmp_path / "units"
    assert cli.main(["schedule", "install", "--every", "6h", "/dev/sda", "--server", "web1",
                     "--unit-dir", str(units)]) == 0  # fmt: skip
    service = (units / "reclo-agent-backup.service").read_text()
    timer = (units / "reclo-agent-backup.timer").read_text()
    assert "Type=oneshot" in service
    assert "backup --scheduled" in service and f"--config {cfg.resolve()}" in service
    assert "OnUnitActiveSec=21600s" in timer and "WantedBy=timers.target" in timer
    jobs, meta = schedule.load_jobs(tmp_path / "state")
    assert jobs == [schedule.Job("/dev/sda", "web1", "sda")] and meta["method"] == "systemd"
    assert "systemctl enable --now" in capsys.readouterr().out

    assert cli.main(["schedule", "remove", "--unit-dir", str(units)]) == 0
    assert list(units.iterdir()) == []
    assert schedule.load_jobs(tmp_path / "state")[0] == []
    assert cli.main(["schedule", "remove", "--unit-dir", str(units)]) == 0
    assert "No scheduled backups" in capsys.readouterr().out


def test_cron_install_keeps_other_entries_and_remove_takes_only_ours(cfg, tmp_path):
    cron = tmp_path / "cron.d-reclo"
    cron.write_text("MAILTO=ops@example.com\n17 3 * * * root /usr/local/bin/other-job\n")
    assert cli.main(["schedule", "install", "--every", "30m", "/srv/disk.img", "--cron-file", str(cron)]) == 0
    text = cron.read_text()
    assert "other-job" in text and "MAILTO" in text
    ours = [line for line in text.splitlines() if "--scheduled" in line]
    assert len(ours) == 1
    assert "-59/30 * * * * root " in ours[0] and "scheduled.log" in ours[0]
    # Installing again replaces our entry instead of adding a second one.
    assert cli.main(["schedule", "install", "--every", "1h", "/srv/disk.img", "--cron-file", str(cron)]) == 0
    assert sum("--scheduled" in line for line in cron.read_text().splitlines()) == 1
    assert cli.main(["schedule", "remove", "--cron-file", str(cron)]) == 0
    assert cron.read_text() == "MAILTO=ops@example.com\n17 3 * * * root /usr/local/bin/other-job\n"


def test_install_without_sources_uses_the_disks_backed_up_before(cfg, tmp_path, capsys):
    assert cli.main(["schedule", "install", "--unit-dir", str(tmp_path / "u")]) == 2
    assert "make a first backup" in capsys.readouterr().err


def test_an_enrolled_agent_schedules_its_own_server(cfg, tmp_path, capsys):
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "server": "front-desk"}))
    units = tmp_path / "units"
    assert cli.main(["schedule", "install", "/dev/sda", "--unit-dir", str(units)]) == 0
    assert schedule.load_jobs(tmp_path / "state")[0] == [schedule.Job("/dev/sda", "front-desk", "sda")]
    assert cli.main(["schedule", "install", "/dev/sda", "--server", "web1", "--unit-dir", str(units)]) == 2
    assert "enrolled as server front-desk" in capsys.readouterr().err
