"""The worker: turns validated requests into ordered, durable operations on the backends.

`Worker` owns one trainer (HF PEFT by default) and one sampler (vLLM or HF generate),
chosen from the config by `src/registry.py`. Every mutating call returns a request id at
once (a future, see `scheduling.py`); the app answers `retrieve_future` from the store.

    >>> worker = Worker.from_config(Config.from_env())
    >>> rid, model_id = worker.create_model(caller, session_id, 0, worker.base_model, LoraSpec(rank=8), None)
    >>> worker.scheduler.wait(rid, timeout=30).status
    'done'
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .auth import Caller
from .backends import (
    AdamParams,
    AdapterRef,
    DimuonParams,
    ForwardBackwardResult,
    GoneError,
    LoraSpec,
    NotFoundError,
    SampleJob,
    Sampler,
    SampleResult,
    TokenSink,
    Trainer,
    UserInputError,
)
from .checkpoint_catalog import CheckpointCatalog
from .checkpoints import (
    ExpirySweeper,
    TinkerPath,
    check_name,
    clear_leftovers,
    expiry_for,
)
from .config import EMBEDDED_MODEL, Config
from .evaluation import perplexity
from .logprob_options import apply_last_n, check_options
from .losses import LOSS_FUNCTIONS, validate_inputs
from .metrics import WorkerMetrics
from .multi_adapter import PassJoiner, joins_passes
from .optimizers import check_optim_params, optimizer_config
from .run_metrics import RunMetrics
from .scheduling import Joinable, Outcome, Scheduler
from .steering import look_sampler
from .store import SESSION_EXPIRED, Store
from .wire import (
    FWD_BWD_KIND,
    SAMPLE_KIND,
    ForwardBackwardCall,
    encode_forward_backward_output,
    encode_sample_response,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalTarget:
    """A plain-JSON `model_id` resolved: the adapter the sampler serves and the trainer's run for it."""

    adapter: AdapterRef | None  # None: the base model
    trained_model_id: str | None  # the training run whose current weights the trainer scores
    checkpoint: str | None  # the tinker:// path the sampler serves


class TrainerUnavailableError(Exception):
    """The trainer backend is down (e.g. the Megatron server died): training requests get HTTP 503.

    The worker never switches trainers silently: adapters and optimizer state live in the trainer.
    """


TRAINER_HEALTH_TTL_S = 1.0  # how long one trainer health probe is trusted
SAMPLER_CLONE_SEQ_BLOCK = 1_000_000_000  # the SDK's seq ids of clone k start at k * this
AUTOSAVE_NAME = "autosave"  # the training checkpoint a graceful shutdown writes for every live model


def _vocab_size(base_model: str) -> int:
    from transformers import AutoConfig

    return int(AutoConfig.from_pretrained(base_model).vocab_size)


def _adapter_ref(record: dict[str, Any]) -> AdapterRef:
    rank = json.loads((Path(record["directory"]) / "adapter_config.json").read_text())["r"]
    # The version makes the name unique per write, so samplers that cache by name never go stale.
    return AdapterRef(name=f"{record['tinker_path']}@v{record['version']}", path=Path(record["directory"]), rank=rank)


def _json(obj: dict[str, Any]) -> Outcome:
    return Outcome("json", json.dumps(obj).encode())


