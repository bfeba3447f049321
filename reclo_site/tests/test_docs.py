"""docs/ is the project's own contract and design: it matches the code and nothing points outside the repository."""

import os
import re

import pytest

from reclo_site.errors import Code
from reclo_site.management.commands.api_docs import API_MD, render, route_table
from reclo_site.testing import ROOT

# Spelled in pieces, so this file does not find itself.
OUTSIDE = ("../" + "shared", "shared" + "/spec", "design" + ".md")
SKIP_DIRS = {".git", ".venv", "var", "__pycache__", ".pytest_cache", ".ruff_cache", "node_modules", "staticfiles"}


def generated_block(text: str, name: str) -> str:
    match = re.search(rf"<!-- generated: {name}[^>]*-->\n(.*?)<!-- end generated -->", text, re.S)
    assert match, f"docs/api.md has no generated {name} block"
    return match.group(1)


def test_the_error_code_table_is_exactly_the_code_enum():
    rows = re.findall(r"^\| (\d+) \| (\d+) \| `(\w+)` \| (.+) \|$", generated_block(API_MD.read_text(), "codes"), re.M)
    documented = [(int(code), int(status), name, text) for code, status, name, text in rows]
    assert documented == [(c.value, c.http_status, c.name, c.text) for c in sorted(Code)]


@pytest.mark.django_db
def test_the_route_table_is_the_served_schema(anon_api):
    schema = anon_api.get("/api/v1/schema", HTTP_ACCEPT="application/json").json()
    assert generated_block(API_MD.read_text(), "routes") == route_table(schema)
    assert len(schema["paths"]) >= 15  # the schema really was read


@pytest.mark.django_db
def test_api_docs_check_passes():
    """What `manage.py api_docs --check` says: regenerating changes nothing."""
    from reclo_site.management.commands.api_docs import served_schema

    text = API_MD.read_text()
    assert render(text, served_schema()) == text


@pytest.mark.django_db
def test_every_served_route_is_described_by_hand_too(anon_api):
    schema = anon_api.get("/api/v1/schema", HTTP_ACCEPT="application/json").json()
    text = API_MD.read_text()
    prose = text.split("<!-- end generated -->")[-1]  # the hand-written sections after the tables
    missing = [path for path in schema["paths"] if path not in prose]
    assert not missing, f"docs/api.md describes no body or answer for {missing}"


def test_the_readme_links_both_documents():
    readme = (ROOT / "README.md").read_text()
    assert "docs/api.md" in readme and "docs/architecture.md" in readme
    assert (ROOT / "docs" / "architecture.md").is_file()


def test_nothing_in_the_repository_points_outside_it():
    found = []
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS and not d.endswith(".egg-info")]
        for name in files:
            path = os.path.join(folder, name)
            try:
                with open(path, encoding="utf-8") as handle:
                    text = handle.read()
            except (UnicodeDecodeError, OSError):
                continue  # binary files (screenshots, fixtures)
            found += [f"{os.path.relpath(path, ROOT)}: {word}" for word in OUTSIDE if word in text]
    assert not found, "these point at files outside the repository (use docs/api.md, docs/architecture.md):\n" + (
        "\n".join(found)
    )
