"""User-facing errors: each carries one clear message naming the file, key or value at fault."""


class AttnlabError(Exception):
    """A user-facing error: one clear message, no stack trace."""


class DataError(AttnlabError):
    """Bad input data: a missing or corrupt file, an unreadable metadata row, a missing column."""


class ConfigError(AttnlabError):
    """A config key with a value outside what it accepts."""


class CheckpointError(AttnlabError):
    """A model directory that is missing, incomplete or does not match its config."""


def check(ok: bool, key: str, value, expected: str) -> None:
    """Raise a ConfigError "key=value is not allowed: expected ..." unless `ok` (the config checks' one form)."""
    if not ok:
        raise ConfigError(f"{key}={value!r} is not allowed: expected {expected}")
