"""Serializer fields shared by the services' APIs."""

from rest_framework import serializers

# Database ids are 64-bit (BigAutoField): a larger id can name nothing, and a
# larger integer overflows the SQLite driver in a lookup.
MAX_ID = 2**63 - 1


class StrictIntegerField(serializers.IntegerField):
    """An integer that must be a JSON integer: no "3", 3.0 or true."""

    default_error_messages = {"invalid": "A JSON integer is required."}

    def to_internal_value(self, data):
        if isinstance(data, bool) or not isinstance(data, int):
            self.fail("invalid")
        return super().to_internal_value(data)
