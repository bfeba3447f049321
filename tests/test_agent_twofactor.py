"""`reclo-agent login` against the real portal for an account with two-factor on."""

import json
import os
import subprocess
import sys

import pytest

from accounts.models import ApiToken
from accounts.tests.test_twofactor import enable
from reclo_site import testing

pytestmark = pytest.mark.django_db(transaction=True)


def agent(tmp_path, *args):
    env = {
        **os.environ,
        "RECLO_AGENT_CONFIG": str(tmp_path / "agent.json"),
        "RECLO_PASSWORD": testing.PASSWORD,
        "PYTHONUNBUFFERED": "1",
    }
    return subprocess.run(
        [sys.executable, "-m", "reclo_agent", *args], env=env, capture_output=True, text=True, timeout=120,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip


def test_the_agent_logs_in_with_a_code_and_says_when_one_is_missing(live_server, user, tmp_path):
    app, codes = enable(user)
    login = ("login", "--portal", live_server.url, "--email", user.email, "--state-dir", str(tmp_path / "state"))

    missing = agent(tmp_path, *login)
    assert missing.returncode == 2 and "--otp" in missing.stderr and "two-factor" in missing.stderr

    wrong = agent(tmp_path, *login, "--otp", "000000")
    assert wrong.returncode == 2 and "did not accept that two-factor code" in wrong.stderr

    ok = agent(tmp_path, *login, "--otp", app.now())
    assert ok.returncode == 0, ok.stderr
    token = json.loads((tmp_path / "agent.json").read_text())["token"]
    assert ApiToken.objects.filter(user=user, prefix=token[:6], revoked_at__isnull=True).exists()
    # A recovery code works too (once).
    assert agent(tmp_path, *login, "--otp", codes[0]).returncode == 0
