"""Atomic file writes: a reader never sees half a file."""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from pathlib import Path
from typing import Iterator, Union

__all__ = ["replacing", "write_text"]


@contextlib.contextmanager
def replacing(path: Union[str, os.PathLike]) -> Iterator[Path]:
    """A new, empty temporary file beside ``path``, renamed onto ``path`` when the block ends
    (removed if it raises). It gets the mode of the file it replaces, else the umask's (as
    ``open`` would create it)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # the kernel applies the umask
    try:
        if path.exists():
            os.chmod(tmp, stat.S_IMODE(path.stat().st_mode))
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: Union[str, os.PathLike], text: str) -> Path:
    """Writes ``text`` (UTF-8) to ``path`` atomically (`replacing`)."""
    with replacing(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)
