"""The mistakes a user can fix, as exception classes (standard library only).

Every module raises these; the commands' boundary (`cli.py`) prints one as
`error: ...` (what is wrong and what to do) and exits with status 2. Anything
else that escapes a command is a bug and keeps its traceback. This module sits
at the bottom of the package: it imports nothing of the project.
"""


class UserError(Exception):
    """A mistake the user can fix; the message says what is wrong and what to do."""


class ConfigError(UserError, ValueError):
    """A config value or command-line option that cannot work."""


class LabelFileError(UserError, ValueError):
    """A label or split file is missing or malformed."""


class DatasetNotFoundError(UserError, FileNotFoundError):
    """A data set's published files are not where they should be."""


class ImageDecodeError(UserError):
    """An image file could not be read or decoded. `path` names the file."""

    def __init__(self, path: str, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"cannot decode image {self.path}: {reason}")


class TooManyBadImagesError(UserError, RuntimeError):
    """More images failed to decode than data.max_bad_fraction allows."""
