"""End to end: the real ``reclo-agent`` command against a live portal and a local S3.

The portal runs in pytest-django's live server (eager Celery, so the
verifier runs when an upload is completed); S3 and STS are moto's
ThreadedMotoServer on a free loopback port, which the portal and the agent
(a separate process, as on a customer's server) both reach over HTTP.
The agent logs in, makes a full backup of a small raw image, an
incremental after the image changes, and restores the incremental
byte-identical. Then an upload is killed with SIGKILL mid-way, and the
rerun completes it without sending the journaled parts again -- counted on
the S3 server itself. Parts that were in flight at the kill were never
journaled, so the rerun sends them again (it may not list what S3 holds).
"""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import parse_qs

import pytest
from moto.moto_server.threaded_moto_server import ThreadedMotoServer
from moto.server import DomainDispatcherApplication, create_backend_app
from werkzeug.serving import make_server

from backups.models import Backup

pytestmark = pytest.mark.django_db(transaction=True)

MiB = 1024 * 1024
PASSWORD = "correct horse battery staple"


class CountingMotoServer(ThreadedMotoServer):
    """moto's threaded server, counting the UploadPart requests it receives."""

    def __init__(self) -> None:
        super().__init__("127.0.0.1", 0, verbose=False)
        self.parts: list[tuple[str, int]] = []  # (upload id, part number)

    def _server_entry(self) -> None:
        app = DomainDispatcherApplication(create_backend_app)

        def counting(environ, start_response):
            query = parse_qs(environ.get("QUERY_STRING", ""))
            if environ["REQUEST_METHOD"] == "PUT" and "partNumber" in query and "uploadId" in query:
                self.parts.append((query["uploadId"][0], int(query["partNumber"][0])))
            return app(environ, start_response)

        self._server = make_server(self._ip_address, self._port, counting, threaded=True)
        self._server_ready_event.set()
        self._server.serve_forever()


@pytest.fixture
def cloud(settings):
    server = CountingMotoServer()
    server.start()
    host, port = server.get_host_and_port()
    settings.AWS_ENDPOINT_URL = f"http://{host}:{port}"
    from reclo_site.cloud import storage

    storage.ensure_bucket()
    yield server
    server.stop()


