"""Regenerate the tables of docs/api.md from the code: the error codes and the routes.

The error-code table comes from ``reclo_site.errors.Code``, the route table
from the OpenAPI schema the portal serves at ``/api/v1/schema``. Everything
else in docs/api.md is written by hand between them. ``--check`` changes
nothing and fails when the file is out of date (the tests run the same
check, so the reference cannot drift from the code).
"""

import re
from pathlib import Path

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from reclo_site.errors import Code

API_MD = Path(settings.BASE_DIR) / "docs" / "api.md"
# Codes any call may answer (database down, throttled), and any call with a token (bad token).
EVERYWHERE = {Code.DATABASE_UNAVAILABLE, Code.THROTTLED}
_BLOCK = re.compile(r"(<!-- generated: (?P<name>[a-z]+)[^>]*-->\n)(?P<body>.*?)(<!-- end generated -->)", re.S)
_METHODS = ("get", "post", "patch", "put", "delete")


def code_table() -> str:
    """The error codes as a Markdown table: code, HTTP status, name in `Code`, meaning."""
    rows = [f"| {c.value} | {c.http_status} | `{c.name}` | {c.text} |" for c in sorted(Code)]
    return "| code | HTTP | `Code.` | meaning |\n|---|---|---|---|\n" + "\n".join(rows) + "\n"


def _errors(operation: dict) -> list[int]:
    codes: set[int] = set()
    for status, response in operation.get("responses", {}).items():
        if int(status) >= 400:
            codes.update(int(code) for code in re.findall(r"\b(\d{3}):", response.get("description", "")))
    return sorted(codes - {int(c) for c in EVERYWHERE} - {int(Code.BAD_TOKEN)})


def route_table(schema: dict) -> str:
    """Every operation of the schema: method, path, token or not, success status, its own error codes."""
    rows = []
    for path, operations in sorted(schema["paths"].items()):
        for method in _METHODS:
            operation = operations.get(method)
            if operation is None:
                continue
            success = min(int(s) for s in operation["responses"] if int(s) < 400)
            token = "token" if any("tokenAuth" in s for s in operation.get("security") or []) else "none"
            errors = ", ".join(str(c) for c in _errors(operation)) or "—"
            rows.append(f"| `{method.upper()}` | `{path}` | {token} | {success} | {errors} |")
    header = "| method | path | auth | success | errors (besides 101, 103, and 102 with a token) |\n"
    return header + "|---|---|---|---|---|\n" + "\n".join(rows) + "\n"


def served_schema() -> dict:
    """The OpenAPI document exactly as /api/v1/schema serves it."""
    from drf_spectacular.generators import SchemaGenerator

    return SchemaGenerator().get_schema(request=None, public=True)


def render(text: str, schema: dict) -> str:
    """`text` (docs/api.md) with its generated blocks replaced by fresh tables."""
    tables = {"codes": code_table(), "routes": route_table(schema)}

    def fill(match: re.Match) -> str:
        name = match["name"]
        if name not in tables:
            raise CommandError(f"docs/api.md has an unknown generated block {name!r}")
        return match.group(1) + tables[name] + match.group(4)

    rendered, count = _BLOCK.subn(fill, text)
    if count != len(tables):
        raise CommandError(f"docs/api.md should have {len(tables)} generated blocks, found {count}")
    return rendered


class Command(BaseCommand):
    help = "Regenerate the error-code and route tables of docs/api.md (--check: only say whether they are stale)."

    def add_arguments(self, parser):
        parser.add_argument("--check", action="store_true", help="change nothing; fail if docs/api.md is stale")

    def handle(self, *args, check=False, **options):
        current = API_MD.read_text()
        fresh = render(current, served_schema())
        if fresh == current:
            self.stdout.write("docs/api.md is up to date")
        elif check:
            raise CommandError("docs/api.md is out of date: run `python manage.py api_docs`")
        else:
            API_MD.write_text(fresh)
            self.stdout.write("docs/api.md updated")
