"""Channels: one module per way of touching a person. Each declares what it needs and implements `send`."""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import jinja2

from cadence import sandbox

if TYPE_CHECKING:
    from sqlmodel import Session

#: Each channel's template parts: part name -> file extension (`template: email/x` -> x.txt and x.html).
PARTS: dict[str, dict[str, str]] = {
    "email": {"text": ".txt", "html": ".html"},
    "sms": {"text": ".txt"},
    "call": {"script": ".md"},
    "letter": {"html": ".html"},
}


class DeliveryError(Exception):
    """A provider refused or failed for good; TransientError is the kind where trying again may work."""

    transient: ClassVar[bool] = False


class TransientError(DeliveryError):
    transient = True


class RateLimited(DeliveryError):
    """A limit (the provider's, or a sender's daily quota) says not now: the touch waits `retry_after`
    seconds and is tried again, without counting an attempt."""

    transient = True

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass(frozen=True)
class Message:
    """One touch, rendered and addressed, ready for a channel."""

    key: str
    touch_id: int
    channel: str
    contact: Mapping[str, Any]
    deal: Mapping[str, Any] | None
    reason: str
    due_at: datetime
    local_date: date
    parts: Mapping[str, str]
    sender: Mapping[str, str]
    #: Where the touch stands in a person's work list (the policy's call_priority for calls).
    priority: float = 0.0


@dataclass(frozen=True)
class Receipt:
    provider: str
    reference: str
    #: What else the provider said that is worth keeping on the touch, e.g. {"segments": 2}.
    details: Mapping[str, Any] = field(default_factory=dict)


class Channel:
    """Base for every channel; hooks default to doing nothing special."""

    name: ClassVar[str]
    #: The contact field without which the touch cannot be made.
    requires: ClassVar[str | None] = None
    #: True when sending the same key twice leaves one delivery (so a lost send may safely be retried).
    idempotent: ClassVar[bool] = False
    #: True when touches on this channel may be sent in a worker's batch: idempotent, and quick because the
    #: send stays on this machine (a file, a row). A batch sends inside the transaction that records it, so
    #: the send must be short, and safe to make again should that transaction roll back.
    batchable: ClassVar[bool] = False
    #: True when a delivery is a row of Cadence's own database, which `send_in` can make inside a
    #: transaction of the caller's, so that the row and the touch's record commit together.
    in_database: ClassVar[bool] = False

    @property
    def parts(self) -> dict[str, str]:
        return PARTS[self.name]

    def render(self, env: jinja2.Environment, template: str, context: Mapping[str, Any]) -> dict[str, str]:
        return {part: sandbox.render(env, f"{template}{ext}", context) for part, ext in self.parts.items()}

    def missing(self, contact: Mapping[str, Any]) -> str | None:
        """Why this contact cannot be reached on this channel, or None."""
        if self.requires and not contact.get(self.requires):
            return f"contact has no {self.requires}"
        return None

    def send(self, message: Message) -> Receipt:
        raise NotImplementedError

    def send_in(self, s: Session, message: Message) -> Receipt:
        """Send inside the caller's transaction `s`; only a channel `in_database` can."""
        raise NotImplementedError(f"{self.name} does not deliver to the database")

    def send_all_in(self, s: Session, messages: Sequence[Message]) -> list[Receipt]:
        """`send_in` for several messages, their receipts in the same order; a channel may do it at once."""
        return [self.send_in(s, message) for message in messages]