@pytest.fixture
def agent(tmp_path, live_server, cloud):
    """``agent(*args)`` runs the real command line in its own process."""
    from accounts.models import User

    User.objects.create_user(username="dr.e2e", email="e2e@clinic.example", password=PASSWORD)
    env = {
        **os.environ,
        "RECLO_AGENT_CONFIG": str(tmp_path / "agent" / "agent.json"),
        "RECLO_PASSWORD": PASSWORD,
        "PYTHONUNBUFFERED": "1",
    }

    def run(*args, timeout=180, check=True):
        proc = subprocess.run(
            [sys.executable, "-m", "reclo_agent", *args], env=env, capture_output=True, text=True, timeout=timeout
        )
        if check and proc.returncode != 0:
            pytest.fail(f"reclo-agent {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
        return proc

    run.env = env
    run("login", "--portal", live_server.url, "--email", "e2e@clinic.example", "--state-dir", str(tmp_path / "state"))
    return run


def make_image(size: int, seed: int) -> bytearray:
    """Random, all-zero and text regions, like a used disk."""
    rnd = random.Random(seed)
    disk = bytearray(size)
    text = b"Patient records, invoices and the appointment book. " * 32
    for at in range(0, size, 256 * 1024):
        n = min(256 * 1024, size - at)
        kind = rnd.random()
        if kind < 0.4:
            disk[at : at + n] = rnd.randbytes(n)
        elif kind > 0.7:
            disk[at : at + n] = (text * (n // len(text) + 1))[:n]
    return disk


def test_login_full_incremental_restore(agent, tmp_path):
    image = make_image(12 * MiB + 512 * 3, seed=1)
    source = tmp_path / "disk.img"
    source.write_bytes(bytes(image))

    full_id, kind = agent("backup", str(source), "--server", "clinic-srv", "--disk", "sda", "--plain").stdout.split()
    assert kind == "full"
    full = Backup.objects.get(pk=full_id)
    assert (full.status, full.kind) == ("verified", "full")

    rnd = random.Random(2)
    changed_pages = set()
    for _ in range(40):  # scattered 4 KiB writes
        page = rnd.randrange(len(image) // 4096)
        changed_pages.add(page)
        image[page * 4096 : (page + 1) * 4096] = rnd.randbytes(4096)
    source.write_bytes(bytes(image))
    proc = agent("backup", str(source), "--server", "clinic-srv", "--disk", "sda", "--plain")
    inc_id, kind = proc.stdout.split()
    assert kind == "incremental"
    inc = Backup.objects.get(pk=inc_id)
    assert inc.status == "verified" and str(inc.parent_id) == full_id
    # Page-granular bitmaps: the incremental costs about what changed.
    assert inc.file_size < 1.5 * len(changed_pages) * 4096 + 64 * 1024

    listed = json.loads(agent("list", "--json").stdout)
    assert [b["backup_id"] for b in listed] == [inc_id, full_id]

    target = tmp_path / "restored.img"
    agent("restore", inc_id, str(target), "--plain")
    assert target.read_bytes() == bytes(image)

    status = agent("status").stdout
    assert "token accepted" in status and inc_id in status
    config = Path(agent.env["RECLO_AGENT_CONFIG"])
    token = json.loads(config.read_text())["token"]
    assert oct(config.stat().st_mode & 0o777) == "0o600"
    assert token not in proc.stdout + proc.stderr + status


def test_killed_upload_resumes_without_resending_finished_parts(agent, cloud, tmp_path):
    # 24 MiB of random data that does not compress: four parts of up to 8 MiB.
    source = tmp_path / "data.img"
    source.write_bytes(random.Random(3).randbytes(24 * MiB))
    journal = tmp_path / "state" / "uploads" / "clinic-srv" / "data.parts"
    args = [sys.executable, "-m", "reclo_agent", "backup", str(source), "--server", "clinic-srv", "--disk", "data",
            "--plain"]  # fmt: skip
    # Slowed down so the kill lands mid-upload: 8 MiB/s, about 3 s in all.
    proc = subprocess.Popen([*args, "--bandwidth-limit", "8M"], env=agent.env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)  # fmt: skip
    deadline = time.monotonic() + 60
    while not (journal.exists() and journal.read_text().count("\n") >= 1):
        assert proc.poll() is None, "the agent finished before it could be killed"
        assert time.monotonic() < deadline, "no part was uploaded in time"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    done_before = {json.loads(line)["number"] for line in journal.read_text().splitlines()}
    record = json.loads((tmp_path / "state" / "uploads" / "clinic-srv" / "data.json").read_text())
    assert record["phase"] == "uploading"
    assert Backup.objects.get(pk=record["upload_id"]).status == "pending"
    assert len(done_before) >= 1

    sent_before = len(cloud.parts)
    rerun = agent("backup", str(source), "--server", "clinic-srv", "--disk", "data", "--plain")
    backup_id, kind = rerun.stdout.split()
    resent = [number for upload, number in cloud.parts[sent_before:] if upload == record["multipart_id"]]
    assert resent, "the rerun sent nothing"
    assert set(resent).isdisjoint(done_before), f"parts {done_before} were sent again: {resent}"
    assert backup_id == record["upload_id"]  # the same upload, continued
    backup = Backup.objects.get(pk=backup_id)
    assert kind == "full" and backup.status == "verified"
    all_parts = set(range(1, -(-backup.file_size // (8 * MiB)) + 1))
    # Everything not journaled went in the rerun, parts in flight at the kill included.
    assert set(resent) | done_before == all_parts and len(all_parts) == 4
    assert "already in storage" in rerun.stderr

    target = tmp_path / "data-restored.img"
    agent("restore", backup_id, str(target))
    assert target.read_bytes() == source.read_bytes()


def test_enrolled_agent_backs_up_without_the_owners_password(live_server, cloud, tmp_path):
    """The owner makes a key ("Add a server"); the agent enrols with it, backs up, and may do nothing else."""
    import requests

    from accounts.models import User

    owner = User.objects.create_user(username="dr.enrol", email="enrol@clinic.example", password=PASSWORD)
    owner_token = _owner_token(owner)
    api = f"{live_server.url}/api/v1"
    owner_headers = {"Authorization": f"Token {owner_token}"}
    key = requests.post(f"{api}/servers/front-desk/enrollment", headers=owner_headers, timeout=30).json()["key"]

    config_path = tmp_path / "agent" / "agent.json"
    env = {k: v for k, v in os.environ.items() if k != "RECLO_PASSWORD"}
    env |= {"RECLO_AGENT_CONFIG": str(config_path), "PYTHONUNBUFFERED": "1"}

    def run(*args, check=True):
        proc = subprocess.run([sys.executable, "-m", "reclo_agent", *args], env=env, capture_output=True, text=True,
                              timeout=180)  # fmt: skip
        if check and proc.returncode != 0:
            pytest.fail(f"reclo-agent {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
        return proc

    proc = run("enroll", "--portal", live_server.url, "--key", key, "--state-dir", str(tmp_path / "state"))
    assert "server front-desk" in proc.stdout
    saved = json.loads(config_path.read_text())
    assert oct(config_path.stat().st_mode & 0o777) == "0o600"
    assert saved["server"] == "front-desk" and not saved["email"] and PASSWORD not in config_path.read_text()
    # The key worked once.
    again = run("enroll", "--portal", live_server.url, "--key", key, check=False)
    assert again.returncode == 2 and "did not accept that enrollment key" in again.stderr

    source = tmp_path / "disk.img"
    source.write_bytes(bytes(make_image(4 * MiB, seed=5)))
    backup_id, kind = run("backup", str(source), "--disk", "sda", "--plain").stdout.split()
    backup = Backup.objects.get(pk=backup_id)
    assert (kind, backup.status, backup.server.name, backup.user) == ("full", "verified", "front-desk", owner)
    assert [b["backup_id"] for b in json.loads(run("list", "--json").stdout)] == [backup_id]
    restored = tmp_path / "restored.img"
    run("restore", backup_id, str(restored))
    assert restored.read_bytes() == source.read_bytes()

    # What ransomware on the server could try with the saved credential: refused.
    agent_headers = {"Authorization": f"Token {saved['token']}"}
    for method, path in [
        ("DELETE", f"/backups/{backup_id}?cascade=true"),
        ("POST", "/recoveries"),
        ("GET", "/instances"),
        ("GET", "/servers"),
        ("GET", "/backups?server=archive"),
        ("POST", "/servers/front-desk/enrollment"),
        ("DELETE", "/servers/front-desk/credentials"),
    ]:
        response = requests.request(method, api + path, headers=agent_headers, json={"backup_id": backup_id},
                                    timeout=30)  # fmt: skip
        assert (response.status_code, response.json()["error"]) == (403, 106), (method, path, response.text)
    assert Backup.objects.filter(pk=backup_id).exists()

    # "Revoke this server": the agent's credential stops at once.
    assert requests.delete(f"{api}/servers/front-desk/credentials", headers=owner_headers, timeout=30).ok
    refused = run("list", check=False)
    assert refused.returncode == 3 and "enrol again" in refused.stderr


def _owner_token(user) -> str:
    from accounts.services import token_create

    return token_create(user=user, name="owner")[1]
