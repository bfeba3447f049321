"""The one exception backup services refuse an operation with."""

from reclo_site.api.errors import ApiError


class BackupError(Exception):
    """A refused backup operation; `code` is an error code of docs/api.md.

    Pages show `message`; the API turns it into the envelope with
    `as_api_error()`. `fields` holds per-field messages for code 104.
    """

    def __init__(self, code: int, message: str, fields: dict | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.fields = fields

    def as_api_error(self) -> ApiError:
        return ApiError(self.code, self.message, fields=self.fields)
