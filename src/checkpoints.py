"""Checkpoint folders and `tinker://` paths, their lifetimes and their removal.

    tinker://<model_id>/weights/<name>           training state: PEFT adapter + optimizer
    tinker://<model_id>/sampler_weights/<name>   PEFT adapter only, servable by vLLM / PEFT
    tinker://<model_id>/external_weights/<name>  PEFT adapter only, for download (`tinker checkpoint download`)

Each lives in `<state_dir>/checkpoints/<model_id>/<kind>/<name>/`. A folder is written
under a temporary name, fsynced, then renamed into place, so a reader (or a restart after
a crash) sees either the complete old checkpoint or the complete new one, never a mix.
Removal is the reverse: renamed away first (readers see it gone at once), row deleted, then
the files; a crash in between leaves a hidden folder that the next start clears.

A checkpoint with a TTL is removed (files and row) once it expires, by `ExpirySweeper`: once
when the worker starts, then on a timer.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .backends import UserInputError

log = logging.getLogger(__name__)

KIND_SEGMENTS = {"training": "weights", "sampler": "sampler_weights", "external": "external_weights"}
_SEGMENT_KINDS = {v: k for k, v in KIND_SEGMENTS.items()}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")
# The SDK's documented TTL range: 1 hour to 10 years.
MIN_TTL_S = 3600
MAX_TTL_S = 10 * 365 * 24 * 3600
_HIDDEN_MARKERS = (".tmp-", ".old-", ".deleted-")  # staging / retired / removed folders of this module


@dataclass(frozen=True)
class TinkerPath:
    model_id: str
    kind: str  # training | sampler | external
    name: str

    def __str__(self) -> str:
        return f"tinker://{self.model_id}/{KIND_SEGMENTS[self.kind]}/{self.name}"

    @classmethod
    def parse(cls, path: str, field: str = "path") -> TinkerPath:
        if not isinstance(path, str) or not path.startswith("tinker://"):
            raise UserInputError(f"{field} must be a tinker:// path, got {path!r}", field)
        parts = path[len("tinker://"):].split("/")
        if len(parts) != 3 or parts[1] not in _SEGMENT_KINDS:
            raise UserInputError(
                f"{field} must look like tinker://<model_id>/<kind>/<name> with <kind> one of "
                f"{', '.join(_SEGMENT_KINDS)}, got {path!r}",
                field,
            )
        check_name(parts[2], field)
        return cls(model_id=parts[0], kind=_SEGMENT_KINDS[parts[1]], name=parts[2])

    @classmethod
    def of_checkpoint_id(cls, model_id: str, checkpoint_id: str, field: str = "checkpoint_id") -> TinkerPath:
        """From the REST form the SDK sends: `model_id` and `checkpoint_id` = `<kind segment>/<name>`."""
        return cls.parse(f"tinker://{model_id}/{checkpoint_id}", field)

    @property
    def checkpoint_id(self) -> str:
        return f"{KIND_SEGMENTS[self.kind]}/{self.name}"


def check_name(name: str, field: str = "path") -> str:
    if not _NAME.match(name) or ".." in name:
        raise UserInputError(
            f"{field}: checkpoint name {name!r} must be 1-128 characters of letters, digits, '_', '.', '-'",
            field,
        )
    return name


def directory_for(root: Path, path: TinkerPath) -> Path:
    return root / path.model_id / KIND_SEGMENTS[path.kind] / path.name


def expiry_for(ttl_seconds: Any, field: str = "ttl_seconds", now: float | None = None) -> float | None:
    """The expiry time of a checkpoint given `ttl_seconds` from now (None: it never expires).

    Raises UserInputError naming `field` unless it is an integer within the SDK's range.
    """
    if ttl_seconds is None:
        return None
    if isinstance(ttl_seconds, bool) or not isinstance(ttl_seconds, int):
        raise UserInputError(f"{field} must be an integer number of seconds or null (never expires), "
                             f"got {ttl_seconds!r}", field)
    if not MIN_TTL_S <= ttl_seconds <= MAX_TTL_S:
        raise UserInputError(f"{field} must be between {MIN_TTL_S} (1 hour) and {MAX_TTL_S} (10 years), "
                             f"got {ttl_seconds}", field)
    return (time.time() if now is None else now) + ttl_seconds


def is_expired(record: dict[str, Any], now: float | None = None) -> bool:
    """Whether a checkpoint's store row is past its TTL (gone for readers, even before the sweep)."""
    return record["expires_at"] is not None and record["expires_at"] <= (time.time() if now is None else now)


