"""Private directories and files: the only place kvbm keeps KV bytes it will serve again.

Anyone who can write to the disk tier's directory, or to a file in it, can forge blocks whose
headers, checksums and index all match, and kvbm would serve them after a restart. So kvbm
trusts a directory and its files only when this process's user alone can change them.

Operations (any process; ``var`` names the setting the user can change, for the messages):
- ``default_cache_dir()``: the per-user default: ``$XDG_CACHE_HOME/kvbm``, else
  ``~/.cache/kvbm`` when the home directory is ours, else ``<tmp>/kvbm-<uid>``.
- ``ensure_private_dir(path, var)``: create ``path`` (0700, parents too) or accept an existing
  one only if it is a real directory (not a symbolic link), owned by the effective uid and
  not writable by group or others; then prove it writable with ``probe_dir``.
- ``check_private_file(fd, path, var)``: an open file is regular, ours, has exactly one link
  and is not writable by group or others; a file others can merely read is made 0600.
- ``open_private_file(path, flags, var)``: ``os.open`` with ``O_NOFOLLOW | O_CLOEXEC`` (new
  files 0600), then ``check_private_file``; the descriptor.
- ``open_probe(directory, prefix, flags=0)``: a new file under an unguessable name, opened
  with ``O_CREAT | O_EXCL | O_NOFOLLOW`` so that nothing planted at that name (a symbolic or
  hard link) is ever written through; ``(fd, path)``; the caller unlinks it.
- ``probe_dir(directory, var)``: create and remove such a probe.

Every refusal is a ``ConfigError`` naming the path, what is wrong (owner, mode, links) and
the fix.
"""

from __future__ import annotations

import os
import secrets
import stat
import tempfile
from pathlib import Path

from kvbm_core.errors import ConfigError

__all__ = [
    "default_cache_dir",
    "ensure_private_dir",
    "check_private_file",
    "open_private_file",
    "open_probe",
    "probe_dir",
]

_OTHERS_WRITE = stat.S_IWGRP | stat.S_IWOTH


def default_cache_dir() -> str:
    """Where the disk tier lives when ``KVBM_DISK_CACHE_DIR`` is unset: never a shared path."""
    xdg = os.environ.get("XDG_CACHE_HOME", "").strip()
    if xdg and os.path.isabs(xdg):
        return str(Path(xdg) / "kvbm")
    try:
        home = Path.home()
        if home != Path("/") and home.stat().st_uid == os.geteuid():
            return str(home / ".cache" / "kvbm")
    except (OSError, RuntimeError):  # no home directory (a service user): fall through
        pass
    return str(Path(tempfile.gettempdir()) / f"kvbm-{os.geteuid()}")


def _fix(var: str) -> str:
    return f"remove it or set {var} to a directory you own, mode 0700"


def ensure_private_dir(path: Path, var: str = "KVBM_DISK_CACHE_DIR") -> Path:
    """``path``, created 0700 if missing, once it is proven private and writable."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except FileExistsError:
        pass  # not a directory (or a dangling link): said below
    except OSError as exc:
        raise ConfigError(
            f"{var}={str(path)!r} cannot be created ({exc.strerror}); point it at a writable "
            "directory on a local disk"
        ) from None
    try:
        info = path.lstat()
    except OSError as exc:
        raise ConfigError(f"{var}={str(path)!r} cannot be examined ({exc.strerror})") from None
    if stat.S_ISLNK(info.st_mode):
        raise ConfigError(
            f"{var}={str(path)!r} is a symbolic link (to {os.readlink(path)!r}); kvbm does not "
            f"follow links to its cache: set {var} to the real directory, which you own, mode 0700"
        )
    if not stat.S_ISDIR(info.st_mode):
        raise ConfigError(
            f"{var}={str(path)!r} is not a directory; point it at a writable directory on a "
            "local disk"
        )
    _check_owner_and_mode(path, info, var, "directory")
    probe_dir(path, var)
    return path


def _check_owner_and_mode(path: Path, info: os.stat_result, var: str, what: str) -> None:
    uid = os.geteuid()
    if info.st_uid != uid:
        raise ConfigError(
            f"{var}: the {what} {str(path)!r} is owned by uid {info.st_uid}, not by this process "
            f"(uid {uid}); that user could forge the KV kvbm serves: {_fix(var)}"
        )
    if info.st_mode & _OTHERS_WRITE:
        raise ConfigError(
            f"{var}: the {what} {str(path)!r} has mode {stat.S_IMODE(info.st_mode):04o}, "
            f"writable by other users, who could forge the KV kvbm serves: run "
            f"`chmod go-w {path}`, or {_fix(var)}"
        )


def check_private_file(fd: int, path: Path, var: str = "KVBM_DISK_CACHE_DIR") -> None:
    """Refuse an open file that another user could change; make a readable one 0600."""
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        raise ConfigError(f"{var}: {str(path)!r} is not a regular file; {_fix(var)}")
    _check_owner_and_mode(path, info, var, "file")
    if info.st_nlink != 1:
        raise ConfigError(
            f"{var}: the file {str(path)!r} has {info.st_nlink} hard links, so another name "
            f"can read or change it; delete it (kvbm recreates it empty), or {_fix(var)}"
        )
    if info.st_mode & 0o077:
        os.fchmod(fd, 0o600)


def open_private_file(path: Path, flags: int, var: str = "KVBM_DISK_CACHE_DIR") -> int:
    """``os.open`` that never follows a link and refuses a file others could change."""
    fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        check_private_file(fd, path, var)
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_probe(directory: Path, prefix: str, flags: int = 0) -> tuple[int, Path]:
    """A new, private file in ``directory`` that nothing planted can redirect."""
    probe = directory / f"{prefix}{os.getpid()}-{secrets.token_hex(8)}"
    fd = os.open(
        probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC | flags, 0o600
    )
    return fd, probe


def probe_dir(directory: Path, var: str = "KVBM_DISK_CACHE_DIR") -> None:
    try:
        fd, probe = open_probe(directory, ".kvbm-probe-")
        os.close(fd)
        probe.unlink()
    except OSError as exc:
        raise ConfigError(
            f"{var}={str(directory)!r} is not writable ({exc.strerror}); point it at a writable "
            "directory on a local disk"
        ) from None