#: Folders `write_atomically` has made or found, so each write does not ask again.
_folders: set[Path] = set()
#: How `write_atomically` makes a file with no name yet, to be named once written (`O_TMPFILE`: Linux on
#: ext4, XFS, Btrfs, tmpfs and others); 0 where the system has no such thing.
_UNNAMED = getattr(os, "O_TMPFILE", 0) and os.O_TMPFILE | os.O_WRONLY | getattr(os, "O_CLOEXEC", 0)
#: Folders whose file system cannot make or name a file with no name: they get a named temporary file.
_named_only: set[Path] = set()
#: What a file system answers when it cannot make a file with no name (Linux before 3.11 takes `O_TMPFILE`
#: for a plain `O_DIRECTORY`), or cannot give it a name.
_CANNOT_UNNAMED = frozenset({errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL, errno.EXDEV, errno.EPERM})
#: How the named way makes its temporary file: a new one, readable by this user alone.
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
#: One named temporary file at a time in a process: threads making files in one folder at once queue for
#: its lock in the kernel, which spins while it waits.
_naming = threading.Lock()


def write_atomically(path: Path, data: bytes) -> None:
    """Write a whole file or nothing: readers never see half a message, rewrites replace it.

    The data goes into a file with no name, which is then linked into the folder: the folder changes once,
    and only for a moment, and a writer killed halfway leaves nothing behind. Where that cannot be done, it
    goes into a named temporary file that is then renamed over `path`."""
    folder = path.parent
    if folder not in _folders:
        folder.mkdir(parents=True, exist_ok=True)
        _folders.add(folder)
    if _UNNAMED and folder not in _named_only and _write_unnamed(folder, path, data):
        return
    with _naming:
        _write_named(folder, path, data)


def _temporary(path: Path) -> Path:
    """A temporary name beside `path`, for this process and thread, which write one file at a time: no
    random name to find. It ends in ".tmp", never in the message's own suffix, so a reader of `*.eml` never
    takes one left behind."""
    return path.parent / f".{path.name}.{os.getpid()}-{threading.get_ident()}.tmp"


def _write_unnamed(folder: Path, path: Path, data: bytes) -> bool:
    """Write `data` into a file with no name in `folder`, then name it `path`; False, with nothing written,
    where the folder is gone or its file system cannot (the caller then takes the named way)."""
    try:
        fd = os.open(folder, _UNNAMED, 0o600)
    except FileNotFoundError:  # the folder was removed since: the named way makes it again
        return False
    except OSError as exc:  # no files without a name here, or something the named way meets and reports too
        return _refused(folder, exc)
    try:
        _write_all(fd, data)
        # linkat(2) follows /proc's link to the open file only when asked to, which Python does only when
        # given a folder descriptor: the file's own serves, and is ignored beside an absolute path.
        unnamed = f"/proc/self/fd/{fd}"
        try:
            os.link(unnamed, path, src_dir_fd=fd, follow_symlinks=True)
        except FileExistsError:  # a rewrite: named beside it for a moment, then put in its place
            tmp = _temporary(path)
            tmp.unlink(missing_ok=True)  # left by a writer killed before its rename
            os.link(unnamed, tmp, src_dir_fd=fd, follow_symlinks=True)
            try:
                os.replace(tmp, path)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
        except FileNotFoundError:  # the folder was removed since, or there is no /proc
            return False
        except OSError as exc:
            return _refused(folder, exc)
    finally:
        os.close(fd)
    return True


def _write_all(fd: int, data: bytes) -> None:
    """Write the whole of `data` to `fd` with the system's own calls: a file object would cost more to make
    than a message costs to write."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _refused(folder: Path, exc: OSError) -> bool:
    """False, for the named way to be taken; remembered for `folder` when its file system cannot make or name
    a file with no name, not for an error the named way meets as well and reports."""
    if exc.errno in _CANNOT_UNNAMED:
        _named_only.add(folder)
    return False


def _write_named(folder: Path, path: Path, data: bytes) -> None:
    tmp = _temporary(path)
    try:
        fd = os.open(tmp, _CREATE, 0o600)
    except FileNotFoundError:  # the folder was removed since
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, _CREATE, 0o600)
    except FileExistsError:  # left by a writer killed before its rename, whose process id came round again
        tmp.unlink()
        fd = os.open(tmp, _CREATE, 0o600)
    try:
        try:
            _write_all(fd, data)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
