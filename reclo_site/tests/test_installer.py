"""`GET /agent/install.sh`: the one line of "Add a server" installs the agent from the portal and enrols it."""

import io
import json
import os
import subprocess
import tarfile

import pytest
import requests

from backups.services import enrollment_key_create
from reclo_site import testing


def test_the_script_is_served_without_a_token_with_this_portal_in_it(client, settings):
    settings.SITE_URL = "https://reclo.example.com/"
    response = client.get("/agent/install.sh")
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/x-shellscript")
    script = response.content.decode()
    assert script.startswith("#!/bin/sh\n")
    assert "PORTAL=https://reclo.example.com\n" in script
    # Valid POSIX shell (dash is Debian's /bin/sh).
    check = subprocess.run(["sh", "-n"], input=script, capture_output=True, text=True)
    assert check.returncode == 0, check.stderr


def test_an_odd_portal_address_is_quoted_for_the_shell(client, settings):
    settings.SITE_URL = "https://reclo.example.com/x'$(id)"
    script = client.get("/agent/install.sh").content.decode()
    assert "PORTAL='https://reclo.example.com/x'\"'\"'$(id)'\n" in script


def test_without_a_key_it_says_where_to_get_one(client, tmp_path):
    script = client.get("/agent/install.sh").content.decode()
    run = subprocess.run(["sh", "-s", "--", "--prefix", str(tmp_path / "venv")], input=script,
                         capture_output=True, text=True)  # fmt: skip
    assert run.returncode == 1 and "give --key KEY" in run.stderr and "Add a server" in run.stderr
    assert not (tmp_path / "venv").exists()


def test_the_package_is_the_agent_source_without_tests_or_caches(client):
    response = client.get("/agent/reclo-agent.tar.gz")
    assert response.status_code == 200 and response["Content-Type"] == "application/gzip"
    with tarfile.open(fileobj=io.BytesIO(response.content)) as archive:
        names = archive.getnames()
    assert "reclo-agent-0.1.0/pyproject.toml" in names
    assert "reclo-agent-0.1.0/reclo_agent/cli.py" in names
    assert not [n for n in names if "__pycache__" in n or "/tests" in n or n.endswith(".pyc")]


@pytest.mark.django_db(transaction=True)
def test_the_install_command_installs_and_enrols_the_agent(live_server, user, settings, tmp_path):
    """The real script, fetched over HTTP, run with sh: pip installs the served package, the agent enrols."""
    testing.require_tool("sh")
    settings.SITE_URL = live_server.url
    grant = enrollment_key_create(user=user, server="front-desk")
    assert grant.install_command.startswith(f"curl -fsSL {live_server.url}/agent/install.sh | sudo sh -s -- ")
    script = requests.get(f"{live_server.url}/agent/install.sh", timeout=30).text
    env = {**os.environ, "RECLO_AGENT_CONFIG": str(tmp_path / "agent.json")}
    env.pop("RECLO_PASSWORD", None)
    run = subprocess.run(
        ["sh", "-s", "--", "--key", grant.key, "--prefix", str(tmp_path / "venv"), "--bin-dir", str(tmp_path / "bin")],
        input=script, capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    assert "as server front-desk" in run.stdout
    saved = json.loads((tmp_path / "agent.json").read_text())
    assert saved["server"] == "front-desk" and saved["portal"] == live_server.url
    assert grant.key not in (tmp_path / "agent.json").read_text()
    assert os.path.realpath(tmp_path / "bin" / "reclo-agent") == str(tmp_path / "venv" / "bin" / "reclo-agent")
    status = subprocess.run([str(tmp_path / "bin" / "reclo-agent"), "status"], env=env, capture_output=True,
                            text=True, timeout=120)  # fmt: skip
    assert "enrolled as server front-desk" in status.stdout and "token accepted" in status.stdout
