"""Checkpoint folders and `tinker://` paths.

    tinker://<model_id>/weights/<name>          training state: PEFT adapter + optimizer
    tinker://<model_id>/sampler_weights/<name>  PEFT adapter only, servable by vLLM / PEFT

Each lives in `<state_dir>/checkpoints/<model_id>/<kind>/<name>/`. A folder is written
under a temporary name, fsynced, then renamed into place, so a reader (or a restart after
a crash) sees either the complete old checkpoint or the complete new one, never a mix.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .backends import UserInputError

KIND_SEGMENTS = {"training": "weights", "sampler": "sampler_weights"}
_SEGMENT_KINDS = {v: k for k, v in KIND_SEGMENTS.items()}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")


@dataclass(frozen=True)
class TinkerPath:
    model_id: str
    kind: str  # training | sampler
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
                f"{field} must look like tinker://<model_id>/weights/<name> or "
                f"tinker://<model_id>/sampler_weights/<name>, got {path!r}",
                field,
            )
        check_name(parts[2], field)
        return cls(model_id=parts[0], kind=_SEGMENT_KINDS[parts[1]], name=parts[2])


def check_name(name: str, field: str = "path") -> str:
    if not _NAME.match(name) or ".." in name:
        raise UserInputError(
            f"{field}: checkpoint name {name!r} must be 1-128 characters of letters, digits, '_', '.', '-'",
            field,
        )
    return name


def directory_for(root: Path, path: TinkerPath) -> Path:
    return root / path.model_id / KIND_SEGMENTS[path.kind] / path.name


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
