"""Errors that advtrain raises for bad input.

Every error a user can cause by what they pass in (a name, a number, a file) is an
:class:`AdvtrainError` with a one-line message naming the problem; the CLI prints that line
and exits with status 2 instead of a traceback.
"""

from __future__ import annotations


class AdvtrainError(ValueError):
    """Bad input: the message is one line that names the problem."""


class UnknownNameError(AdvtrainError, KeyError):
    """A dataset, model, attack or method name that no registry knows."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class DataError(AdvtrainError):
    """A missing, corrupt or truncated data file, or a failed download."""


class CheckpointError(AdvtrainError):
    """A weights file that cannot be read safely or does not fit the model."""


class ThreatModelError(AdvtrainError):
    """An invalid threat model: eps, bounds or mask."""


def unknown(kind: str, name: str, known: list[str] | tuple[str, ...]) -> UnknownNameError:
    """Build the error for an unknown registry name, listing the known ones."""
    return UnknownNameError(f"unknown {kind} {name!r}; choose one of: {', '.join(sorted(known))}")
