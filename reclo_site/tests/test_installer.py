"""`GET /agent/install.sh` and the agent bundle: what the one line of "Add a server" runs.

The whole path (browser, paste, enrol, schedule, verified first backup,
upgrade, uninstall) is tests/test_agent_install_e2e.py; here the script's
checks and the bundle, each run for real with sh.
"""

import io
import subprocess
import tarfile

from reclo_site import agent_bundle, testing


def test_the_script_is_served_without_a_token_with_this_portal_in_it(client, settings):
    settings.SITE_URL = "https://reclo.example.com/"
    response = client.get("/agent/install.sh")
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/x-shellscript")
    script = response.content.decode()
    assert script.startswith("#!/bin/sh\n")
    assert "PORTAL=https://reclo.example.com\n" in script
    assert f"agent {agent_bundle.agent_version()} bundle" in script
    # Valid POSIX shell (dash is Debian's /bin/sh).
    check = subprocess.run(["sh", "-n"], input=script, capture_output=True, text=True)
    assert check.returncode == 0, check.stderr


def test_an_odd_portal_address_is_quoted_for_the_shell(client, settings):
    settings.SITE_URL = "https://reclo.example.com/x'$(id)"
    script = client.get("/agent/install.sh").content.decode()
    assert "PORTAL='https://reclo.example.com/x'\"'\"'$(id)'\n" in script


def run_script(client, *args, env=None):
    script = client.get("/agent/install.sh").content.decode()
    return subprocess.run(["sh", "-s", "--", *args], input=script, capture_output=True, text=True, env=env)


def test_without_a_key_it_says_where_to_get_one(client, tmp_path):
    run = run_script(client, "--prefix", str(tmp_path / "agent"))
    assert run.returncode == 1 and "give --key KEY" in run.stderr and "Add a server" in run.stderr
    assert not (tmp_path / "agent").exists()


def test_it_checks_root_and_python_before_changing_anything(client, tmp_path):
    testing.require_tool("sudo")
    fake = tmp_path / "fakebin"
    fake.mkdir()
    (fake / "id").write_text("#!/bin/sh\necho 1000\n")  # an ordinary user
    (fake / "python3").write_text('#!/bin/sh\n[ "$1" = -V ] && echo Python 3.9.2; exit 1\n')  # too old
    for f in fake.iterdir():
        f.chmod(0o755)
    path = f"{fake}:/usr/bin:/bin"
    run = run_script(client, "--key", "k" * 32, "--prefix", str(tmp_path / "agent"), env={"PATH": path})
    assert run.returncode == 1 and "run it as root" in run.stderr
    (fake / "id").unlink()
    run = run_script(client, "--key", "k" * 32, "--prefix", str(tmp_path / "agent"), env={"PATH": path})
    assert run.returncode == 1 and "Python 3.9.2 is too old" in run.stderr and "3.11" in run.stderr
    assert not (tmp_path / "agent").exists()
    run = run_script(client, "--key", "k" * 32, "--prefix", "relative/dir")
    assert run.returncode == 1 and "absolute path" in run.stderr


def test_until_it_is_built_the_bundle_answers_503_saying_how(client, settings, tmp_path):
    settings.RECLO_AGENT_BUNDLE_DIR = tmp_path / "none"
    response = client.get("/agent/reclo-agent.tar.gz")
    assert response.status_code == 503 and b"manage.py build_agent" in response.content


def test_the_bundle_holds_the_agent_and_its_dependencies_ready_to_import(client, tmp_path):
    path = testing.agent_bundle()
    assert agent_bundle.built_digest(path) == agent_bundle.source_digest()
    response = client.get("/agent/reclo-agent.tar.gz")
    assert response.status_code == 200 and response["Content-Type"] == "application/gzip"
    assert response["X-Reclo-Agent-Version"] == agent_bundle.agent_version()
    data = b"".join(response.streaming_content)
    top = f"reclo-agent-{agent_bundle.agent_version()}"
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        names = archive.getnames()
        archive.extractall(tmp_path, filter="data")
    assert f"{top}/lib/reclo_agent/cli.py" in names and f"{top}/lib/boto3/__init__.py" in names
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc") or "/lib/bin/" in n]
    assert not [n for n in names if n.startswith(f"{top}/lib/reclo_agent/tests")]  # the agent's own tests stay out
    # Importable with nothing else on the path (-I: no site-packages, no PYTHONPATH).
    lib = tmp_path / top / "lib"
    code = "import sys; sys.path.insert(0, sys.argv[1]); import reclo_agent.cli, reclo_agent.vhd.seekzstd, boto3, rich"
    subprocess.run(["python3", "-I", "-c", code, str(lib)], check=True, timeout=120)
    assert (tmp_path / top / "VERSION").read_text().split() == [
        agent_bundle.agent_version(),
        agent_bundle.source_digest(),
    ]


def test_a_changed_agent_source_makes_a_new_digest(monkeypatch, tmp_path):
    before = agent_bundle.source_digest()
    fake = tmp_path / "agent"
    (fake / "reclo_agent").mkdir(parents=True)
    (fake / "pyproject.toml").write_text((agent_bundle.AGENT_DIR / "pyproject.toml").read_text())
    (fake / "reclo_agent" / "cli.py").write_text("print('changed')\n")
    monkeypatch.setattr(agent_bundle, "AGENT_DIR", fake)
    assert agent_bundle.source_digest() != before
