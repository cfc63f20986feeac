"""Merged export: a LoRA checkpoint folded into its base weights, as a standalone Hugging Face model.

The folder holds only what a model hub checkpoint holds (`config.json`, `generation_config.json`,
`model*.safetensors`, the tokenizer files): no adapter files, no PEFT key names, so
`AutoModelForCausalLM.from_pretrained(folder)` and `vllm serve folder` load it as they load any
model. The merge is PEFT's `merge_and_unload` (W + scale * B @ A in every adapted linear layer).

    python -m src export tinker://<model_id>/sampler_weights/<name> ./merged     # on the worker's machine
    POST /api/v1/export {"path": "tinker://..."}  ->  {"directory": "<state_dir>/exports/..."}

The tinker:// form reads the worker's state (TINK_STATE_DIR); a PEFT adapter folder (e.g. from
`tinker checkpoint download`) works too.

A worker's export has no record of its own: its folder is the record, so nothing can point at a
missing export. It goes with its checkpoint (deleted or expired, `CheckpointCatalog._remove`), in the
same hidden rename; `EXPORTS_IN_PROGRESS` keeps a removal from racing an export being written.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from .backends import UserInputError
from .checkpoints import KIND_SEGMENTS, TinkerPath, is_expired, write_atomically

log = logging.getLogger(__name__)
T = TypeVar("T")

EXPORTS_DIR = "exports"  # under the state dir: where the HTTP route writes
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
DTYPES = ("auto", "float32", "bfloat16", "float16")
# The steps `merge_adapter` reports, in order (a progress bar's stages).
STEPS = ("load the base model", "apply the adapter", "merge", "save the weights", "save the tokenizer")


@dataclass(frozen=True)
class ExportSource:
    """An adapter folder and the base model it was trained on."""

    adapter_dir: Path
    base_model: str


def export_directory(state_dir: Path, path: TinkerPath) -> Path:
    """Where the worker writes the merged export of `path`: `<state_dir>/exports/<model_id>/<kind>/<name>`."""
    return state_dir / EXPORTS_DIR / path.model_id / KIND_SEGMENTS[path.kind] / path.name


class ExportInProgressError(Exception):
    """A live checkpoint whose merged export is being written cannot be removed yet (HTTP 409)."""


class ExportsInProgress:
    """Which merged exports the worker is writing now, keyed by their folder (`export_directory`:
    one per state dir and checkpoint), so that removing a checkpoint never leaves behind an export
    finished after it, nor pulls the adapter out from under a merge.

        >>> with EXPORTS_IN_PROGRESS.exporting(folder, find_record) as record: merge_adapter(...)
        >>> with EXPORTS_IN_PROGRESS.removing(folder, path, wait=False): remove_checkpoint(...)
    """

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._writing: Counter[Path] = Counter()

    @contextmanager
    def exporting(self, folder: Path, find: Callable[[], T]) -> Iterator[T]:
        """Count `folder` as being written for the block, which gets `find()` (the checkpoint's record,
        or its 404). `find` runs under the lock: a removal has either finished (`find` raises) or will
        see this export."""
        with self._changed:
            found = find()
            self._writing[folder] += 1
        try:
            yield found
        finally:
            with self._changed:
                self._writing[folder] -= 1
                if self._writing[folder] <= 0:
                    del self._writing[folder]
                self._changed.notify_all()

    @contextmanager
    def removing(self, folder: Path, path: str, wait: bool) -> Iterator[None]:
        """Hold off new exports while the block removes checkpoint `path` and its export `folder`. If
        that export is being written: wait for it to finish (`wait`), else raise ExportInProgressError."""
        with self._changed:
            if self._writing[folder] and not wait:
                raise ExportInProgressError(
                    f"checkpoint {path} is being exported (POST /api/v1/export); delete it once the export has "
                    "finished, so the merged folder is not left without its checkpoint")
            self._changed.wait_for(lambda: not self._writing[folder])
            yield

    def is_writing(self, folder: Path) -> bool:
        with self._changed:
            return bool(self._writing[folder])


EXPORTS_IN_PROGRESS = ExportsInProgress()  # per process, like the worker's state dir it guards


def local_source(source: str, state_dir: Path, base_model: str | None = None) -> ExportSource:
    """Resolve what `python -m src export` was given: a tinker:// path in the worker's state at
    `state_dir` (the worker need not run), or a PEFT adapter folder. `base_model` overrides the base
    the checkpoint records (its model's, or the folder's `base_model_name_or_path`)."""
    if source.startswith("tinker://"):
        from .store import Store

        path = TinkerPath.parse(source, "source")
        database = state_dir / "tink.sqlite3"
        if not database.is_file():
            raise UserInputError(f"no Tink worker state in {state_dir} (TINK_STATE_DIR): export a tinker:// path on "
                                 "the worker's machine with its TINK_STATE_DIR, or give a downloaded adapter folder "
                                 "(tinker checkpoint download)", "source")
        store = Store(database)
        try:
            record = store.get_checkpoint(str(path))
            model = store.get_model(path.model_id) if record is not None else None
        finally:
            store.close()
        if record is None or is_expired(record) or not Path(record["directory"]).is_dir():
            raise UserInputError(f"no checkpoint at {source!r} in {state_dir}", "source")
        base = base_model or (model or {}).get("base_model")
        if not base:
            raise UserInputError(f"the worker's state names no base model for {source!r}; pass --base-model",
                                 "base_model")
        return ExportSource(Path(record["directory"]), base)
    folder = Path(source).expanduser()
    check_adapter_folder(folder, "source")
    recorded = json.loads((folder / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not (base_model or recorded):
        raise UserInputError(f"{folder}/adapter_config.json names no base model; pass --base-model", "base_model")
    return ExportSource(folder, base_model or recorded)


def check_adapter_folder(folder: Path, field: str) -> None:
    missing = [name for name in ADAPTER_FILES if not (folder / name).is_file()]
    if missing:
        raise UserInputError(f"{folder} is not a PEFT adapter folder: it has no {', '.join(missing)}", field)


def merge_adapter(source: ExportSource, out_dir: Path, dtype: str = "auto", overwrite: bool = False,
                  step: Callable[[str], None] | None = None) -> int:
    """Write base + adapter, merged, as a standalone HF model folder at `out_dir`; return its size in bytes.

    The folder appears whole or not at all (built next to it, then renamed); an existing one is
    replaced only with `overwrite`. `dtype` is the saved weights' ("auto": the base checkpoint's).
    `step(name)` is called before each of `STEPS`.
    """
    if dtype not in DTYPES:
        raise UserInputError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}", "dtype")
    check_adapter_folder(source.adapter_dir, "source")
    if out_dir.exists() and not out_dir.is_dir():
        raise UserInputError(f"{out_dir} is a file; give a folder to write", "out")
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise UserInputError(f"{out_dir} exists and is not empty; choose another folder or overwrite it", "out")
    return write_atomically(out_dir, lambda staging: _write_merged(source, staging, dtype, step or _log_step), True)


def _write_merged(source: ExportSource, folder: Path, dtype: str, step: Callable[[str], None]) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    step(STEPS[0])
    # On the CPU, whatever the worker trains on: the export must not take memory from training.
    model = AutoModelForCausalLM.from_pretrained(source.base_model, dtype=_torch_dtype(dtype))
    if _adapts_lm_head(source.adapter_dir):
        _untie_lm_head(model, torch)
    step(STEPS[1])
    peft_model = PeftModel.from_pretrained(model, str(source.adapter_dir))
    step(STEPS[2])
    merged = peft_model.merge_and_unload()
    step(STEPS[3])
    merged.save_pretrained(folder, safe_serialization=True)
    step(STEPS[4])
    AutoTokenizer.from_pretrained(source.base_model).save_pretrained(folder)


def _torch_dtype(dtype: str):
    import torch

    return "auto" if dtype == "auto" else getattr(torch, dtype)


def _adapts_lm_head(adapter_dir: Path) -> bool:
    from safetensors import safe_open

    with safe_open(str(adapter_dir / "adapter_model.safetensors"), "pt") as tensors:
        return any(".lm_head." in key for key in tensors.keys())


def _untie_lm_head(model, torch) -> None:
    """Give lm_head its own copy of the weight: merging an lm_head LoRA into a weight shared with the
    input embeddings (Qwen2.5-0.5B, Qwen3-0.6B) would change the embeddings too, which PEFT's adapter
    never did (its delta applies to the logits only)."""
    output, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
    if output is None or output.weight is not embeddings.weight:
        return
    output.weight = torch.nn.Parameter(output.weight.detach().clone())
    model.config.tie_word_embeddings = False
    text_config = model.config.get_text_config()
    if text_config is not model.config:
        text_config.tie_word_embeddings = False


def _log_step(name: str) -> None:
    log.info("export: %s", name)
