"""Errors a user can cause. The CLI prints each as one line and exits non-zero; the library raises them."""

from __future__ import annotations

__all__ = [
    "BadBudget",
    "BadConfig",
    "CannotWrite",
    "DvnError",
    "MissingData",
    "UnknownTask",
    "WrongFileFormat",
]


class DvnError(Exception):
    """Base of every error caused by input rather than by a bug in dvn."""


class BadConfig(DvnError, ValueError):
    """A configuration value that cannot work (e.g. channels not divisible by k)."""


class UnknownTask(DvnError, KeyError):
    """A task name the checkpoint or the dataset registry does not know."""

    def __str__(self) -> str:  # KeyError quotes its message; we want the plain sentence.
        return str(self.args[0]) if self.args else ""


class BadBudget(DvnError, ValueError):
    """A budget that cannot be parsed, or that no level fits."""


class WrongFileFormat(DvnError):
    """A file that is not the dvn file it should be (truncated, foreign, newer version, ...)."""


class MissingData(DvnError, FileNotFoundError):
    """Dataset files that are not where dvn looked."""


class CannotWrite(DvnError, OSError):
    """A file or folder dvn was asked to write cannot be written; nothing that was there is lost."""

    def __init__(self, path: object, reason: str) -> None:
        super().__init__(f"cannot write to {path}: {reason}")
        self.path, self.reason = path, reason
        self.strerror = reason  # callers that catch OSError read the reason where they always do

    def __str__(self) -> str:  # OSError would format its arguments its own way
        return str(self.args[0])
