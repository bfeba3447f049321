"""The command line: commands, exit codes, messages a person can act on, no token shown."""

import json
import os
import socket
import stat
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from agent_helpers import FakePortal, make_image, scatter_writes
from moto import mock_aws
from reclo_agent import api as api_module
from reclo_agent import cli
from reclo_agent.state import StateLock

TOKEN = "GoodToken0123456789abcdefghijklm"
ENROLL_KEY = "EnrollKey0123456789abcdefghijklm"
MiB = 1024 * 1024


class StubPortal(BaseHTTPRequestHandler):
    """Just enough of the accounts API: login, and a token check on the backups list."""

    def log_message(self, *args):  # keep the test output clean
        pass

    def _send(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):  # noqa: N802 - http.server's name
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path == "/api/v1/login":
            if body.get("password") == "right password":
                return self._send(200, {"message": "Logged in.", "user_id": 3, "token": TOKEN,
                                        "token_expires": "2099-01-01T00:00:00Z"})  # fmt: skip
            return self._send(401, {"error": 207, "message": "Email or password does not match."})
        if self.path == "/api/v1/enroll":
            if body.get("key") == ENROLL_KEY and body.get("hostname") == socket.gethostname():
                return self._send(201, {"message": "Enrolled.", "server": "front-desk", "token": TOKEN,
                                        "token_expires": "2099-01-01T00:00:00Z"})  # fmt: skip
            return self._send(401, {"error": 212, "message": "Invalid, used or expired enrollment key."})
        return self._send(404, {"error": 105, "message": "No such endpoint."})

    def do_GET(self):  # noqa: N802
        if self.headers.get("Authorization") != f"Token {TOKEN}":
            return self._send(401, {"error": 102, "message": "Token expired."})
        return self._send(200, {"message": "0", "count": 0, "next": None, "backups": []})


@pytest.fixture
def stub():
    server = ThreadingHTTPServer(("127.0.0.1", 0), StubPortal)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def cfg_path(tmp_path, monkeypatch):
    path = tmp_path / "conf" / "agent.json"
    monkeypatch.setenv("RECLO_AGENT_CONFIG", str(path))
    monkeypatch.delenv("RECLO_PASSWORD", raising=False)
    return path


def logged_in(cfg_path, tmp_path, portal="http://127.0.0.1:9", token=TOKEN):
    cfg_path.parent.mkdir(parents=True, exist_ok=True)
    cfg_path.write_text(json.dumps({"portal": portal, "token": token, "token_expires": "2099-01-01T00:00:00Z",
                                    "email": "a@example.com", "state_dir": str(tmp_path / "state")}))  # fmt: skip
    os.chmod(cfg_path, 0o600)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_login_saves_the_token_0600_and_never_prints_it(stub, cfg_path, monkeypatch, capsys):
    monkeypatch.setenv("RECLO_PASSWORD", "right password")
    assert cli.main(["-v", "login", "--portal", stub + "/", "--email", "a@example.com"]) == 0
    out, err = capsys.readouterr()
    assert TOKEN not in out + err
    assert "Logged in" in out
    assert stat.S_IMODE(cfg_path.stat().st_mode) == 0o600
    saved = json.loads(cfg_path.read_text())
    assert saved["token"] == TOKEN and saved["portal"] == stub
    # The saved token works; status says so without showing it.
    assert cli.main(["status"]) == 0
    out, err = capsys.readouterr()
    assert "token accepted" in out and TOKEN not in out + err


def test_enroll_saves_the_server_credential_0600_and_never_prints_it(stub, cfg_path, capsys):
    assert cli.main(["enroll", "--portal", stub, "--key", ENROLL_KEY]) == 0
    out, err = capsys.readouterr()
    assert TOKEN not in out + err and "server front-desk" in out
    assert stat.S_IMODE(cfg_path.stat().st_mode) == 0o600
    saved = json.loads(cfg_path.read_text())
    assert (saved["token"], saved["server"], saved["portal"]) == (TOKEN, "front-desk", stub)
    assert cli.main(["status"]) == 0
    out = capsys.readouterr().out
    assert "enrolled as server front-desk" in out and "token accepted" in out


