"""The config file: where it is, mode 0600, the token kept out of sight."""

import os
import stat

import pytest
from reclo_agent import config
from reclo_agent.errors import NotLoggedIn, UsageError


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_save_creates_the_file_0600_in_a_0700_folder(tmp_path):
    path = tmp_path / "reclo" / "agent.json"
    old_umask = os.umask(0)  # even a careless umask must not widen it
    try:
        config.save(config.Config(path=path, portal="https://p.example", token="T" * 32))
    finally:
        os.umask(old_umask)
    assert mode(path) == 0o600
    assert mode(path.parent) == 0o700
    loaded = config.load(path)
    assert loaded.token == "T" * 32
    assert loaded.portal == "https://p.example"


def test_rewriting_keeps_0600_and_leaves_no_temporary_files(tmp_path):
    path = tmp_path / "agent.json"
    cfg = config.Config(path=path, portal="https://p.example", token="A" * 32)
    config.save(cfg)
    cfg.token = "B" * 32
    config.save(cfg)
    assert mode(path) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["agent.json"]
    assert config.load(path).token == "B" * 32


def test_a_config_readable_by_others_is_tightened_with_a_warning(tmp_path, caplog):
    path = tmp_path / "agent.json"
    config.save(config.Config(path=path, portal="https://p.example", token="T" * 32))
    os.chmod(path, 0o644)
    with caplog.at_level("WARNING"):
        loaded = config.load(path)
    assert loaded.token == "T" * 32
    assert mode(path) == 0o600
    assert "readable by others" in caplog.text
    assert "T" * 32 not in caplog.text


def test_the_token_is_not_in_repr(tmp_path):
    cfg = config.Config(path=tmp_path / "a.json", token="S" * 32)
    assert "S" * 32 not in repr(cfg)


def test_missing_file_is_an_empty_config_that_asks_to_log_in(tmp_path):
    cfg = config.load(tmp_path / "nope.json")
    with pytest.raises(NotLoggedIn, match="reclo-agent login"):
        cfg.require_login()


def test_broken_json_says_to_log_in_again(tmp_path):
    path = tmp_path / "agent.json"
    path.write_text("{not json")
    os.chmod(path, 0o600)
    with pytest.raises(UsageError, match="log in again"):
        config.load(path)


def test_path_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("RECLO_AGENT_CONFIG", str(tmp_path / "env.json"))
    assert config.config_path(str(tmp_path / "cli.json")) == tmp_path / "cli.json"
    assert config.config_path(None) == tmp_path / "env.json"
    monkeypatch.delenv("RECLO_AGENT_CONFIG")
    assert config.config_path(None) == config.default_config_path()


def test_defaults_for_root_and_for_a_user(monkeypatch, tmp_path):
    monkeypatch.setattr(config, "_is_root", lambda: True)
    assert str(config.default_config_path()) == "/etc/reclo/agent.json"
    assert str(config.default_state_dir()) == "/var/lib/reclo-agent"
    monkeypatch.setattr(config, "_is_root", lambda: False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "cfg"))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "st"))
    assert config.default_config_path() == tmp_path / "cfg" / "reclo" / "agent.json"
    assert config.default_state_dir() == tmp_path / "st" / "reclo-agent"
