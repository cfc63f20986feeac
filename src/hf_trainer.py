"""The in-process trainer: many LoRA adapters (HF PEFT) on one frozen HF causal LM.

Selected by default (`USE_MEGATRON` unset); `TINK_DEVICE` and `TINK_DTYPE` pick where and how
the base model runs. Each Tinker `model_id` is one PEFT adapter (Tinker's scale: alpha 32 over the
rank) with its own optimizer, AdamW or Dimuon as chosen at creation (`src/optimizers.py`); gradients
accumulate over `forward_backward` calls until `optim_step`, as in Tinker.

    >>> from src.backends import AdamParams, LoraSpec, TrainDatum
    >>> from src.tiny_model import ensure_tiny_model
    >>> trainer = HFTrainer(str(ensure_tiny_model("/tmp/tiny-llama")))   # device/dtype "auto"
    >>> trainer.create_adapter("m1", LoraSpec(rank=8, seed=0))
    >>> datum = TrainDatum([1, 5, 9], {"target_tokens": np.array([5, 9, 2]), "weights": np.ones(3)})
    >>> round(trainer.forward_backward("m1", [datum], "cross_entropy", None, False).metrics["loss:sum"], 2)
    18.84
    >>> trainer.optim_step("m1", AdamParams(learning_rate=1e-3))
    {'grad_norm:mean': 8.43..., 'learning_rate:mean': 0.001, 'step:max': 1.0}
"""

from __future__ import annotations

import copy
import json
import logging
import re
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.checkpoint import checkpoint

from .backends import (
    AdamParams,
    BackendError,
    DimuonParams,
    ForwardBackwardResult,
    LoraSpec,
    TrainDatum,
    UserInputError,
)
from .losses import microbatch_loss, validate_inputs
from .memory import CHECKPOINTING_MODES, MicrobatchBudget, activation_bytes_per_token
from .multi_adapter import AdapterPass, RowRouting, Segment, segments_of
from .optimizers import (
    check_loadable_state,
    check_optim_params,
    checkpoint_lora_scale,
    make_optimizer,
    rescale_state,
    set_hyperparameters,
)
from .tensors import LOGIT_CHUNK_ELEMENTS, to_device

log = logging.getLogger(__name__)

# Module names shared by Llama, Qwen2, Mistral, Gemma, ...: LoRA targets per LoraSpec switch.
TARGETS = {
    "train_attn": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "train_mlp": ("gate_proj", "up_proj", "down_proj"),
    "train_unembed": ("lm_head",),
}
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
# PEFT names a tensor `...lora_A.<adapter>.weight` in memory and `...lora_A.weight` in files.
_IN_MEMORY_KEY = re.compile(r"\.lora_([AB])\.[^.]+\.weight$")


@dataclass
class _Adapter:
    peft_name: str  # a safe PEFT adapter name: model_ids may hold dots, which ModuleDict forbids
    spec: LoraSpec
    params: dict[str, torch.nn.Parameter]  # PEFT file key -> parameter, in a fixed order
    optimizer: torch.optim.Optimizer  # AdamW or Dimuon, per spec.optimizer
    step: int = 0


@dataclass
class _Member:
    """One model's request inside a (possibly joined) forward_backward, validated."""

    model_id: str
    adapter: _Adapter
    data: list[TrainDatum]
    loss_fn: str
    loss_fn_config: dict[str, float | str] | None


