"""Request bodies: one JSON object, checked by an input serializer."""

from reclo_site.errors import Code, ServiceError


def valid_body(serializer_class, request) -> dict:
    """The request's JSON object, validated by `serializer_class`.

    A body that is not an object (a list, a string) answers 104 before the
    serializer sees it; a field error answers the serializer's 104 with
    `fields`. An empty body parses as an empty QueryDict, which is a dict.
    """
    if not isinstance(request.data, dict):
        raise ServiceError(Code.MALFORMED, "The body must be a JSON object.")
    serializer = serializer_class(data=request.data)
    serializer.is_valid(raise_exception=True)
    return serializer.validated_data