def remove_checkpoint(directory: Path, forget: Callable[[], None], also: Sequence[Path] = ()) -> None:
    """Remove a checkpoint: its folder and the folders `also` names (its merged export) renamed away
    into one hidden folder (readers see them gone at once), then `forget()` (its database row), then
    the files. A crash after the renames leaves that hidden folder, which `clear_leftovers` deletes at
    the next start (and, before `forget`, a row readers get 404 for). A folder of `also` on another
    filesystem than `directory` is renamed to a hidden sibling of its own instead."""
    hidden: list[Path] = []
    present = [folder for folder in (directory, *also) if folder.exists()]
    if present:
        directory.parent.mkdir(parents=True, exist_ok=True)
        tombstone = Path(tempfile.mkdtemp(prefix=f".{directory.name}.deleted-", dir=directory.parent))
        hidden.append(tombstone)
        for index, folder in enumerate(present):
            try:
                os.rename(folder, tombstone / ("c" if folder == directory else f"also-{index}"))
            except OSError as exc:
                if exc.errno != errno.EXDEV:
                    raise
                apart = Path(tempfile.mkdtemp(prefix=f".{folder.name}.deleted-", dir=folder.parent))
                os.rename(folder, apart / "c")
                hidden.append(apart)
            _fsync_dir(folder.parent)
    forget()
    for folder in hidden:
        shutil.rmtree(folder, ignore_errors=True)


def clear_leftovers(root: Path) -> int:
    """Delete the hidden staging, retired and removed folders an interrupted process left under
    `root` (call before serving: a write in flight would also have one). Returns how many."""
    if not root.is_dir():
        return 0
    leftovers = [p for p in root.glob("*/*/.*") if p.is_dir() and any(m in p.name for m in _HIDDEN_MARKERS)]
    for folder in leftovers:
        shutil.rmtree(folder, ignore_errors=True)
    return len(leftovers)


class ExpirySweeper:
    """Calls `remove_expired()` every `interval_s` seconds on a daemon thread until `stop()`.

        >>> sweeper = ExpirySweeper(worker.checkpoints.remove_expired, interval_s=60)
        >>> sweeper.start(); ...; sweeper.stop()
    """

    def __init__(self, remove_expired: Callable[[], int], interval_s: float):
        self._remove_expired = remove_expired
        self._interval_s = interval_s
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="checkpoint-expiry", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stopped.wait(self._interval_s):
            try:
                self._remove_expired()
            except Exception:  # a failed sweep (disk, database) must not end the timer; the next one retries
                log.exception("removing expired checkpoints failed")


def write_atomically(target: Path, write: Callable[[Path], None], overwrite: bool) -> int:
    """Run `write(tmp_dir)`, fsync what it wrote, then rename it to `target`; return its size.

    Raises UserInputError if `target` exists and `overwrite` is false.
    """
    if target.exists() and not overwrite:
        raise UserInputError(f"checkpoint {target.name!r} already exists; pass overwrite=True", "path")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        write(staging)
        size = _fsync_tree(staging)
        if target.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.rename(target, retired / "c")
            os.rename(staging, target)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.rename(staging, target)
        _fsync_dir(target.parent)
        return size
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _fsync_tree(folder: Path) -> int:
    size = 0
    for file in folder.rglob("*"):
        if file.is_file():
            size += file.stat().st_size
            fd = os.open(file, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    _fsync_dir(folder)
    return size


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
