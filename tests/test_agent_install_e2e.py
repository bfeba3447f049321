"""From "Add a server" to a verified first backup by pasting one line into a shell.

A real browser signs the owner in, adds the server and copies the install
line off the page; the line runs in a shell exactly as shown (curl, sudo,
sh), with options appended so nothing outside temporary folders changes:
``--prefix`` for the agent, ``--source`` a small disk image, ``--root`` for
the schedule (a fake root whose cron daemon is a live process named cron,
as in agent/tests), ``--backup-now`` for the first backup. The portal is
pytest-django's live server with eager Celery (the verifier runs when the
upload completes), S3 is moto's server on a loopback port.

Then: the portal's badge says "on schedule", the owner's password is
nowhere on the server, a rerun of the same line upgrades in place keeping
the state, and one command uninstalls.
"""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from backups.models import Backup, Server
from reclo_site import testing

from .browser import chromium_page, sign_in
from .test_agent_e2e import cloud  # noqa: F401 - the fixture: moto's server on a loopback port

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

SHOTS = os.environ.get("RECLO_SCREENSHOTS", "")


@pytest.fixture
def fake_root(tmp_path):
    """A root folder for the schedule, with a running "cron" (a copy of sleep) in run/crond.pid."""
    root = tmp_path / "root"
    (root / "run").mkdir(parents=True)
    binary = tmp_path / "cron"
    shutil.copy("/bin/sleep", binary)
    proc = subprocess.Popen([str(binary), "600"])
    (root / "run" / "crond.pid").write_text(f"{proc.pid}\n")
    yield root
    proc.kill()
    proc.wait()


def shell(line: str, timeout=600) -> subprocess.CompletedProcess:
    """Paste `line` into a shell."""
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": os.environ.get("HOME", "/root"), "LANG": "C.UTF-8"}
    return subprocess.run(["sh", "-c", line], capture_output=True, text=True, timeout=timeout, env=env)


def files_under(*folders: Path):
    for folder in folders:
        for path in folder.rglob("*"):
            if path.is_file() and not path.is_symlink():
                yield path


@pytest.mark.usefixtures("cloud")
def test_paste_one_line_from_add_a_server_to_a_verified_first_backup(live_server, user, settings, fake_root, tmp_path):
    for tool in ("curl", "sudo", "sh", "tar"):
        testing.require_tool(tool)
    testing.agent_bundle()
    settings.SITE_URL = live_server.url
    prefix, image = tmp_path / "opt" / "reclo-agent", tmp_path / "disk.img"
    image.write_bytes(os.urandom(3 * 1024 * 1024) + bytes(5 * 1024 * 1024))
    with chromium_page() as page:
        sign_in(page, live_server.url, user.email, testing.PASSWORD)
        page.click("nav >> text=Add a server")
        page.fill("#id_name", "front-desk")
        page.click("text=Make an enrollment key")
        line = page.locator("[data-testid=install-command]").inner_text().strip()
        assert line.startswith(f"curl -fsSL {live_server.url}/agent/install.sh | sudo sh -s -- --key ")

        extra = f" --prefix {prefix} --source {image} --root {fake_root} --backup-now"
        run = shell(line + extra)
        out = run.stdout + run.stderr
        assert run.returncode == 0, out
        assert "installed reclo-agent 0.1.0" in out and "Enrolled at" in out and "as server front-desk" in out
        assert "Scheduled a backup every 1h" in out and "next backup at" in out
        backup_id, kind = run.stdout.strip().splitlines()[-2].split()  # the backup's line, before "done"
        backup = Backup.objects.get(pk=backup_id)
        assert (kind, backup.status, backup.server.name) == ("full", "verified", "front-desk")
        server = Server.objects.get(user=user, name="front-desk")
        assert server.schedule == "1h" and server.next_run is not None and server.agent_version == "0.1.0"

        # The schedule runs the installed launcher by its absolute path.
        cron = (fake_root / "etc" / "cron.d" / "reclo-agent").read_text()
        assert f"root {prefix}/bin/reclo-agent --config {prefix}/etc/agent.json backup --scheduled" in cron

        page.goto(f"{live_server.url}/servers/{server.pk}/")
        assert page.locator("[data-testid=health]").inner_text().strip() == "on schedule"
        if SHOTS:
            page.screenshot(path=os.path.join(SHOTS, "installed-server.png"), full_page=True)

    # The owner's password is nowhere on the server: not in a file, not in what was printed.
    assert testing.PASSWORD not in out
    for path in files_under(prefix, fake_root):
        assert testing.PASSWORD.encode() not in path.read_bytes(), path
    config = json.loads((prefix / "etc" / "agent.json").read_text())
    assert config["server"] == "front-desk" and config["email"] == "" and "password" not in json.dumps(config)

    # Pasting the same line again upgrades in place: the key is used up, the credential and state stay.
    state = sorted(p.name for p in (prefix / "state").rglob("*"))
    again = shell(line + f" --prefix {prefix} --source {image} --root {fake_root}")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "already enrolled" in again.stdout and "next backup at" in again.stdout
    assert set(state) <= {p.name for p in (prefix / "state").rglob("*")}
    assert len(list((prefix / "versions").iterdir())) == 1
    assert cron == (fake_root / "etc" / "cron.d" / "reclo-agent").read_text()  # same slot, same entry

    # One command uninstalls; the configuration and state stay unless --purge.
    gone = shell(f"sudo {prefix}/bin/reclo-agent-uninstall")
    assert gone.returncode == 0, gone.stdout + gone.stderr
    assert not (fake_root / "etc" / "cron.d" / "reclo-agent").exists()
    assert not (prefix / "bin").exists() and not (prefix / "versions").exists()
    assert (prefix / "etc" / "agent.json").exists() and (prefix / "state").is_dir()
