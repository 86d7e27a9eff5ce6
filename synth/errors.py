"""Exceptions that reach the user as one short line (no traceback).

``UserError`` and its subclasses describe mistakes in what the user gave synth (a
config value, a data file, a command-line argument). The CLI prints ``str(err)`` and
exits with status 2; anything else is a bug or a runtime failure (status 1).
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input; the message is shown as one line."""


class ConfigError(UserError):
    """A config file or override is malformed or has a bad value.

    Args:
        message: what was expected, e.g. ``"expected a number >= 0, got 'abc'"``.
        key: dotted key path, e.g. ``"synthesis.steps"``.
        file: the config file, when known.
    """

    def __init__(self, message: str, *, key: str | None = None, file: str | None = None):
        self.message = message
        self.key = key
        self.file = file
        super().__init__(self._format())

    def _format(self) -> str:
        where = ""
        if self.file:
            where += f"{self.file}: "
        if self.key:
            where += f"{self.key}: "
        return f"{where}{self.message}"

    def at(self, *, key: str | None = None, file: str | None = None) -> "ConfigError":
        """Return a copy with the key prefixed by ``key`` and/or the file set."""
        new_key = self.key
        if key:
            new_key = f"{key}.{self.key}" if self.key else key
        return ConfigError(self.message, key=new_key, file=file or self.file)


class DataError(UserError):
    """A data file is missing, corrupt or inconsistent (the message names the file)."""


class DeviceError(UserError):
    """The requested device is unknown or not available."""
