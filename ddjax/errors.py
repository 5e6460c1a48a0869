"""The one exception type ddjax raises for bad input.

Every check of user input (config fields, data files, CLI arguments) raises
:class:`DDJaxError` with a one-line message that names the field or file, the
value that was given and what would be valid. The CLI prints the message and
exits with code 2; library users can catch it like any ``ValueError``.
"""


class DDJaxError(ValueError):
    """Bad input: the message names the field or file and what would be valid."""


def check(condition: bool, message: str) -> None:
    """Raises :class:`DDJaxError` with ``message`` unless ``condition`` holds."""
    if not condition:
        raise DDJaxError(message)