def test_a_bad_enrollment_key_is_a_plain_message(stub, cfg_path, capsys):
    assert cli.main(["enroll", "--portal", stub, "--key", "Used0123456789abcdefghijklmnopqr"]) == 2
    err = capsys.readouterr().err
    assert "did not accept that enrollment key" in err and "Add a server" in err
    assert not cfg_path.exists()


def test_an_enrolled_agent_backs_up_as_its_server_only(fake, cfg_path, tmp_path, capsys):
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "server": "front-desk", "email": ""}))
    image = tmp_path / "disk.img"
    image.write_bytes(make_image(2 * MiB, seed=3))
    assert cli.main(["backup", str(image), "--plain"]) == 0
    assert [b["server"] for b in fake.backups.values()] == ["front-desk"]
    capsys.readouterr()
    assert cli.main(["backup", str(image), "--server", "other", "--plain"]) == 2
    assert "enrolled as server front-desk" in capsys.readouterr().err


def test_wrong_password_is_a_plain_message(stub, cfg_path, monkeypatch, capsys):
    monkeypatch.setenv("RECLO_PASSWORD", "wrong")
    assert cli.main(["login", "--portal", stub, "--email", "a@example.com"]) == 2
    assert "did not accept that email and password" in capsys.readouterr().err
    assert not cfg_path.exists()


