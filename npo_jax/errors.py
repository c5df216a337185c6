"""One error type for bad input, so the CLI can print it cleanly and exit non-zero."""


class NpoJaxError(Exception):
    """Bad input (a file, field or tensor) the user can fix; the message names it."""


class ConfigError(NpoJaxError):
    """An HF config.json field that is missing or has a value we do not support."""
