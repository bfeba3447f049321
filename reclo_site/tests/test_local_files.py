"""var/ and its SQLite database hold live sessions and keys: this user only (0700, 0600)."""

import os
import sqlite3
import stat
import subprocess
import sys

from reclo_site.files import private_dir, private_file
from reclo_site.testing import ROOT


def mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def manage(var_dir, *args):
    """`manage.py` as `make run` runs it: SQLite and the file-system broker under `var_dir`."""
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL", "CELERY_BROKER_URL")}
    env |= {"RECLO_VAR_DIR": str(var_dir), "DJANGO_SETTINGS_MODULE": "reclo_site.settings"}
    subprocess.run([sys.executable, "manage.py", *args], cwd=ROOT, env=env, check=True, capture_output=True)


def test_a_fresh_var_and_its_database_are_private(tmp_path):
    var_dir = tmp_path / "var"
    old_umask = os.umask(0o022)  # the usual one, under which sqlite3 makes 0644 files
    try:
        manage(var_dir, "migrate", "--no-input", "-v", "0")
    finally:
        os.umask(old_umask)
    database = var_dir / "db.sqlite3"
    assert mode(var_dir) == 0o700
    assert mode(database) == 0o600
    assert mode(var_dir / "secret_key") == 0o600
    with sqlite3.connect(database) as db:  # the real database, migrated
        assert db.execute("select count(*) from django_session").fetchone() == (0,)


def test_an_existing_world_readable_install_is_tightened(tmp_path):
    var_dir = tmp_path / "var"
    var_dir.mkdir(mode=0o755)
    var_dir.chmod(0o755)
    database = var_dir / "db.sqlite3"
    sqlite3.connect(database).close()
    database.chmod(0o644)
    manage(var_dir, "check")
    assert (mode(var_dir), mode(database)) == (0o700, 0o600)


def test_a_shared_sticky_folder_is_left_alone(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    private_dir(shared)
    assert mode(shared) == 0o1777


def test_private_file_keeps_what_is_in_the_file(tmp_path):
    path = tmp_path / "db.sqlite3"
    path.write_bytes(b"data")
    path.chmod(0o644)
    private_file(path)
    assert (path.read_bytes(), mode(path)) == (b"data", 0o600)