def test_login_without_a_terminal_needs_the_environment_variable(stub, cfg_path, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", open(os.devnull))  # noqa: SIM115 - closed by pytest's teardown
    assert cli.main(["login", "--portal", stub, "--email", "a@example.com"]) == 2
    assert "RECLO_PASSWORD" in capsys.readouterr().err


def test_an_expired_token_says_log_in_again(stub, cfg_path, tmp_path, capsys):
    logged_in(cfg_path, tmp_path, portal=stub, token="Expired0123456789abcdefghijklmno")
    assert cli.main(["list"]) == 3
    err = capsys.readouterr().err
    assert "log in again" in err.lower() and "reclo-agent login" in err
    assert "Expired0123456789" not in err


def test_an_unreachable_portal_exits_4(cfg_path, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(api_module.time, "sleep", lambda s: None)
    logged_in(cfg_path, tmp_path, portal=f"http://127.0.0.1:{free_port()}")
    assert cli.main(["list"]) == 4
    assert "Cannot reach the portal" in capsys.readouterr().err


def test_commands_need_a_login(cfg_path, capsys):
    assert cli.main(["backup", "/dev/null"]) == 3
    assert "reclo-agent login" in capsys.readouterr().err
    assert cli.main(["status"]) == 3


@pytest.fixture
def fake(monkeypatch, cfg_path, tmp_path):
    """The CLI talking to the in-process fake portal (over moto)."""
    monkeypatch.setattr("moto.s3.models.S3_UPLOAD_PART_MIN_SIZE", 1024)
    with mock_aws():
        portal = FakePortal()
        monkeypatch.setattr(cli, "PortalClient", lambda url, token: portal)
        logged_in(cfg_path, tmp_path)
        yield portal


def test_backup_list_restore_through_the_command_line(fake, tmp_path, capsys):
    image = make_image(4 * MiB)
    source = tmp_path / "disk.img"
    source.write_bytes(bytes(image))
    assert cli.main(["backup", str(source), "--server", "web1", "--plain"]) == 0
    out, err = capsys.readouterr()
    full_id, kind = out.split()
    assert kind == "full" and full_id in fake.backups
    assert fake.backups[full_id]["disk"] == "disk.img"  # named after the file by default
    assert "verified" in err

    changed, _ = scatter_writes(image, 10)
    source.write_bytes(bytes(changed))
    assert cli.main(["backup", str(source), "--server", "web1", "--bandwidth-limit", "100M"]) == 0
    inc_id, kind = capsys.readouterr().out.split()
    assert kind == "incremental"

    assert cli.main(["list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [b["backup_id"] for b in listed] == [inc_id, full_id]
    assert cli.main(["list"]) == 0
    table = capsys.readouterr().out
    assert "BACKUP ID" in table and inc_id in table and "incremental" in table

    assert cli.main(["restore", inc_id, str(tmp_path / "out.img")]) == 0
    assert (tmp_path / "out.img").read_bytes() == bytes(changed)
    assert cli.main(["restore", inc_id, str(tmp_path / "out.img")]) == 2  # exists: needs --force
    assert "--force" in capsys.readouterr().err

    assert cli.main(["status"]) == 0
    status = capsys.readouterr().out
    assert f"web1/disk.img from {source}" in status and inc_id in status


def test_backup_errors_exit_with_their_codes(fake, tmp_path, capsys):
    assert cli.main(["backup", str(tmp_path / "missing.img")]) == 5
    assert "no such file" in capsys.readouterr().err
    assert cli.main(["backup", "/dev/null", "--server", "../etc"]) == 2
    assert "not allowed" in capsys.readouterr().err
    assert cli.main(["backup", "/dev/null", "--bandwidth-limit", "lots"]) == 2

    source = tmp_path / "disk.img"
    source.write_bytes(bytes(make_image(2 * MiB)))
    fake.verify_hook = lambda b: "footer checksum mismatch"
    assert cli.main(["backup", str(source)]) == 7
    err = capsys.readouterr().err
    assert "could not verify" in err and "footer checksum mismatch" in err

    fake.verify_hook = None
    with StateLock(tmp_path / "state"):
        assert cli.main(["backup", str(source)]) == 8
    assert "Another reclo-agent backup is running" in capsys.readouterr().err


def test_scheduled_runs_back_up_every_job_and_report_failures(fake, tmp_path, capsys, root, cron_daemon):
    good, gone = tmp_path / "good.img", tmp_path / "gone.img"
    good.write_bytes(bytes(make_image(2 * MiB)))
    gone.write_bytes(bytes(make_image(2 * MiB)))
    assert cli.main(["schedule", "install", "--every", "1h", str(good), str(gone), "--server", "web1",
                     "--root", str(root)]) == 0  # fmt: skip
    # The schedule change is reported: the real schedule and its next run.
    ((server, body),) = fake.statuses
    fake.statuses.clear()
    assert server == "web1" and body["schedule"] == "1h" and body["next_run"].endswith("Z")
    assert body["last_result"] is None
    gone.unlink()
    capsys.readouterr()
    assert cli.main(["backup", "--scheduled"]) == 5  # the missing disk fails, the other is backed up
    out, err = capsys.readouterr()
    assert out.split()[1] == "full"
    assert "gone.img" in err and "failed" in err
    start, last = fake.statuses[0][1], fake.statuses[-1][1]  # as the run starts, and after it
    assert len(fake.statuses) == 2 and start["last_result"] is None and start["schedule"] == "1h"
    assert last["last_result"] == "failed" and "web1/gone.img" in last["last_message"] and last["last_run_at"]
    assert cli.main(["status"]) == 0
    assert "failed: web1/gone.img" in capsys.readouterr().out

    cron_daemon.stop()  # the scheduler is gone: the agent says so, and tells the portal there is no schedule
    assert cli.main(["status"]) == 9
    assert "NOT RUNNING" in capsys.readouterr().out
    good.write_bytes(bytes(make_image(2 * MiB, seed=1)))
    assert cli.main(["backup", str(good), "--server", "web1"]) == 0
    assert fake.statuses[-1][1]["schedule"] is None


def test_token_near_expiry_is_renewed(fake, cfg_path, tmp_path):
    cfg = json.loads(cfg_path.read_text())
    cfg["token_expires"] = "2000-01-01T00:00:00Z"
    cfg_path.write_text(json.dumps(cfg))
    assert cli.main(["list"]) == 0
    assert "renew" in fake.calls
    assert json.loads(cfg_path.read_text())["token_expires"] > "2001"
    assert stat.S_IMODE(cfg_path.stat().st_mode) == 0o600


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    for command in ("login", "backup", "list", "restore", "schedule", "status"):
        assert command in out


def test_each_backup_reports_the_agents_status_with_the_preflight(fake, tmp_path, capsys):
    source = tmp_path / "disk.img"
    source.write_bytes(bytes(make_image(2 * MiB)))
    assert cli.main(["backup", str(source), "--server", "web1", "--plain"]) == 0
    assert "offline" in capsys.readouterr().err  # the log line says how the disk was read
    ((server, body),) = fake.statuses
    assert server == "web1"
    assert body["agent_version"] == cli.__version__ and body["schedule"] is None and body["next_run"] is None
    names = [c["name"] for c in body["preflight"]["checks"]]
    assert names == ["nvme", "ena", "fstab", "boot_mode", "boot_loader"]


def test_a_failing_post_hook_makes_the_backup_exit_non_zero(fake, tmp_path, capsys):
    source = tmp_path / "disk.img"
    source.write_bytes(bytes(make_image(2 * MiB)))
    assert cli.main(["backup", str(source), "--server", "web1", "--post-hook", "exit 9"]) == 1
    out, err = capsys.readouterr()
    assert len(out.split()) == 2  # the restore point stands: its id and kind
    assert "post-hook failed (exit 9)" in err


def test_scheduled_backups_keep_the_hooks_and_freeze_given_at_install(fake, tmp_path, capsys, root, cron_daemon):
    source = tmp_path / "disk.img"
    source.write_bytes(bytes(make_image(2 * MiB)))
    log = tmp_path / "hooks.log"
    assert cli.main(["schedule", "install", "--every", "1h", "--root", str(root), "--server",
                     "web1", "--pre-hook", f"echo pre >> {log}", "--post-hook", f"echo post >> {log}",
                     str(source)]) == 0  # fmt: skip
    saved = json.loads((tmp_path / "state" / "schedule.json").read_text())
    assert saved["read"] == {"freeze": False, "freeze_limit": None, "pre_hook": f"echo pre >> {log}",
                             "post_hook": f"echo post >> {log}"}  # fmt: skip
    assert cli.main(["backup", "--scheduled"]) == 0
    assert log.read_text() == "pre\npost\n"
    server, body = fake.statuses[-1]
    assert body["schedule"] == "1h" and body["next_run"].endswith("Z") and body["last_result"] == "ok"


def test_restore_takes_a_unique_prefix_and_names_the_closest_id_of_an_unknown_one(fake, tmp_path, capsys):
    source = tmp_path / "disk.img"
    source.write_bytes(bytes(make_image(2 * MiB)))
    assert cli.main(["backup", str(source), "--server", "web1"]) == 0
    backup_id = capsys.readouterr().out.split()[0]
    assert cli.main(["restore", backup_id[:8], str(tmp_path / "out.img")]) == 0
    assert (tmp_path / "out.img").read_bytes() == source.read_bytes()
    capsys.readouterr()

    typo = ("0" if backup_id[0] != "0" else "1") + backup_id[1:12]
    for wrong in (typo, typo + backup_id[12:]):  # a mistyped prefix, and a whole id that does not exist
        assert cli.main(["restore", wrong, str(tmp_path / "other.img")]) == 2
        err = capsys.readouterr().err
        assert "no restore point with that id" in err and f"The closest is {backup_id}" in err
        assert "endpoint" not in err and not (tmp_path / "other.img").exists()
