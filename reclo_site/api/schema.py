"""OpenAPI helpers: the error envelope and its codes, for drf-spectacular."""

from drf_spectacular.utils import OpenApiResponse, inline_serializer
from rest_framework import serializers

from reclo_site.errors import Code

from .errors import ERROR_CODES

ErrorSerializer = inline_serializer(
    "Error",
    {
        "error": serializers.IntegerField(help_text="ReClo error code; see the table in the API description."),
        "message": serializers.CharField(),
        "fields": serializers.DictField(child=serializers.ListField(child=serializers.CharField()), required=False),
    },
)


def error_responses(*codes: int) -> dict:
    """Schema responses for the given error codes, grouped by HTTP status.

    BAD_TOKEN, THROTTLED and DATABASE_UNAVAILABLE can happen on any
    authenticated call and are added to every operation by the caller's list.
    """
    by_status: dict[int, list[int]] = {}
    for code in sorted({*codes, Code.DATABASE_UNAVAILABLE, Code.THROTTLED}):
        by_status.setdefault(ERROR_CODES[code][0], []).append(code)
    return {
        status: OpenApiResponse(
            ErrorSerializer,
            description="; ".join(f"{code}: {ERROR_CODES[code][1]}" for code in group),
        )
        for status, group in by_status.items()
    }


def error_table_markdown() -> str:
    rows = "\n".join(f"| {code} | {status} | {text} |" for code, (status, text) in sorted(ERROR_CODES.items()))
    return "| code | HTTP | meaning |\n|---|---|---|\n" + rows


def add_error_table(result, generator, request, public):
    """drf-spectacular post-processing hook: the error-code table in the description."""
    result["info"]["description"] += "\n\n## Error codes\n\n" + error_table_markdown()
    return result
