"""The API's JSON parser: DRF's, refusing bodies nested absurdly deep.

Python's JSON decoder recurses once per nesting level, so a body of a few
thousand ``[`` ends in ``RecursionError`` (an unhandled 500) rather than a
clean refusal. No request of docs/api.md nests deeper than a handful of
levels; anything past ``MAX_DEPTH`` answers 400 with code 104.
"""

from collections.abc import Iterable

from rest_framework import parsers
from rest_framework.exceptions import ParseError

# Our deepest body is a few levels (an object of lists of objects); 32
# leaves room for new routes while staying far below the interpreter's
# recursion limit.
MAX_DEPTH = 32


def depth_of(value) -> int:
    """How deeply lists and objects nest in a parsed JSON value (a scalar is 0)."""
    deepest = 0
    stack = [(value, 1)]
    while stack:
        item, level = stack.pop()
        children: Iterable
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        deepest = max(deepest, level)
        stack.extend((child, level + 1) for child in children)
    return deepest


class JSONParser(parsers.JSONParser):
    """DRF's JSONParser, with a depth limit and no RecursionError."""

    def parse(self, stream, media_type=None, parser_context=None):
        try:
            data = super().parse(stream, media_type, parser_context)
        except RecursionError:
            raise ParseError(f"JSON nested more than {MAX_DEPTH} levels deep.") from None
        if depth_of(data) > MAX_DEPTH:
            raise ParseError(f"JSON nested more than {MAX_DEPTH} levels deep.")
        return data
