"""One error hierarchy for the whole engine.

Each error carries the exit code of the command line and the short name that D-Bus and JSON
error documents use (org.kmodguard.Error.<name>). Convert foreign errors (libkmod -errno,
subprocess, D-Bus) into these at the boundary, once.
"""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    """Exit codes of every kmodguard command (documented in README and --help)."""

    OK = 0  # success, nothing left to do
    ERROR = 1  # error, message on stderr (with --json: an error document on stdout)
    USAGE = 2  # usage error: bad option or argument
    ACTION_NEEDED = 3  # success, and some device needs a package or a fix
    NOT_AUTHORIZED = 4  # the caller may not do this
    PACKAGE_UNAVAILABLE = 5  # the package for this kernel is in no repository
    STILL_UNBOUND = 6  # the fix ran and some devices are still unbound


class KmodguardError(Exception):
    """Base of every error kmodguard reports to a user."""

    name = "Failed"
    exit_code = ExitCode.ERROR

    def __init__(self, message: str, *, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message}\n{self.hint}" if self.hint else self.message

    def as_json(self) -> dict:
        doc = {"name": self.name, "message": self.message}
        if self.hint:
            doc["hint"] = self.hint
        return {"error": doc}


def error_names() -> frozenset[str]:
    """Every error's name: the JSON error's "name" and, on D-Bus, org.kmodguard.Error.<name>. Read
    from the classes when asked, so that a subclass defined elsewhere counts too."""
    found, todo = set(), [KmodguardError]
    while todo:
        cls = todo.pop()
        found.add(cls.name)
        todo.extend(cls.__subclasses__())
    return frozenset(found)


class InvalidInput(KmodguardError):
    """Input from a user or a caller is not acceptable (a malformed modalias, a bad option)."""

    name = "InvalidInput"
    exit_code = ExitCode.USAGE


class NotAuthorized(KmodguardError):
    name = "NotAuthorized"
    exit_code = ExitCode.NOT_AUTHORIZED


class PackageUnavailable(KmodguardError):
    name = "PackageUnavailable"
    exit_code = ExitCode.PACKAGE_UNAVAILABLE


class Busy(KmodguardError):
    name = "Busy"


class SignatureRefused(KmodguardError):
    """The package manager refused a repository's or a package's signature: not "not available"."""

    name = "SignatureRefused"


class IndexCorrupt(KmodguardError):
    """An index file is missing, corrupt, foreign or of another format version."""

    name = "IndexCorrupt"


class KmodError(KmodguardError):
    """libkmod returned a negative errno."""

    def __init__(self, what: str, errno_: int):
        import os

        super().__init__(f"{what}: {os.strerror(errno_)}")
        self.errno = errno_
