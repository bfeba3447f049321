"""Serializer fields that refuse wrong JSON types instead of coercing them."""

from rest_framework import serializers


class StrictCharField(serializers.CharField):
    """A string, and only a string: `123` or `true` is a malformed request (Code.MALFORMED)."""

    def to_internal_value(self, data):
        if not isinstance(data, str):
            self.fail("invalid")
        return super().to_internal_value(data)


class StrictIntegerField(serializers.IntegerField):
    """An integer, and only an integer (not `"12"`, not `true`, not `1.5`)."""

    def to_internal_value(self, data):
        if isinstance(data, bool) or not isinstance(data, int):
            self.fail("invalid")
        return super().to_internal_value(data)