class HFTrainer:
    """Implements `Trainer`; every public method holds one lock, so calls never overlap."""

    name = "hf-peft"

    def __init__(self, base_model: str, device: str = "auto", dtype: str = "auto", max_adapters: int = 64,
                 microbatch_tokens: int = 16384, gradient_checkpointing: str = "auto"):
        from transformers import AutoModelForCausalLM

        if gradient_checkpointing not in CHECKPOINTING_MODES:
            raise ValueError(f"TINK_GRADIENT_CHECKPOINTING must be auto, true or false, got {gradient_checkpointing!r}")
        self.base_model = base_model
        self.max_adapters = max_adapters
        self.gradient_checkpointing = gradient_checkpointing
        self.device = torch.device("cuda" if device == "auto" and torch.cuda.is_available()
                                   else "cpu" if device == "auto" else device)
        if dtype != "auto" and dtype not in _DTYPES:
            raise ValueError(f"TINK_DTYPE={dtype!r} is not supported; use auto, {', '.join(_DTYPES)}")
        self.dtype = _DTYPES.get(dtype) or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        try:
            model = AutoModelForCausalLM.from_pretrained(base_model, dtype=self.dtype)
        except (OSError, ValueError) as exc:
            raise BackendError(f"hf-peft could not load base model {base_model!r} ({exc}); set TINK_BASE_MODEL "
                               "to a Hugging Face model folder or hub id") from exc
        self._hf = model.to(self.device).eval().requires_grad_(False)  # eval: no dropout, as in Tinker
        # The same modules over the same (frozen) tensors, taken before PEFT wraps any layer: the HF
        # sampler runs on it, so a worker holds one copy of the base weights (see share_base_model).
        self._base_twin = copy.deepcopy(model, {id(t): t for t in (*model.parameters(), *model.buffers())})
        self._checkpoint_layers = _enable_checkpointing(model)
        # Datums are packed into forward passes of at most this many (padded) tokens, fewer when memory is short.
        bytes_per_element = torch.finfo(self.dtype).bits // 8
        self.budget = MicrobatchBudget(
            self.device, microbatch_tokens,
            {ckpt: activation_bytes_per_token(model.config, bytes_per_element, ckpt) for ckpt in (False, True)},
            fixed_bytes=3 * 4 * LOGIT_CHUNK_ELEMENTS)  # an fp32 logits chunk, its softmax and its gradient
        self._last_checkpointed: bool | None = None
        # Backward keeps the fp32 log-softmax (4 bytes x vocabulary per token) instead of making the logits
        # again, unless activations are checkpointed: on a GPU, where the micro-batch budget counts it; on
        # CPU nothing bounds a micro-batch's memory but the token cap, so the logits are recomputed there.
        self.keep_logits = self.device.type == "cuda"
        self._last_microbatches: list[int] = []  # padded tokens of each micro-batch of the last forward_backward
        self._peft = None  # the PeftModel, made by the first create_adapter
        self._vocab = int(model.get_output_embeddings().weight.shape[0])
        self._linear_names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                              if isinstance(m, torch.nn.Linear)}
        self._adapters: dict[str, _Adapter] = {}
        self._active: str | None = None
        self._serial = 0
        self._lock = threading.RLock()
        self._split_head = self._head_is_plain_linear()
        log.info("hf-peft: %s on %s/%s, %s logits, micro-batches of <= %d tokens, activation checkpointing %s%s",
                 base_model, self.device, self.dtype,
                 "chunked" if self._split_head else "full (the model post-processes its logits)", microbatch_tokens,
                 gradient_checkpointing, "" if self._checkpoint_layers else " (this model cannot checkpoint)")

    @property
    def microbatch_tokens(self) -> int:
        """The most padded tokens in one forward pass (TINK_TRAIN_MICROBATCH_TOKENS); fewer when memory is short."""
        return self.budget.cap_tokens

    @microbatch_tokens.setter
    def microbatch_tokens(self, tokens: int) -> None:
        self.budget.cap_tokens = tokens

    def joined_pass_tokens(self, longest: int) -> int:
        """The padded tokens one micro-batch may hold now, for sequences of up to `longest` tokens: what the
        scheduler lets requests of several models join into (TINK_BATCH_ADAPTERS)."""
        return self.budget.tokens(self._checkpoints(longest, forward_only=False))

    def _checkpoints(self, longest: int, forward_only: bool) -> bool:
        """Whether a pass whose longest sequence has `longest` tokens checkpoints activations."""
        return bool(not forward_only and self._checkpoint_layers
                    and self.budget.should_checkpoint(self.gradient_checkpointing, longest))

    def share_base_model(self) -> torch.nn.Module:
        """The base model without adapters, over this trainer's own weight tensors (no copy).

        The tensors are frozen and never written, so another component (the HF sampler) may run
        forward passes on it from its own thread while this trainer trains.
        """
        return self._base_twin

    def memory_report(self) -> dict[str, object]:
        """What the trainer knows about its memory: the micro-batch budget and the checkpointing it used last."""
        return {"gradient_checkpointing": self.gradient_checkpointing, "last_checkpointed": self._last_checkpointed,
                "last_microbatch_tokens": list(self._last_microbatches), "microbatch": self.budget.as_dict()}

    # ------------------------------------------------------------------ adapters

    def create_adapter(self, model_id: str, spec: LoraSpec) -> None:
        """Add a fresh LoRA (B = 0, so the model is unchanged); `spec.seed` fixes A's init."""
        from peft import LoraConfig, get_peft_model

        with self._lock:
            if model_id in self._adapters:
                raise UserInputError(f"model_id {model_id!r} already has an adapter", "model_id")
            if len(self._adapters) >= self.max_adapters:
                raise UserInputError(f"hf-peft already holds {self.max_adapters} adapters (TINK_MAX_ADAPTERS); "
                                     "unload a model first", "model_id")
            modules = []
            for switch, names in TARGETS.items():
                if getattr(spec, switch):
                    found = [n for n in names if n in self._linear_names]
                    if not found:
                        raise UserInputError(f"{self.base_model} has none of the modules {list(names)}; "
                                             f"set {switch}=False", f"lora_config.{switch}")
                    modules += found
            config = LoraConfig(r=spec.rank, lora_alpha=spec.lora_alpha, target_modules=modules, lora_dropout=0.0,
                                bias="none", task_type="CAUSAL_LM")
            name, self._serial = f"tink{self._serial}", self._serial + 1
            # PEFT initialises on the CPU; fork the CPU RNG only when seeded, so unseeded
            # adapters still draw fresh values from the global generator.
            with torch.random.fork_rng(devices=[], enabled=spec.seed is not None):
                if spec.seed is not None:
                    torch.manual_seed(spec.seed)
                if self._peft is None:
                    self._peft = get_peft_model(self._hf, config, adapter_name=name)
                else:
                    self._peft.add_adapter(name, config)
            suffix = f".{name}.weight"
            params = {_IN_MEMORY_KEY.sub(r".lora_\1.weight", n): p for n, p in self._peft.named_parameters()
                      if n.endswith(suffix) and _IN_MEMORY_KEY.search(n)}
            optimizer = make_optimizer(spec.optimizer, _lora_pairs(params), spec)
            self._adapters[model_id] = _Adapter(name, spec, params, optimizer)

    def delete_adapter(self, model_id: str) -> None:
        with self._lock:
            adapter = self._get(model_id)
            with warnings.catch_warnings():  # "X was active, now Y is": each call re-activates anyway
                warnings.simplefilter("ignore")
                self._peft.delete_adapter(adapter.peft_name)
            self._active = None  # PEFT may have switched to another adapter
            del self._adapters[model_id]

    def lora_spec(self, model_id: str) -> LoraSpec:
        with self._lock:
            return self._get(model_id).spec

    def has_adapter(self, model_id: str) -> bool:
        with self._lock:
            return model_id in self._adapters

    def vocab_size(self) -> int:
        return self._vocab

    def adapter_parameters(self, model_id: str) -> Iterator[torch.nn.Parameter]:
        """The adapter's trainable tensors in a fixed order (the data-parallel engine syncs them)."""
        with self._lock:
            return iter(list(self._get(model_id).params.values()))

    # ------------------------------------------------------------------ compute

    def forward_backward(self, model_id: str, data: list[TrainDatum], loss_fn: str,
                         loss_fn_config: dict[str, float | str] | None, forward_only: bool) -> ForwardBackwardResult:
        """Sum the loss over `data`; unless `forward_only`, add its gradient to the adapter's.

        Every datum is validated before any gradient is touched, so a bad batch changes nothing.
        Micro-batches are sized to the memory free now; after an out-of-memory error the whole call
        runs again with half the budget (and checkpointing, in auto mode), from the gradients it
        started with. If a single datum still does not fit, the call fails and the adapter's
        pending gradients are exactly what they were before it.
        """
        with self._lock:
            member = _Member(model_id, self._get(model_id), data, loss_fn, loss_fn_config)
            self._validate(data, loss_fn, loss_fn_config)
            return self._run_members([member], forward_only)[0]

    def forward_backward_many(self, passes: list[AdapterPass],
                              forward_only: bool) -> list[ForwardBackwardResult | BaseException]:
        """Each pass's `forward_backward` result (or its error), computed in one joined pass where possible.

        Every pass is validated alone first: a bad one gets its error and the others run. The rest
        share micro-batches, each row through its own adapter (`src/multi_adapter.py`), so each
        adapter gets the gradient and outputs it would get alone. If the joined pass fails (out of
        memory on one datum, an error found late), every adapter's pending gradients are put back
        as they were and each pass runs alone, so each gets its own result or error.
        """
        with self._lock:
            results: list[ForwardBackwardResult | BaseException | None] = [None] * len(passes)
            joined: list[tuple[int, _Member]] = []
            alone: list[tuple[int, _Member]] = []
            for i, p in enumerate(passes):
                try:
                    member = _Member(p.model_id, self._get(p.model_id), p.data, p.loss_fn, p.loss_fn_config)
                    self._validate(p.data, p.loss_fn, p.loss_fn_config)
                except UserInputError as exc:
                    results[i] = exc
                    continue
                # A model twice (never from the scheduler, which joins one request per model) runs alone, in order.
                (alone if any(m.model_id == p.model_id for _, m in joined) else joined).append((i, member))
            if len(joined) > 1:
                try:
                    for (i, _), result in zip(joined, self._run_members([m for _, m in joined], forward_only)):
                        results[i] = result
                except BaseException as exc:  # pending gradients are back as they were: safe to run again
                    log.warning("hf-peft: the joined pass of %d models failed (%s: %s); running each alone",
                                len(joined), type(exc).__name__, exc)
                    alone = joined + alone
            else:
                alone = joined + alone
            for i, member in sorted(alone, key=lambda pair: pair[0]):
                try:
                    results[i] = self._run_members([member], forward_only)[0]
                except BaseException as exc:  # fails this pass only, as the scheduler fails one operation
                    results[i] = exc
            return results  # type: ignore[return-value]  # every slot is filled above

    def _run_members(self, members: list[_Member], forward_only: bool) -> list[ForwardBackwardResult]:
        """`_run_until_it_fits` from no pending gradient; the earlier gradients are added back after it,
        or, if it fails, put back exactly as they were (the failed attempt's are dropped)."""
        params = [list(m.adapter.params.values()) for m in members]
        earlier = None if forward_only else [_take_grads(p) for p in params]
        try:
            return self._run_until_it_fits(members, forward_only)
        except BaseException:
            if earlier is not None:
                for p in params:
                    _take_grads(p)  # a failed call leaves no partial gradient behind
            raise
        finally:
            if earlier is not None:
                for p, grads in zip(params, earlier):
                    _add_grads(p, grads)

    def _run_until_it_fits(self, members: list[_Member], forward_only: bool) -> list[ForwardBackwardResult]:
        """`_run_microbatches`, again with smaller micro-batches (or checkpointing) after each out-of-memory
        error, from no pending gradient each time, until it fits or a single datum does not."""
        longest = max(len(d.tokens) for m in members for d in m.data)
        count = sum(len(m.data) for m in members)
        names = ", ".join(repr(m.model_id) for m in members)
        checkpointing = self._checkpoints(longest, forward_only)
        while True:
            try:
                result = self._run_microbatches(members, forward_only, checkpointing)
                self._last_checkpointed = checkpointing
                return result
            except torch.OutOfMemoryError as exc:
                if not forward_only:
                    for m in members:
                        _take_grads(m.adapter.params.values())  # drop this attempt's partial gradients
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                failed, failed_tokens = getattr(exc, "tink_microbatch", (count, longest * count))
                if failed > 1:
                    self.budget.shrink(checkpointing, failed_tokens)
                elif (not checkpointing and not forward_only and self._checkpoint_layers
                      and self.gradient_checkpointing == "auto"):
                    checkpointing = True
                else:
                    raise BackendError(
                        f"hf-peft ran out of memory in forward_backward for {names} on one datum of {longest} "
                        f"tokens (activation checkpointing {'on' if checkpointing else 'off'}); its pending gradients "
                        "are unchanged. Send shorter datums, set TINK_GRADIENT_CHECKPOINTING=true, or give training "
                        "more of the GPU (TINK_TRAIN_MEMORY_RESERVE_GB, VLLM_GPU_MEMORY_UTILIZATION)") from exc
                log.warning("hf-peft: out of memory in forward_backward for %s; retrying with micro-batches of <= %d "
                            "tokens, activation checkpointing %s", names, self.budget.tokens(checkpointing),
                            "on" if checkpointing else "off")

    def _run_microbatches(self, members: list[_Member], forward_only: bool,
                          checkpointing: bool) -> list[ForwardBackwardResult]:
        """The members' datums, laid end to end, in micro-batches; a micro-batch holding several members'
        rows routes each row through its own adapter, and its loss is the sum of the members' losses."""
        data = [d for m in members for d in m.data]
        owner = [i for i, m in enumerate(members) for _ in m.data]
        outputs: list[list[dict[str, np.ndarray]]] = [[] for _ in members]
        metrics: list[dict[str, float]] = [{"loss:sum": 0.0} for _ in members]
        grad_mode = torch.no_grad() if forward_only else nullcontext()
        routing = self._routing(members) if len(members) > 1 else None
        self._last_microbatches = []
        with (routing.active() if routing else self._activated(members[0].adapter)), grad_mode, \
                self._checkpointing(checkpointing):
            start = 0
            while start < len(data):
                batch = _next_microbatch(data, start, self.budget.tokens(checkpointing))
                segments = segments_of(owner[start: start + len(batch)])
                padded_tokens = len(batch) * max(len(d.tokens) for d in batch)
                self.budget.start()  # reset the peak-memory counter
                try:
                    if routing:
                        routing.segments = [Segment(members[s.owner].adapter.peft_name, s.start, s.stop)
                                            for s in segments]
                    inputs = ([d.tokens for d in batch], [d.loss_fn_inputs["target_tokens"] for d in batch])
                    logprobs = self._target_logprobs(*inputs, routing,
                                                     recompute_logits=checkpointing or not self.keep_logits)
                    total = None
                    for s in segments:
                        member = members[s.owner]
                        part, scored = microbatch_loss(member.loss_fn, logprobs[s.start: s.stop],
                                                       batch[s.start: s.stop], member.loss_fn_config, metrics[s.owner])
                        outputs[s.owner].extend(scored)
                        total = part if total is None else total + part
                    if not forward_only and total.requires_grad:
                        total.backward()  # per microbatch: activations are freed before the next
                except torch.OutOfMemoryError as exc:
                    exc.tink_microbatch = (len(batch), padded_tokens)  # how large the batch that failed was
                    raise
                if not forward_only:  # a forward pass alone keeps no activations: it says nothing about training
                    self.budget.observe(checkpointing, padded_tokens)
                self._last_microbatches.append(padded_tokens)
                start += len(batch)
        return [ForwardBackwardResult(loss_fn_outputs=o, metrics=m) for o, m in zip(outputs, metrics)]

    def _routing(self, members: list[_Member]) -> RowRouting:
        """Per-row adapters for a joined pass; the split lm_head is routed per token chunk instead."""
        head = self._hf.get_output_embeddings() if self._split_head else None
        return RowRouting(self._peft, (p for m in members for p in m.adapter.params.values()), head)

    @contextmanager
    def _checkpointing(self, on: bool) -> Iterator[None]:
        """Activation checkpointing of every decoder layer for the duration of the block.

        HF checkpoints a layer only while that layer module is in training mode; just the layer
        wrappers are flagged, their submodules (attention, MLP, dropout) stay in eval mode, so
        nothing random happens and the gradients are those of the eval-mode model.
        """
        layers = self._checkpoint_layers if on else []
        for layer in layers:
            layer.training = True
        try:
            yield
        finally:
            for layer in layers:
                layer.training = False

    def optim_step(self, model_id: str, params: AdamParams | DimuonParams) -> dict[str, float]:
        """The adapter's optimizer on the accumulated gradients (clipped to `grad_clip_norm` if > 0), then
        zero them. `params` must be of the family the model was created with (else a 4xx)."""
        with self._lock:
            adapter = self._get(model_id)
            check_optim_params(adapter.spec.optimizer, params, model_id)
            tensors = list(adapter.params.values())
            for p in tensors:
                if p.grad is None:  # no forward_backward since the last step: moments and decay still apply
                    p.grad = torch.zeros_like(p)
            limit = params.grad_clip_norm if params.grad_clip_norm > 0 else float("inf")
            norm = float(torch.nn.utils.clip_grad_norm_(tensors, limit))
            set_hyperparameters(adapter.optimizer, params)
            adapter.optimizer.step()
            adapter.optimizer.zero_grad(set_to_none=True)
            adapter.step += 1
            return {"grad_norm:mean": norm, "learning_rate:mean": params.learning_rate, "step:max": float(adapter.step)}

    def compute_logprobs(self, model_id: str | None, tokens: list[int]) -> list[float]:
        """log p(tokens[t] | tokens[:t]) for t >= 1 (len(tokens) - 1 values); None = the base model."""
        with self._lock:
            adapter = self._get(model_id) if model_id is not None else None
            bad = [t for t in tokens if not 0 <= t < self._vocab]
            if bad:
                raise UserInputError(f"token id {bad[0]} is outside the vocabulary [0, {self._vocab})", "tokens")
            if len(tokens) < 2:
                return []
            with self._activated(adapter), torch.no_grad():
                return self._target_logprobs([tokens[:-1]], [np.asarray(tokens[1:])])[0].tolist()

    # ------------------------------------------------------------------ files

    def export_adapter(self, model_id: str, directory: Path) -> None:
        """`adapter_config.json` + `adapter_model.safetensors` directly in `directory` (PEFT, vLLM)."""
        with self._lock:
            self._write_peft(self._get(model_id), Path(directory))

    def save_state(self, model_id: str, directory: Path) -> None:
        """The PEFT files plus `optimizer.pt` (the optimizer's state by tensor name) and `tink_state.json`
        (whose `lora_spec.optimizer` says which optimizer that state is for)."""
        with self._lock:
            adapter, directory = self._get(model_id), Path(directory)
            self._write_peft(adapter, directory)
            state = adapter.optimizer.state
            moments = {key: {k: v.detach().cpu().clone() for k, v in state[p].items()}
                       for key, p in adapter.params.items() if p in state}
            torch.save({"step": adapter.step, "optimizer": adapter.spec.optimizer, "state": moments},
                       directory / "optimizer.pt")
            (directory / "tink_state.json").write_text(json.dumps(
                {"lora_spec": asdict(adapter.spec), "step": adapter.step, "engine": self.name,
                 "base_model": self.base_model}, indent=2))

    def load_state(self, model_id: str, directory: Path, with_optimizer: bool) -> None:
        """Copy saved weights into the adapter; restore its optimizer and step count if asked, else reset them.

        Everything is checked before anything is copied, so a bad folder leaves the adapter as it was.
        Pending gradients are dropped: they belong to the replaced weights. A folder saved under another
        LoRA scale (adapter_config.json's lora_alpha / r, e.g. a plain PEFT adapter) has its B factors
        rescaled to this adapter's scale, so the loaded model computes what the folder's does.
        """
        from safetensors.torch import load_file

        with self._lock:
            adapter, directory = self._get(model_id), Path(directory)
            weights_file = directory / "adapter_model.safetensors"
            if not weights_file.is_file():
                raise UserInputError(f"{directory} has no adapter_model.safetensors", "path")
            saved = {_IN_MEMORY_KEY.sub(r".lora_\1.weight", k): v for k, v in load_file(str(weights_file)).items()}
            if saved.keys() != adapter.params.keys():
                differ = sorted(saved.keys() ^ adapter.params.keys())[0]
                raise UserInputError(f"{directory} adapts other modules than this model ({differ}); "
                                     "create the model with the checkpoint's lora_config", "path")
            for key, p in adapter.params.items():
                if saved[key].shape != p.shape:
                    raise UserInputError(f"{directory}: {key} has shape {tuple(saved[key].shape)}, this model's "
                                         f"is {tuple(p.shape)} (a different LoRA rank?)", "path")
            check_loadable_state(directory, adapter.spec.optimizer, with_optimizer)
            optimizer = _read_optimizer(directory) if with_optimizer else None
            if with_optimizer and optimizer is None:
                log.warning("%s has no optimizer state; %s starts a fresh %s", directory, model_id,
                            adapter.spec.optimizer)
            factor = checkpoint_lora_scale(directory, adapter.spec.scale) / adapter.spec.scale
            if factor != 1.0:
                saved = {k: v * factor if ".lora_B." in k else v for k, v in saved.items()}
                if optimizer:
                    optimizer["state"] = {k: rescale_state(m, factor) if ".lora_B." in k else m
                                          for k, m in optimizer["state"].items()}
            with torch.no_grad():
                for key, p in adapter.params.items():
                    p.copy_(saved[key])
                    p.grad = None
            # Through torch's own loader, which puts each moment on its parameter's device and
            # keeps `step` where this AdamW's mode (foreach, fused, capturable) expects it.
            saved_state = (optimizer or {}).get("state", {})
            key_of = {id(p): key for key, p in adapter.params.items()}
            order = [key_of[id(p)] for group in adapter.optimizer.param_groups for p in group["params"]]
            state_dict = adapter.optimizer.state_dict()
            state_dict["state"] = {i: saved_state[key] for i, key in enumerate(order) if key in saved_state}
            adapter.optimizer.load_state_dict(state_dict)
            adapter.step = int(optimizer["step"]) if optimizer else 0

    def _write_peft(self, adapter: _Adapter, directory: Path) -> None:
        """Files named as PEFT names a lone adapter's, whatever the in-memory name (no subfolder)."""
        from safetensors.torch import save_file

        directory.mkdir(parents=True, exist_ok=True)
        tensors = {key: p.detach().cpu().contiguous() for key, p in adapter.params.items()}
        save_file(tensors, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
        config = copy.deepcopy(self._peft.peft_config[adapter.peft_name])
        config.base_model_name_or_path = self.base_model
        config.inference_mode = True
        config.save_pretrained(str(directory))  # a config writes itself into `directory`, never a subfolder

    # ------------------------------------------------------------------ internals

    def _get(self, model_id: str) -> _Adapter:
        adapter = self._adapters.get(model_id)
        if adapter is None:
            raise UserInputError(f"unknown model_id {model_id!r}: create it first", "model_id")
        return adapter

    def _activated(self, adapter: _Adapter | None) -> AbstractContextManager:
        """Route the forward pass through `adapter` only (None: through no adapter)."""
        if adapter is None:
            # With no adapter left the LoRA layers are empty (PEFT's disable_adapter would fail).
            return self._peft.disable_adapter() if self._adapters else nullcontext()
        if self._active != adapter.peft_name:
            self._peft.set_adapter(adapter.peft_name)
            self._active = adapter.peft_name
        return nullcontext()

    def _validate(self, data: list[TrainDatum], loss_fn: str, config: dict[str, float | str] | None) -> None:
        if not data:
            raise UserInputError("data must contain at least one datum", "data")
        for i, datum in enumerate(data):
            tokens = np.asarray(datum.tokens, dtype=np.int64)
            if tokens.size == 0:
                raise UserInputError("model_input has no tokens", f"data[{i}].model_input")
            if ((tokens < 0) | (tokens >= self._vocab)).any():
                raise UserInputError(f"token ids must be in [0, {self._vocab})", f"data[{i}].model_input")
            validate_inputs(loss_fn, datum.loss_fn_inputs, len(tokens), i, config)
            targets = np.asarray(datum.loss_fn_inputs["target_tokens"])
            if ((targets < 0) | (targets >= self._vocab)).any():
                raise UserInputError(f"target token ids must be in [0, {self._vocab})",
                                     f"data[{i}].loss_fn_inputs.target_tokens")

    def _target_logprobs(self, tokens: list[list[int]], targets: list[np.ndarray], routing: RowRouting | None = None,
                         recompute_logits: bool = False) -> list[torch.Tensor]:
        """fp32 log p(target) per datum, shaped like each `targets` entry ([T] or [T, K]); with `routing`,
        each row through the adapter its segment names. `recompute_logits` (with activation checkpointing,
        when memory is short): under grad, each chunk's logits are made again in backward instead of
        kept; else backward keeps one fp32 log-softmax per token (the vocabulary's size, in the budget)."""
        lengths = torch.tensor([len(t) for t in tokens])
        # Right padding with id 0 needs no attention mask: causal attention never lets a real
        # position see the pads after it, and pad positions are dropped below.
        ids = torch.zeros(len(tokens), int(lengths.max()), dtype=torch.long)
        for i, t in enumerate(tokens):
            ids[i, : len(t)] = torch.as_tensor(t, dtype=torch.long)
        # The real positions as flat indices made on the host: a boolean mask on the GPU would wait for the
        # forward pass (a sync per micro-batch), and so would a blocking copy, hence `to_device`.
        real = (torch.arange(ids.shape[1])[None] < lengths[:, None]).flatten().nonzero().squeeze(1)
        real, ids = (to_device(t, self.device) for t in (real, ids))
        heads: list[tuple[int, int, Callable[[torch.Tensor], torch.Tensor]]]
        if self._split_head:
            hidden = self._hf.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state
            features = hidden.flatten(0, 1).index_select(0, real)
            heads = (routing.token_heads(lengths.tolist()) if routing
                     else [(0, features.shape[0], self._hf.get_output_embeddings())])
        else:  # the whole model's logits: with routing, the hooks route lm_head's rows like the other layers'
            features = self._hf(input_ids=ids, use_cache=False).logits.flatten(0, 1).index_select(0, real)
            heads = [(0, features.shape[0], _identity)]
        flat = torch.cat([torch.as_tensor(np.asarray(t), dtype=torch.long).reshape(len(t), -1) for t in targets])
        flat = to_device(flat, self.device)
        rows = max(1, LOGIT_CHUNK_ELEMENTS // self._vocab)
        parts = []
        for first, end, head in heads:  # chunks never span two adapters' tokens
            for start in range(first, end, rows):
                stop = min(start + rows, end)
                args = (head, features[start: stop], flat[start: stop])
                parts.append(checkpoint(_chunk_logprobs, *args, use_reentrant=False)
                             if recompute_logits and torch.is_grad_enabled() else _chunk_logprobs(*args))
        out = torch.cat(parts).split(lengths.tolist())
        return [lp.reshape(np.shape(t)) for lp, t in zip(out, targets)]

    def _head_is_plain_linear(self) -> bool:
        """Whether logits == lm_head(decoder(ids)), letting us make logits only at real positions, in chunks.

        Families that scale or soft-cap logits in their CausalLM forward fail this and use it whole.
        """
        try:
            ids = torch.arange(min(8, self._vocab), device=self.device)[None]
            with torch.no_grad():
                split = self._hf.get_output_embeddings()(self._hf.get_decoder()(input_ids=ids).last_hidden_state)
                return torch.equal(split, self._hf(input_ids=ids).logits)
        except (AttributeError, NotImplementedError, TypeError):
            return False


def _chunk_logprobs(head: Callable[[torch.Tensor], torch.Tensor], features: torch.Tensor,
                    targets: torch.Tensor) -> torch.Tensor:
    # log_softmax in fp32 even for a bf16 model: bf16 over a large vocabulary loses ~0.01 nats. One fused
    # kernel each way; `gather - logsumexp` took several passes over the logits (measured on an H100).
    return torch.log_softmax(head(features).float(), -1).gather(-1, targets)


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _next_microbatch(data: list[TrainDatum], start: int, budget_tokens: int) -> list[TrainDatum]:
    """Consecutive datums from `start` whose right-padded batch stays within `budget_tokens` (>= 1 datum)."""
    batch = [data[start]]
    longest = len(data[start].tokens)
    for datum in data[start + 1:]:
        longest = max(longest, len(datum.tokens))
        if longest * (len(batch) + 1) > budget_tokens:
            break
        batch.append(datum)
    return batch


def _lora_pairs(params: dict[str, torch.nn.Parameter]) -> list[tuple[torch.nn.Parameter, torch.nn.Parameter]]:
    """(A, B) of every adapted module, from PEFT file keys (`....lora_A.weight`, `....lora_B.weight`)."""
    return [(p, params[key.replace(".lora_A.", ".lora_B.")]) for key, p in params.items() if ".lora_A." in key]


def _take_grads(params) -> list[torch.Tensor | None]:
    """Detach the parameters' pending gradients (returned) and leave them None."""
    grads = []
    for p in params:
        grads.append(p.grad)
        p.grad = None
    return grads


def _add_grads(params, grads: list[torch.Tensor | None]) -> None:
    """Put back gradients taken by `_take_grads`, summed with whatever accumulated since."""
    for p, g in zip(params, grads):
        if g is not None:
            p.grad = g if p.grad is None else p.grad.add_(g)


def _enable_checkpointing(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Arm HF's per-layer activation checkpointing (non-reentrant) and return the layers it applies to.

    Armed layers checkpoint only while flagged as training (see `HFTrainer._checkpointing`), so arming
    costs nothing until a micro-batch asks for it. Models that cannot checkpoint return [].
    """
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:
        return []
    if not getattr(model, "supports_gradient_checkpointing", False):
        return []
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.eval()  # gradient_checkpointing_enable may switch modes; training mode is set per layer, per call
    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]




def _read_optimizer(directory: Path) -> dict | None:
    """`optimizer.pt`, or the Megatron engine's `optimizer.safetensors` (`<key>.exp_avg`, ...)."""
    if (directory / "optimizer.pt").is_file():
        return torch.load(directory / "optimizer.pt", map_location="cpu", weights_only=True)
    if not (directory / "optimizer.safetensors").is_file():
        return None
    from safetensors.torch import load_file

    meta = directory / "tink_state.json"
    step = int(json.loads(meta.read_text()).get("step", 0)) if meta.is_file() else 0
    state: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in load_file(str(directory / "optimizer.safetensors")).items():
        key, _, moment = name.rpartition(".")
        state.setdefault(key, {"step": torch.tensor(float(step))})[moment] = tensor
    return {"step": step, "state": state}
