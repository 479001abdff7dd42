"""The API's request parser: DRF's JSON parser, refusing a body nested too deeply as a 400."""

from rest_framework import parsers
from rest_framework.exceptions import ParseError


class JSONParser(parsers.JSONParser):
    def parse(self, stream, media_type=None, parser_context=None):
        try:
            return super().parse(stream, media_type, parser_context)
        except RecursionError:
            # A few thousand nested [ or { (well under DATA_UPLOAD_MAX_MEMORY_SIZE) exhaust the
            # json module's recursion: it raises RecursionError, not the ValueError DRF maps to 400.
            raise ParseError("JSON parse error - nested too deeply.") from None
