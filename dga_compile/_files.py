"""Atomic file writes: a reader never sees half a file."""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path
from typing import Union

__all__ = ["write_text"]


def write_text(path: Union[str, os.PathLike], text: str) -> Path:
    """Writes ``text`` (UTF-8) to ``path`` through a temporary file beside it, renamed into place.

    The file gets the mode of the file it replaces, else the umask's (as ``open`` would create it).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the kernel applies the umask
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        if path.exists():
            os.chmod(tmp, stat.S_IMODE(path.stat().st_mode))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
