"""Hostile request bodies under /api/: too deep, too big. Each gets the envelope, never a 500."""

import json

import pytest

from reclo_site.api.parsers import MAX_DEPTH, depth_of

pytestmark = pytest.mark.django_db

UPLOADS = "/api/v1/backups/uploads"


def nested(depth: int) -> str:
    """A JSON object `depth` levels deep: {"a": {"a": ... 1}}."""
    return '{"a":' * depth + "1" + "}" * depth


@pytest.mark.parametrize("body", ["[" * 100_000 + "]" * 100_000, nested(5_000)], ids=["lists", "objects"])
def test_json_nested_past_the_interpreters_limit_is_104(api, body):
    response = api.post(UPLOADS, body, content_type="application/json")
    assert (response.status_code, response.json()["error"]) == (400, 104)
    assert "nested" in response.json()["message"]


def test_json_nested_past_our_limit_is_104_even_when_python_could_parse_it(anon_api):
    response = anon_api.post("/api/v1/login", nested(MAX_DEPTH + 1), content_type="application/json")
    assert (response.status_code, response.json()["error"]) == (400, 104)
    assert f"{MAX_DEPTH} levels" in response.json()["message"]


def test_json_within_the_limit_reaches_the_view(anon_api):
    # A body of the right depth is parsed and then judged on its fields (207: no such account).
    body = json.dumps({"email": "nobody@example.com", "password": "x" * 12, "token_name": "t"})
    response = anon_api.post("/api/v1/login", body, content_type="application/json")
    assert response.json()["error"] == 207


def test_a_body_over_the_upload_limit_is_413_with_the_envelope(api, settings):
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 4096
    body = json.dumps({"server": "a" * 5000})
    response = api.post(UPLOADS, body, content_type="application/json")
    assert response.status_code == 413
    assert response.json() == {"error": 104, "message": "The request body is over 4096 bytes."}


def test_an_unauthenticated_huge_body_is_413_too(anon_api):
    body = '{"email": "' + "a" * (3 * 1024 * 1024) + '"}'
    response = anon_api.post("/api/v1/login", body, content_type="application/json")
    assert (response.status_code, response.json()["error"]) == (413, 104)


def test_the_default_limit_is_far_above_any_real_body_and_far_below_megabytes(settings):
    assert 64 * 1024 <= settings.DATA_UPLOAD_MAX_MEMORY_SIZE <= 1024 * 1024


@pytest.mark.parametrize(
    ("value", "depth"),
    [(1, 0), ([], 1), ({"a": [1, {"b": []}]}, 4), ([[[]], []], 3), ({"a": 1, "b": {"c": {}}}, 3)],
)
def test_depth_of_counts_lists_and_objects(value, depth):
    assert depth_of(value) == depth


def operations():
    """(method, path) of every operation the served schema lists that may take a body."""
    from drf_spectacular.generators import SchemaGenerator

    schema = SchemaGenerator().get_schema(request=None, public=True)
    return [
        (method, path)
        for path, ops in sorted(schema["paths"].items())
        for method in ("post", "patch", "put", "delete")
        if method in ops
    ]


@pytest.mark.parametrize(("method", "path"), operations())
@pytest.mark.parametrize("body", ["deep", "huge"])
def test_no_route_answers_500_to_a_hostile_body(api, aws, settings, method, path, body):
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 64 * 1024
    url = path.replace("{backup_id}", "0b7e3f7c-1111-4222-8333-944445555666")
    url = url.replace("{upload_id}", "0b7e3f7c-1111-4222-8333-944445555666").replace("{instance_id}", "i-0123456789")
    payload = "[" * 50_000 + "]" * 50_000 if body == "deep" else json.dumps({"x": "a" * 100_000})
    response = getattr(api, method)(url, payload, content_type="application/json")
    assert response.status_code < 500, (response.status_code, response.content[:200])
    if response.status_code >= 400:
        assert set(response.json()) >= {"error", "message"}
