"""The exceptions headsmith raises for bad input and failed rewrites.

Every user-facing error is a :class:`HeadsmithError` whose message names the problem and, where one
exists, the fix (``hint``). The CLI prints ``error: <message>`` on one line (plus the hint) and exits
with a non-zero code; it never prints a traceback for these. Bugs are not wrapped: anything that is not
a ``HeadsmithError`` propagates with its traceback.
"""

from __future__ import annotations


class HeadsmithError(Exception):
    """Base class: a problem the user can act on."""

    exit_code: int = 2

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        if self.hint is None:
            return self.message
        return f"{self.message}\n  hint: {self.hint}"


class LoadError(HeadsmithError):
    """A model path, file or built-in name could not be loaded."""


class UnsupportedModelError(LoadError):
    """The checkpoint is readable but its architecture is not supported."""


class RaiseError(HeadsmithError):
    """An attention region could not be raised to ``headsmith.attention``."""


class PassSpecError(HeadsmithError):
    """A pass spec string is malformed, names an unknown pass or option, or has a wrong value."""

    def __init__(self, message: str, spec: str | None = None, column: int | None = None,
                 hint: str | None = None) -> None:
        if spec is not None and column is not None:
            message = f"{message} (column {column + 1})\n    {spec}\n    {' ' * column}^"
        super().__init__(message, hint)
        self.spec = spec
        self.column = column


class PassError(HeadsmithError):
    """A pass failed while rewriting a program; the message names the pass spec and the node."""


class VerificationError(PassError):
    """An exact pass changed the program's outputs beyond tolerance."""


class ArtifactError(HeadsmithError):
    """An artifact directory is missing, corrupt, or does not match its manifest."""


class BackendError(HeadsmithError):
    """A backend could not lower or run a program."""


class OutputExistsError(HeadsmithError):
    """The output path exists and ``--force`` was not given, or it would overwrite the input."""
