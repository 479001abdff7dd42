"""HTTP concerns shared by every service's API: errors, parsing, serializers, throttles, schema, health."""