class Worker:
    def __init__(self, config: Config, trainer: Trainer, sampler: Sampler, store: Store):
        self.config = config
        self.trainer = trainer
        self.sampler = sampler
        self.store = store
        self.base_model = trainer.base_model
        self.checkpoints = CheckpointCatalog(store, config, self.base_model)
        self.prometheus = WorkerMetrics()  # this worker's own Prometheus registry (GET /metrics)
        self.scheduler = Scheduler(store, config.sampling_concurrency, observer=self.prometheus)
        self.prometheus.watch(self)
        self.run_metrics = RunMetrics(store)  # the dashboard's per-step series
        self.joiner = (PassJoiner(lambda: self.trainer, self._ensure_adapter, config.batch_adapters_max_models,
                                  config.batch_adapters_max_tokens)
                       if config.batch_adapters and joins_passes(trainer) else None)
        self._restore_lock = threading.Lock()
        self._trainer_health: tuple[float, dict[str, Any]] = (-1e9, {})
        failed = store.fail_unfinished()
        if failed:
            log.warning("%d operations were unfinished at the last shutdown; they are now failed", failed)
        # Before serving: half-written or half-removed folders of a previous process, then what
        # expired while the worker was down; afterwards the sweeper's timer removes expired ones.
        clear_leftovers(config.checkpoint_dir)
        self.checkpoints.remove_expired()
        # The same timer expires idle client sessions (TINK_SESSION_EXPIRY_S); not at start, so clients
        # get one sweep interval to heartbeat again after a restart.
        self._expiry_sweeper = ExpirySweeper(self._sweep, config.checkpoint_sweep_s)
        self._expiry_sweeper.start()

    @classmethod
    def from_config(cls, config: Config) -> Worker:
        from .registry import build_sampler, build_trainer

        base_model = config.resolved_base_model()
        trainer = build_trainer(config, base_model)
        sampler = build_sampler(config, base_model, vocab_size=_vocab_size(base_model), trainer=trainer)
        return cls(config, trainer, sampler, Store(config.database_path))

    def close(self) -> None:
        """Finish queued work within the configured grace period, save every live adapter, then
        release the backends."""
        self._expiry_sweeper.stop()
        self.scheduler.shutdown(self.config.shutdown_grace_s)
        self._autosave()
        self.sampler.close()
        self.store.close()

    def _autosave(self) -> None:
        """Write each loaded model's weights and optimizer state to `tinker://<id>/weights/autosave`,
        the newest training checkpoint, which `_ensure_adapter` restores after the restart: steps
        acknowledged since the client's last save_weights survive a graceful shutdown."""
        for record in self.store.list_models(None):
            model_id = record["model_id"]
            try:
                self._save_autosave(model_id)
            except Exception as exc:  # the trainer may be what is going down; the rest still get saved
                log.warning("could not autosave model %s on shutdown: %s", model_id, exc)

    def _save_autosave(self, model_id: str) -> None:
        """Save the model's weights and optimizer state as its newest training checkpoint (autosave),
        if the trainer holds it."""
        if self.trainer.has_adapter(model_id):
            self.checkpoints.write(TinkerPath(model_id, "training", AUTOSAVE_NAME),
                                   lambda d: self.trainer.save_state(model_id, d), True, None)

    # ------------------------------------------------------------------ identity

    def served_model(self, name: str | None, field: str = "base_model") -> str:
        """Map a requested base model name to the one this worker serves (or a 4xx)."""
        if name in (self.base_model, EMBEDDED_MODEL, self.config.base_model):
            return self.base_model
        raise UserInputError(
            f"{field} {name!r} is not served by this worker; it serves {self.base_model!r}", field
        )

    def capabilities(self) -> dict[str, Any]:
        return {
            "supported_models": [
                {"model_name": self.base_model, "trainable": True, "sampleable": True,
                 "max_context_length": self.config.max_tokens_per_datum}
            ]
        }

    def health(self) -> dict[str, Any]:
        """`status` is "ok" only when every backend that was asked for serves; else "degraded" with `reasons`."""
        trainer = self.trainer_health(fresh=True)
        sampler = self.sampler.health()
        reasons = []
        if not trainer.get("live", True):
            reasons.append(f"trainer {self.trainer.name} is down: {trainer.get('error', 'no reason given')}")
        if sampler.get("degraded"):
            reasons.append(str(sampler.get("reason")))
        elif not sampler.get("live", True):
            where = f" at {sampler['base_url']}" if sampler.get("base_url") else ""
            reasons.append(f"sampler {sampler.get('backend', self.sampler.name)}{where} is down")
        return {"status": "degraded" if reasons else "ok", "reasons": reasons, "trainer": self.trainer.name,
                "trainer_health": trainer, "sampler": sampler, "memory": self.memory_report(),
                "sessions": {"expiry_s": self.config.session_expiry_s,
                             "expired": self.store.count_expired_sessions()}}

    def memory_report(self) -> dict[str, Any]:
        """GPU memory now (where there is a GPU) and the trainer's micro-batch budget."""
        from .memory import DeviceMemory, GiB

        report: dict[str, Any] = {}
        device = getattr(self.trainer, "device", None)
        memory = DeviceMemory.of(device) if device is not None else None
        if memory is not None:
            report["gpu"] = {"device": str(device), "total_gib": round(memory.total / GiB, 2),
                             "free_gib": round(memory.free / GiB, 2)}
        if hasattr(self.trainer, "memory_report"):
            report["trainer"] = self.trainer.memory_report()
        return report

    def trainer_health(self, fresh: bool = False) -> dict[str, Any]:
        """The trainer's own `health()` (remote trainers have one), probed at most once a second."""
        probe = getattr(self.trainer, "health", None)
        if probe is None:
            return {"live": True}
        checked_at, answer = self._trainer_health
        if fresh or time.monotonic() - checked_at > TRAINER_HEALTH_TTL_S:
            answer = probe()
            self._trainer_health = (time.monotonic(), answer)
        return answer

    def _require_trainer(self) -> None:
        health = self.trainer_health()
        if not health.get("live", True):
            raise TrainerUnavailableError(
                f"the {self.trainer.name} trainer is down ({health.get('error', 'no reason given')}); "
                "training operations are refused until it is back, sampling still works")

    def _submit_training(self, op_name: str, model_id: str, owner: str, operation,
                         joinable: Joinable | None = None) -> str:
        """Queue a training operation, unless the trainer is known to be down (then HTTP 503)."""
        self._require_trainer()
        return self.scheduler.submit_training(op_name, model_id, owner, operation, joinable)

    def model_record(self, caller: Caller, model_id: str, field: str = "model_id",
                     loaded: bool = True) -> dict[str, Any]:
        """The model's record if it exists, belongs to `caller` and (unless `loaded` is False: run info)
        is loaded; else a 404."""
        record = self.store.get_model(model_id) if isinstance(model_id, str) else None
        if record is None or not caller.may_see(record["owner"]):
            raise NotFoundError(f"unknown model_id {model_id!r}", field)
        if loaded and record["unloaded"]:
            session = self.store.get_session(record["session_id"]) if record["session_id"] else None
            if session is not None and session["finish_reason"] == SESSION_EXPIRED:
                saved = [c["tinker_path"] for c in self.store.list_checkpoints(model_id) if c["kind"] == "training"]
                resume = (f"its state is saved at {saved[-1]}: continue with ServiceClient."
                          "create_training_client_from_state_with_optimizer" if saved else "it had no saved state")
                raise GoneError(f"training run {model_id!r} was released when its session {session['session_id']!r} "
                                f"expired ({session['finish_detail']}); {resume}", field)
            raise NotFoundError(f"unknown model_id {model_id!r}", field)
        return record

    def info(self, caller: Caller, model_id: str) -> dict[str, Any]:
        record = self.model_record(caller, model_id)
        return {
            "type": "get_info",
            "model_id": model_id,
            "model_data": {"arch": "causal_lm", "model_name": record["base_model"], "tokenizer_id": record["base_model"]},
            "is_lora": True,
            "lora_rank": record["lora"]["rank"],
            "model_name": record["base_model"],
            "optimizer_config": optimizer_config(record["lora"].get("optimizer", "adamw")),
        }

    # ------------------------------------------------------------------ training operations

    def create_model(
        self, caller: Caller, session_id: str | None, model_seq_id: int, base_model: str, spec: LoraSpec,
        user_metadata: Any,
    ) -> tuple[str, str]:
        """Register a new LoRA training run; returns (request_id, model_id)."""
        self._require_trainer()
        base = self.served_model(base_model)
        if spec.rank > self.config.max_lora_rank:
            raise UserInputError(
                f"lora_config.rank {spec.rank} exceeds the limit {self.config.max_lora_rank} (TINK_MAX_LORA_RANK)",
                "lora_config.rank",
            )
        if self.store.count_models() >= self.config.max_adapters:
            raise UserInputError(
                f"this worker already holds {self.config.max_adapters} models (TINK_MAX_ADAPTERS); "
                "unload one first", "base_model")
        if self.store.count_models(caller.owner) >= self.config.max_adapters_per_key:
            raise UserInputError(
                f"this API key already holds {self.config.max_adapters_per_key} models "
                "(TINK_MAX_ADAPTERS_PER_KEY); unload one first", "base_model")
        # The SDK derives the id itself (create_training_client_from_state never sees a response
        # naming it), so the server must use the same `{session_id}:train:{model_seq_id}`.
        session = self.store.get_session(session_id) if session_id else None
        if session is not None and session["finish_reason"] == SESSION_EXPIRED:
            raise GoneError(f"session {session_id!r} expired ({session['finish_detail']}); "
                            "create a new ServiceClient", "session_id")
        model_id = f"{session_id}:train:{model_seq_id}" if session_id else uuid.uuid4().hex
        if not self.store.add_model(model_id, caller.owner, session_id, base, spec.__dict__, user_metadata):
            raise UserInputError(f"model {model_id!r} already exists in this session", "model_seq_id")

        def run() -> Outcome:
            self.trainer.create_adapter(model_id, spec)
            return _json({"type": "create_model", "model_id": model_id})

        return self._submit_training("create_model", model_id, caller.owner, run), model_id

    def forward_backward(self, caller: Caller, call: ForwardBackwardCall) -> str:
        self.model_record(caller, call.model_id)
        self._validate_batch(call)

        def finish(result: ForwardBackwardResult) -> Outcome:
            if not call.forward_only:
                self.run_metrics.forward_backward(call.model_id, call.data, result.metrics)
                self.prometheus.trained(sum(len(datum.tokens) for datum in call.data))
            return Outcome(FWD_BWD_KIND, encode_forward_backward_output(result))

        def run() -> Outcome:
            self._ensure_adapter(call.model_id)
            return finish(self.trainer.forward_backward(
                call.model_id, call.data, call.loss_fn, call.loss_fn_config, call.forward_only
            ))

        op = "forward" if call.forward_only else "forward_backward"
        # With TINK_BATCH_ADAPTERS, other models' waiting requests may share this one's pass.
        joinable = None if self.joiner is None else self.joiner.joinable(
            op, call.model_id, call.data, call.loss_fn, call.loss_fn_config, call.forward_only, finish)
        return self._submit_training(op, call.model_id, caller.owner, run, joinable)

    def _validate_batch(self, call: ForwardBackwardCall) -> None:
        if call.loss_fn not in LOSS_FUNCTIONS:
            raise UserInputError(
                f"unknown loss_fn {call.loss_fn!r}; this worker supports {sorted(LOSS_FUNCTIONS)}", "loss_fn"
            )
        if not call.data:
            raise UserInputError("data must contain at least one datum", "data")
        if len(call.data) > self.config.max_datums:
            raise UserInputError(f"{len(call.data)} datums exceed the limit {self.config.max_datums} (TINK_MAX_DATUMS)",
                                 "data")
        total = sum(len(datum.tokens) for datum in call.data)
        if total > self.config.max_tokens_per_request:
            raise UserInputError(f"{total} tokens in all exceed the limit {self.config.max_tokens_per_request} "
                                 "(TINK_MAX_TOKENS_PER_REQUEST)", "data")
        vocab = self.trainer.vocab_size()
        for i, datum in enumerate(call.data):
            n = len(datum.tokens)
            if n == 0:
                raise UserInputError("model_input has no tokens", f"data[{i}].model_input")
            if n > self.config.max_tokens_per_datum:
                raise UserInputError(
                    f"{n} tokens exceed the limit {self.config.max_tokens_per_datum} (TINK_MAX_TOKENS_PER_DATUM)",
                    f"data[{i}].model_input")
            bad = [t for t in datum.tokens if not 0 <= t < vocab]
            if bad:
                raise UserInputError(f"token id {bad[0]} is outside the vocabulary [0, {vocab})",
                                     f"data[{i}].model_input")
            validate_inputs(call.loss_fn, datum.loss_fn_inputs, n, i, call.loss_fn_config)
            targets = datum.loss_fn_inputs.get("target_tokens")
            if targets is not None and ((targets < 0) | (targets >= vocab)).any():
                raise UserInputError(f"target token ids must be in [0, {vocab})",
                                     f"data[{i}].loss_fn_inputs.target_tokens")

    def optim_step(self, caller: Caller, model_id: str, params: AdamParams | DimuonParams) -> str:
        record = self.model_record(caller, model_id)
        # The params must be of the optimizer family the model was created with (fixed, as in Tinker).
        check_optim_params(record["lora"].get("optimizer", "adamw"), params, model_id)

        def run() -> Outcome:
            self._ensure_adapter(model_id)
            metrics = self.trainer.optim_step(model_id, params)
            self.run_metrics.optim_step(model_id, params.learning_rate, metrics)
            return _json({"type": "optim_step", "metrics": metrics})

        return self._submit_training("optim_step", model_id, caller.owner, run)

    def save_weights(
        self, caller: Caller, model_id: str, name: str | None, overwrite: bool, user_metadata: Any,
        ttl_seconds: int | None = None,
    ) -> str:
        self.model_record(caller, model_id)
        path = TinkerPath(model_id, "training", check_name(name or f"state-{uuid.uuid4().hex[:8]}"))
        expiry_for(ttl_seconds)

        def run() -> Outcome:
            self._ensure_adapter(model_id)
            self.checkpoints.write(path, lambda d: self.trainer.save_state(model_id, d), overwrite, user_metadata,
                                   ttl_seconds)
            return _json({"type": "save_weights", "path": str(path)})

        return self._submit_training("save_weights", model_id, caller.owner, run)

    def save_weights_for_sampler(self, caller: Caller, model_id: str, name: str | None, user_metadata: Any,
                                 ttl_seconds: int | None = None) -> str:
        """Export the adapter for sampling. Without a name, also open a sampling session on it."""
        record = self.model_record(caller, model_id)
        ephemeral = name is None
        path = TinkerPath(model_id, "sampler", check_name(name or f"sampler-{uuid.uuid4().hex[:12]}"))
        expiry_for(ttl_seconds)

        def run() -> Outcome:
            self._ensure_adapter(model_id)
            self.checkpoints.write(path, lambda d: self.trainer.export_adapter(model_id, d), True, user_metadata,
                                   ttl_seconds)
            push = getattr(self.sampler, "sync_adapter", None)
            if push is not None:  # TRL mode: the server holds one policy, so push the new weights now
                push(_adapter_ref(self.store.get_checkpoint(str(path))), self.base_model)
            answer: dict[str, Any] = {"type": "save_weights_for_sampler", "path": str(path)}
            if ephemeral:
                session = f"ss-{uuid.uuid4().hex}"
                self.store.add_sampling_session(session, record["owner"], record["base_model"], str(path),
                                                record["session_id"])
                answer["sampling_session_id"] = session
            return _json(answer)

        return self._submit_training("save_weights_for_sampler", model_id, caller.owner, run)

    def load_weights(self, caller: Caller, model_id: str, path: str, with_optimizer: bool) -> str:
        self.model_record(caller, model_id)
        source = self.checkpoints.directory(caller, path, "path")

        def run() -> Outcome:
            self._ensure_adapter(model_id)
            self.trainer.load_state(model_id, source, with_optimizer)
            return _json({"type": "load_weights", "path": path, "model_id": model_id})

        return self._submit_training("load_weights", model_id, caller.owner, run)

    def create_model_from_state(
        self, caller: Caller, session_id: str | None, model_seq_id: int, path: str, with_optimizer: bool,
        user_metadata: Any, optimizer: str | None = None,
    ) -> tuple[str, str]:
        """`create_training_client_from_state`: a new model whose first operation is a load. With the
        optimizer state it keeps the checkpoint's optimizer; weights only, it gets `optimizer` (AdamW
        unless given), as the SDK's LoadWeightsRequest.optimizer_config says."""
        source = self.checkpoints.directory(caller, path, "path")
        state = json.loads((source / "tink_state.json").read_text()) if (source / "tink_state.json").exists() else {}
        spec_fields = state.get("lora_spec") or {}
        if not spec_fields:
            adapter_config = json.loads((source / "adapter_config.json").read_text())
            spec_fields = {"rank": int(adapter_config["r"])}
        if not with_optimizer:
            spec_fields = {**spec_fields, "optimizer": optimizer or "adamw"}
        spec = LoraSpec(**{k: v for k, v in spec_fields.items() if k in LoraSpec.__dataclass_fields__})
        request_id, model_id = self.create_model(
            caller, session_id, model_seq_id, self.base_model, spec, user_metadata)

        def run() -> Outcome:
            self.trainer.load_state(model_id, source, with_optimizer)
            return _json({"type": "load_weights", "path": path, "model_id": model_id})

        return self._submit_training("load_weights", model_id, caller.owner, run), model_id

    def unload_model(self, caller: Caller, model_id: str, save_first: bool = False) -> str:
        """Queue the model's unload behind its pending operations; with `save_first`, its weights and
        optimizer state are saved (autosave) before the trainer lets them go."""
        self.model_record(caller, model_id)

        def run() -> Outcome:
            if save_first:
                self._save_autosave(model_id)
            if self.trainer.has_adapter(model_id):
                self.trainer.delete_adapter(model_id)
            self.store.mark_unloaded(model_id)
            return _json({"type": "unload_model", "model_id": model_id})

        return self._submit_training("unload_model", model_id, caller.owner, run)

    def release_session_models(self, caller: Caller, session_id: str, save_first: bool = False) -> list[str]:
        """Unload the live models a closed session opened (`tinker checkpoint download` opens one per
        download and closes its session): queued after their pending operations; model ids returned."""
        model_ids, _ = self.store.session_members(session_id, caller.owner)
        live = {record["model_id"] for record in self.store.list_models(caller.owner)}
        released = [model_id for model_id in model_ids if model_id in live]
        for model_id in released:
            self.unload_model(caller, model_id, save_first)
        return released

    def expire_idle_sessions(self) -> int:
        """End every session not heard from for TINK_SESSION_EXPIRY_S and with nothing in flight (a
        killed client never closes its own): its runs are released as a close releases them, after an
        autosave, so no acknowledged step is lost. Returns how many sessions expired."""
        expiry_s = self.config.session_expiry_s
        if expiry_s <= 0:
            return 0
        detail = f"no heartbeat or request for {expiry_s:g} s (TINK_SESSION_EXPIRY_S)"
        expired = self.store.expire_idle_sessions(time.time() - expiry_s, detail)
        for session in expired:
            released = self.release_session_models(Caller(session["owner"]), session["session_id"], save_first=True)
            log.info("expired session %s of %s: %s; released runs: %s", session["session_id"], session["owner"],
                     detail, ", ".join(released) or "none")
        for model_id, owner in self.store.stranded_expired_runs():  # a failed autosave left these loaded
            log.warning("run %s of an expired session is still loaded (its autosave or unload failed); "
                        "saving and unloading it again", model_id)
            self.unload_model(Caller(owner), model_id, save_first=True)
        return len(expired)

    def _sweep(self) -> int:
        """The periodic sweep (every TINK_CHECKPOINT_SWEEP_S): expired checkpoints, then idle sessions."""
        removed = self.checkpoints.remove_expired()
        try:
            self.expire_idle_sessions()
        except Exception:  # the next sweep retries; the timer must go on
            log.exception("expiring idle sessions failed")
        return removed

    def save_weights_external(self, caller: Caller, model_id: str, name: str, ttl_seconds: int | None) -> str:
        """Export the adapter as `tinker://<model_id>/external_weights/<name>`: the PEFT files that
        `external_weights_urls` hands out as download links (`tinker checkpoint download`)."""
        self.model_record(caller, model_id)
        path = TinkerPath(model_id, "external", check_name(name))
        expiry_for(ttl_seconds)

        def run() -> Outcome:
            self._ensure_adapter(model_id)
            size = self.checkpoints.write(path, lambda d: self.trainer.export_adapter(model_id, d), True, None,
                                          ttl_seconds)
            return _json({"type": "save_weights_external", "path": str(path), "size_bytes": size})

        return self._submit_training("save_weights_external", model_id, caller.owner, run)

    def resolve_model_id(self, caller: Caller, model_id: Any, field: str = "model_id") -> EvalTarget:
        """What the plain JSON endpoints accept as `model_id`: the base model's name, a tinker://
        sampler path, or a training model id (its latest sampler checkpoint)."""
        if not isinstance(model_id, str) or not model_id:
            raise UserInputError("model_id is required: a base model name, a tinker:// path or a model id", field)
        if model_id.startswith("tinker://"):
            adapter = self.adapter_for(caller, model_id, field)
            trained = TinkerPath.parse(model_id, field).model_id
            loaded = self.store.get_model(trained)
            # Another key's published checkpoint: its sampler weights only, never the owner's live run.
            live = loaded is not None and not loaded["unloaded"] and caller.may_see(loaded["owner"])
            return EvalTarget(adapter, trained if live else None, model_id)
        if model_id in (self.base_model, self.config.base_model):
            return EvalTarget(None, None, None)
        record = self.model_record(caller, model_id, field, loaded=False)  # a closed session's run still samples
        saved = [c for c in self.store.list_checkpoints(model_id) if c["kind"] == "sampler"]
        if not saved:
            raise UserInputError(
                f"model {model_id!r} has no sampler checkpoint yet; call save_weights_for_sampler first", field)
        return EvalTarget(self.adapter_for(caller, saved[-1]["tinker_path"], field),
                          None if record["unloaded"] else model_id, saved[-1]["tinker_path"])

    def trainer_logprobs(self, target: EvalTarget, tokens: list[int]) -> list[float]:
        """The trainer's logprobs of tokens[1:] under the target's training run (current weights) or
        the base model; `field` errors if the run is gone from the trainer."""
        self._require_trainer()
        if target.adapter is not None and target.trained_model_id is None:
            raise UserInputError("the training run of this checkpoint is unloaded; the trainer cannot score it",
                                 "model_id")
        if target.trained_model_id is not None:
            self._ensure_adapter(target.trained_model_id)
        return [float(x) for x in self.trainer.compute_logprobs(target.trained_model_id, tokens)]

    def perplexity(self, target: EvalTarget, tokens: list[int], context_length: int, stride: int,
                   backends: Sequence[str]) -> dict[str, Any]:
        """Sliding-window perplexity through the sampler and/or the trainer, for comparing the two."""
        self._check_tokens(tokens, "tokens")
        answer: dict[str, Any] = {"tokens": len(tokens), "context_length": context_length, "stride": stride,
                                  "checkpoint": target.checkpoint}
        if "sampler" in backends:
            answer["sampler"] = {"backend": self.sampler.name,
                                 "perplexity": perplexity(self.sampler, tokens, context_length, stride,
                                                          adapter=target.adapter)}
        if "trainer" in backends:
            fn = lambda window: [None, *self.trainer_logprobs(target, window)]  # noqa: E731
            answer["trainer"] = {"backend": self.trainer.name,
                                 "perplexity": perplexity(fn, tokens, context_length, stride)}
        return answer

    def _check_tokens(self, tokens: list[int], field: str) -> None:
        vocab = self.trainer.vocab_size()
        bad = [t for t in tokens if not 0 <= t < vocab]
        if bad:
            raise UserInputError(f"token id {bad[0]} is outside the vocabulary [0, {vocab})", field)
        if len(tokens) > self.config.max_tokens_per_request:
            raise UserInputError(
                f"{len(tokens)} tokens exceed the limit {self.config.max_tokens_per_request} "
                "(TINK_MAX_TOKENS_PER_REQUEST)", field)

    def _ensure_adapter(self, model_id: str) -> None:
        """After a restart, bring a known model back: fresh adapter, then its last training checkpoint."""
        if self.trainer.has_adapter(model_id):
            return
        with self._restore_lock:
            record = self.store.get_model(model_id)
            if record is None:
                raise NotFoundError(f"unknown model_id {model_id!r}", "model_id")
            if record["unloaded"]:  # a run released meanwhile (closed or expired session) is never brought back
                raise NotFoundError(f"model {model_id!r} was unloaded", "model_id")
            self.trainer.create_adapter(model_id, LoraSpec(**record["lora"]))
            saved = [c for c in self.store.list_checkpoints(model_id) if c["kind"] == "training"]
            if saved:
                self.trainer.load_state(model_id, Path(saved[-1]["directory"]), True)
                log.info("restored model %s from %s", model_id, saved[-1]["tinker_path"])

    # ------------------------------------------------------------------ sampling

    def create_sampling_session(
        self, caller: Caller, base_model: str | None, model_path: str | None, session_id: str | None = None
    ) -> str:
        """A sampler on the base model or a checkpoint; it is listed in `session_id` when that is one of
        the caller's sessions (anything else is not linked, so no one can add to another's session)."""
        if model_path is not None:
            self.adapter_for(caller, model_path, "model_path")
            base = self.base_model
        else:
            base = self.served_model(base_model)
        session = f"ss-{uuid.uuid4().hex}"
        known = self.store.get_session(session_id) if isinstance(session_id, str) else None
        linked = session_id if known is not None and known["owner"] == caller.owner else None
        self.store.add_sampling_session(session, caller.owner, base, model_path, linked)
        return session

    def sampling_session(self, caller: Caller, sampling_session_id: str) -> dict[str, Any]:
        record = self.store.get_sampling_session(sampling_session_id)
        if record is None or not caller.may_see(record["owner"]):
            raise NotFoundError(f"unknown sampling_session_id {sampling_session_id!r}", "sampling_session_id")
        return record

    def adapter_for(self, caller: Caller, model_path: str, field: str = "model_path") -> AdapterRef:
        return _adapter_ref(self.checkpoints.record(caller, model_path, field))

    def resolve_sampling_target(
        self, caller: Caller, sampling_session_id: str | None, model_path: str | None, base_model: str | None
    ) -> AdapterRef | None:
        if sampling_session_id:
            session = self.sampling_session(caller, sampling_session_id)
            model_path = session["model_path"]
            if model_path is None:
                return None
        if model_path:
            return self.adapter_for(caller, model_path)
        self.served_model(base_model)
        return None

    def sample(
        self, caller: Caller, job: SampleJob, sampling_session_id: str | None = None, seq_id: int | None = None
    ) -> str:
        """Queue a sample. With the (already resolved) sampling session and the SDK's `seq_id`, its
        completion is reported by `retrieve_futures` to the client that sent it: the SDK numbers a
        client's requests from `clone * 1_000_000_000`."""
        self.check_sample(job)

        def run() -> Outcome:
            result = self._sample(job)
            self.run_metrics.sampled(caller, job, result)
            return Outcome(SAMPLE_KIND, encode_sample_response(result, job))

        clone = (seq_id or 0) // SAMPLER_CLONE_SEQ_BLOCK
        return self.scheduler.submit_sampling("sample", caller.owner, run, sampling_session_id, clone)

    def sample_now(self, job: SampleJob, sink: TokenSink | None = None) -> SampleResult:
        """Synchronous sampling for the plain JSON endpoint (same validation, no future)."""
        self.check_sample(job)
        return self._sample(job, sink)

    def _sample(self, job: SampleJob, sink: TokenSink | None = None) -> SampleResult:
        sampler = look_sampler(self.sampler) if job.look is not None else self.sampler
        result = sampler.sample(job, sink) if sink is not None else sampler.sample(job)
        self.prometheus.sampled(result, self.sampler.name)
        return apply_last_n(job, result)

    def check_sample(self, job: SampleJob) -> None:
        """Raise `UserInputError` naming the field unless `job` is within this worker's limits."""
        vocab = self.trainer.vocab_size()
        bad = [t for t in job.prompt if not 0 <= t < vocab]
        if bad:
            raise UserInputError(f"token id {bad[0]} is outside the vocabulary [0, {vocab})", "prompt")
        check_options(job, vocab, self.config.max_topk_logprobs)  # topk_*, target ids, prompt_alt_tokens_k
        if job.num_samples > self.config.max_num_samples:
            raise UserInputError(
                f"num_samples {job.num_samples} exceeds the limit {self.config.max_num_samples} (TINK_MAX_NUM_SAMPLES)",
                "num_samples")
        if job.params.max_tokens > self.config.max_sample_tokens:
            raise UserInputError(
                f"max_tokens {job.params.max_tokens} exceeds the limit {self.config.max_sample_tokens} "
                "(TINK_MAX_SAMPLE_TOKENS)",
                "sampling_params.max_tokens")
        if len(job.prompt) > self.config.max_tokens_per_datum:
            raise UserInputError(
                f"prompt of {len(job.prompt)} tokens exceeds the limit {self.config.max_tokens_per_datum} "
                "(TINK_MAX_TOKENS_PER_DATUM)", "prompt")
