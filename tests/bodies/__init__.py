"""A corpus of Messages API request bodies: real shapes that must pass, malformed ones that must not.

`VALID` holds (name, body) pairs that `messages.create(**body)` takes and that
Conveyor must accept and carry unchanged; `INVALID` holds `Bad` cases, each with the
JSON path its refusal must name. The unit tests of `conveyor.contract.request_body` use both;
end-to-end tests reuse them (a case with `settings` needs those settings, as
CONVEYOR_<NAME> environment variables, in the gateway under test).

Images are real PNG, GIF and WebP files of a few pixels; the JPEG is its header
(SOI, JFIF, start-of-frame) only, enough for the size and type checks; the PDF is a
small real two-page file.

The corpus lives in `parts.py` (what bodies are made of), `valid.py` and `invalid.py`;
`from tests import bodies` and `from tests.bodies import ...` take it from here.
"""

from tests.bodies import parts
from tests.bodies.invalid import INVALID, Bad
from tests.bodies.parts import *  # noqa: F403 - the builders and media files, as before
from tests.bodies.valid import VALID

__all__ = [*parts.__all__, "Bad", "INVALID", "VALID"]
