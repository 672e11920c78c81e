"""The exceptions dga-compile raises on purpose, all in one place.

This is the lowest layer: it imports nothing of dga-compile, so every module may import it.
Bad arguments raise the built-in `ValueError` / `TypeError` (naming the value seen and the fix);
the classes here are for failures of a whole step (a build, a fetch, a strict rewrite, a command).
"""

from __future__ import annotations

__all__ = ["EXIT_FAILURE", "EXIT_OK", "EXIT_USAGE", "CacheError", "CLIError", "DGAError", "FetchError",
           "ModelLoadError", "NativeBuildError", "RewriteError", "VerificationError"]

#: Exit statuses of the ``dga-compile`` command line.
EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


class DGAError(Exception):
    """Base class of the failures dga-compile reports on purpose."""


class CLIError(DGAError):
    """A failure reported as one line; ``code`` is the exit status (1 failure, 2 usage)."""

    def __init__(self, message: str, code: int = EXIT_FAILURE):
        super().__init__(message)
        self.code = code


class NativeBuildError(DGAError, RuntimeError):
    """A library could not be built (no compiler, no headers, a compile error); the message says why."""


class RewriteError(DGAError, RuntimeError):
    """Raised with ``DGAConfig(strict=True)`` when an attention site could not be rewritten."""


class FetchError(DGAError, RuntimeError):
    """A model or text could not be fetched; the message says what to install or pass instead."""


class ModelLoadError(DGAError, RuntimeError):
    """A model file or directory could not be read (corrupt, truncated, unsupported); the message says which."""


class VerificationError(DGAError, RuntimeError):
    """An exported model disagrees with PyTorch; ``verification`` holds the measured errors."""

    def __init__(self, message: str, verification):
        super().__init__(message)
        self.verification = verification


class CacheError(DGAError, RuntimeError):
    """A `dga_compile.DGACache` was used in a way it cannot serve (e.g. attention that does not read it)."""
