"""User-facing errors: one clear message, no stack trace (the CLI prints them as one line)."""


class AttnlabError(Exception):
    """A user-facing error: one clear message, no stack trace."""


class DataError(AttnlabError):
    """Bad or unreadable data: names the file, row or field and what was expected."""


class ConfigError(AttnlabError):
    """A bad configuration value: names the key, the value and the allowed values."""


class CheckpointError(AttnlabError):
    """A missing, incomplete or incompatible model directory."""
