"""External tools the set-up and the fetchers call: a subprocess runner with readable errors, and
Debian packages fetched without installing them.

`debian_package` runs ``apt-get download`` with a private apt configuration in a temp dir
(Debian trixie main; the system's apt sources, lists and state are never touched, no root
needed) and unpacks the .deb with ``dpkg -x``.
"""

from __future__ import annotations

import pathlib
import shutil
import subprocess
import tempfile

__all__ = ["run", "debian_package"]

_APT_SOURCE = "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian trixie main\n"


def run(cmd: list[str], what: str, error: type[Exception], cwd=None) -> None:
    """Runs ``cmd``; raises ``error`` naming ``what`` with the output's tail when it fails or cannot start."""
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    except OSError as err:
        raise error(f"{what} could not start: {err}") from err
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip()[-2000:]
        raise error(f"{what} failed (exit {proc.returncode}):\n{tail}")


def debian_package(package: str, dest: pathlib.Path, error: type[Exception]) -> pathlib.Path:
    """Downloads Debian trixie's ``package`` and unpacks its files into ``dest`` (replaced whole,
    atomically); returns ``dest``. Raises ``error`` saying what failed."""
    for tool in ("apt-get", "dpkg"):
        if shutil.which(tool) is None:
            raise error(f"fetching the Debian package {package} needs {tool}, which is not installed")
    with tempfile.TemporaryDirectory(prefix="dga-apt-") as tmp:
        root = pathlib.Path(tmp)
        for sub in ("lists/partial", "cache/archives/partial", "etc/sources.list.d", "etc/preferences.d"):
            (root / sub).mkdir(parents=True)
        (root / "etc" / "sources.list").write_text(_APT_SOURCE)
        (root / "status").touch()
        opts = [f"-oDir::State={root}", f"-oDir::State::Lists={root}/lists", f"-oDir::State::status={root}/status",
                f"-oDir::Cache={root}/cache", f"-oDir::Etc::SourceList={root}/etc/sources.list",
                f"-oDir::Etc::SourceParts={root}/etc/sources.list.d",
                f"-oDir::Etc::Preferences={root}/etc/preferences",
                f"-oDir::Etc::PreferencesParts={root}/etc/preferences.d", "-oDebug::NoLocking=1",
                "-oAPT::Architecture=amd64", "-oAcquire::Languages=none", "-oAPT::Sandbox::User=root"]
        run(["apt-get", *opts, "-q", "update"], "apt-get update (Debian trixie index)", error, cwd=root)
        run(["apt-get", *opts, "download", package], f"apt-get download {package}", error, cwd=root)
        debs = sorted(root.glob(f"{package}_*.deb"))
        if not debs:
            raise error(f"apt-get download produced no {package} .deb in {root}")
        staging = dest.with_name(dest.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        staging.parent.mkdir(parents=True, exist_ok=True)
        run(["dpkg", "-x", str(debs[0]), str(staging)], "dpkg -x", error)
        shutil.rmtree(dest, ignore_errors=True)
        staging.rename(dest)
    return dest
