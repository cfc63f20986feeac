"""Many LoRA adapters in one pass over the shared base model (TINK_BATCH_ADAPTERS).

Eight users with eight sequences each cost eight small passes over the base model when each
`forward_backward` runs alone; joined, they cost one. Each row of a joined micro-batch goes
through its own adapter (`RowRouting`): the rows of one adapter are kept contiguous, so every
LoRA product runs on a slice of the batch (no gather or scatter), as punica's SGMV groups tokens
by adapter. When the adapters' slices are alike (equal row counts, same rank and dtype on the
layer: each user sent the same micro-batch shape), a layer's LoRA runs for all of them as two
batched products over stacked A and B factors (`grouped_lora_sum`) instead of a pair per slice.
Every loss is a sum over datums and adapters share no parameter, so the backward pass
of the joined loss gives each adapter exactly the gradient it gets alone (up to float rounding).

PEFT 0.21.2's own mixed batches (`adapter_names=`) are refused while the PeftModel is flagged as
training (Tink's wrapper is, though its modules are in eval mode); flagged as evaluating they run
with grad and give the right gradients (tests/test_multi_adapter_training.py checks both). They
were not used: they reach the layers through forward hooks that are gone by the time activation
checkpointing recomputes a layer in backward (the recomputation would use the active adapter),
gather every sub-batch with a Python index list (a copy per adapter per layer), and would hand
row-level names to the token-level chunks of Tink's split lm_head.

    >>> passes = [AdapterPass("m1", data1, "cross_entropy", None), AdapterPass("m2", data2, "ppo", None)]
    >>> results = trainer.forward_backward_many(passes, forward_only=False)   # one result or error each
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from .backends import ForwardBackwardResult, TrainDatum
from .scheduling import Joinable, Outcome

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AdapterPass:
    """One model's `forward_backward` (or `forward`) request, as one member of a joined pass."""

    model_id: str
    data: list[TrainDatum]
    loss_fn: str
    loss_fn_config: dict[str, float | str] | None


class MultiAdapterTrainer(Protocol):
    """A trainer that can run several models' requests in one pass (the HF PEFT trainer)."""

    def forward_backward_many(self, passes: list[AdapterPass],
                              forward_only: bool) -> list[ForwardBackwardResult | BaseException]: ...


def joins_passes(trainer: object) -> bool:
    """Whether `trainer`'s own class runs joined passes (a wrapper that forwards attributes does not count:
    what it wraps around `forward_backward` would be bypassed)."""
    return callable(getattr(type(trainer), "forward_backward_many", None))


@dataclass(frozen=True)
class Segment:
    """Rows [start, stop) of a batch that belong to one owner (an adapter name or a member index)."""

    owner: Any
    start: int
    stop: int


def segments_of(owners: Sequence[Any]) -> list[Segment]:
    """The runs of equal owners, in order: `segments_of("aab")` -> a [0, 2), b [2, 3)."""
    segments: list[Segment] = []
    for row, owner in enumerate(owners):
        if segments and segments[-1].owner == owner:
            segments[-1] = Segment(owner, segments[-1].start, row + 1)
        else:
            segments.append(Segment(owner, row, row + 1))
    return segments


def lora_delta(layer: torch.nn.Module, adapter: str, x: torch.Tensor) -> torch.Tensor:
    """What PEFT's `lora.Linear` adds to its base output for `adapter` (dropout is 0 in Tink)."""
    lora_a = layer.lora_A[adapter]
    return layer.lora_B[adapter](lora_a(x.to(lora_a.weight.dtype))) * layer.scaling[adapter]


def grouped_lora_sum(layer: torch.nn.Module, adapters: Sequence[str], x: torch.Tensor, output: torch.Tensor,
                     scales: torch.Tensor) -> torch.Tensor:
    """`output` plus, on each of len(adapters) equal blocks of rows, that adapter's LoRA: two `bmm` over the
    stacked factors, one add. The stack is differentiable, so each adapter's gradient stays its own.

    `scales` is [S, 1, 1] of `layer.scaling`. As PEFT does, B's output is scaled (scaling the rank-sized
    product instead would be cheaper but rounds differently when the scale is not a power of two, e.g.
    32/12), the LoRA runs in its weights' dtype and the sum is cast back to `output`'s."""
    a = torch.stack([layer.lora_A[name].weight for name in adapters])  # [S, r, in]
    b = torch.stack([layer.lora_B[name].weight for name in adapters])  # [S, out, r]
    blocks = x.to(a.dtype).reshape(len(adapters), -1, x.shape[-1])  # [S, rows*seq, in]
    delta = torch.bmm(torch.bmm(blocks, a.transpose(1, 2)), b.transpose(1, 2)) * scales
    return (output + delta.view(output.shape)).to(output.dtype)


class RowRouting:
    """While active, every LoRA layer adds to rows `segment.start:stop` the LoRA of `segment.owner`.

    PEFT's own LoRA path is switched off for the duration (layers give their base output) and the
    routed adapters' tensors require grad. Set `segments` before each forward pass; keep the
    context open through backward, where activation checkpointing runs the layers again.
    """

    def __init__(self, peft_model: Any, params: Iterable[torch.nn.Parameter], head: torch.nn.Module | None):
        from peft.tuners.lora import Linear as LoraLinear
        from peft.tuners.tuners_utils import BaseTunerLayer

        self._peft = peft_model
        self._params = list(params)
        self.head = head  # the split lm_head: routed per token chunk by `token_heads`, not by the hooks
        self.segments: list[Segment] = []
        self._scales: dict[tuple, torch.Tensor] = {}  # [S, 1, 1] per (scalings, dtype, device): no copy per layer
        tuned = [m for m in peft_model.modules() if isinstance(m, BaseTunerLayer)]
        if any(not isinstance(m, LoraLinear) for m in tuned):
            raise NotImplementedError("row routing handles PEFT lora.Linear layers only")
        self._layers = [m for m in tuned if m is not head]

    @contextmanager
    def active(self) -> Iterator[RowRouting]:
        handles = []
        tuner = self._peft.base_model
        tuner.disable_adapter_layers()  # base outputs only; re-enabling restores PEFT's requires_grad flags
        try:
            for p in self._params:
                p.requires_grad_(True)
            handles = [layer.register_forward_hook(self._add_routed_lora) for layer in self._layers]
            yield self
        finally:
            for handle in handles:
                handle.remove()
            tuner.enable_adapter_layers()

    def _add_routed_lora(self, layer: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        x = args[0]
        adapters = self._groupable(layer, output)
        if adapters:
            return grouped_lora_sum(layer, adapters, x, output, self._scale_column(layer, adapters))
        # One concatenation of the slices, not an in-place add per slice: measured faster on CPU, where
        # autograd copies the whole output's gradient once per in-place slice.
        parts, routed = [], False
        for seg in self.segments:
            rows = output[seg.start: seg.stop]
            if seg.owner in layer.lora_A:  # summed in the LoRA's dtype, then cast back, as PEFT does
                rows = (rows + lora_delta(layer, seg.owner, x[seg.start: seg.stop])).to(output.dtype)
                routed = True
            parts.append(rows)
        if not routed:
            return output
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _groupable(self, layer: torch.nn.Module, output: torch.Tensor) -> list[str] | None:
        """The segments' adapters when `grouped_lora_sum` can serve them all: two or more segments that
        split the rows evenly, each adapter with a LoRA on `layer` of one shape and dtype, without bias."""
        segments = self.segments
        if len(segments) < 2 or segments[-1].stop != output.shape[0]:
            return None
        rows = segments[0].stop - segments[0].start
        adapters = [seg.owner for seg in segments]
        if any(seg.stop - seg.start != rows or seg.owner not in layer.lora_A for seg in segments):
            return None
        first = layer.lora_A[adapters[0]].weight
        for name in adapters:
            a, b = layer.lora_A[name].weight, layer.lora_B[name]
            if a.shape != first.shape or a.dtype != first.dtype or b.weight.dtype != first.dtype or b.bias is not None:
                return None
        return adapters

    def _scale_column(self, layer: torch.nn.Module, adapters: list[str]) -> torch.Tensor:
        weight = layer.lora_A[adapters[0]].weight
        key = (tuple(layer.scaling[name] for name in adapters), weight.dtype, weight.device)
        if key not in self._scales:  # built once per pass: a host-to-device copy per layer would stall a GPU
            self._scales[key] = torch.tensor(key[0], dtype=weight.dtype, device=weight.device).view(-1, 1, 1)
        return self._scales[key]

    def token_heads(self, lengths: Sequence[int]) -> list[tuple[int, int, Callable[[torch.Tensor], torch.Tensor]]]:
        """(first token, end token, head) per segment over the batch's real tokens laid end to end."""
        ends = [0]
        for n in lengths:
            ends.append(ends[-1] + n)
        return [(ends[seg.start], ends[seg.stop], functools.partial(_routed_head, self.head, seg.owner))
                for seg in self.segments]


def _routed_head(head: torch.nn.Module, adapter: str, features: torch.Tensor) -> torch.Tensor:
    out = head(features)
    if adapter not in getattr(head, "lora_A", {}):
        return out
    return (out + lora_delta(head, adapter, features)).to(out.dtype)


@dataclass(frozen=True)
class _JoinedRequest:
    request: AdapterPass
    forward_only: bool
    finish: Callable[[ForwardBackwardResult], Outcome]  # the worker's bookkeeping, then the wire encoding


class PassJoiner:
    """Makes `forward_backward` / `forward` requests joinable by the scheduler and runs joined ones.

    `trainer()` is the worker's trainer at run time; `prepare(model_id)` runs before a model's pass
    (the worker restores an adapter there). Its error, the trainer's per-request error or `finish`'s
    fails that request only; `run_together` itself never raises, so nothing is ever applied twice.
    """

    def __init__(self, trainer: Callable[[], object], prepare: Callable[[str], None], max_models: int,
                 max_tokens: int):
        self.trainer, self.prepare = trainer, prepare
        self.max_models, self.max_tokens = max_models, max_tokens

    def joinable(self, op: str, model_id: str, data: list[TrainDatum], loss_fn: str,
                 loss_fn_config: dict[str, float | str] | None, forward_only: bool,
                 finish: Callable[[ForwardBackwardResult], Outcome]) -> Joinable:
        request = _JoinedRequest(AdapterPass(model_id, data, loss_fn, loss_fn_config), forward_only, finish)
        return Joinable(kind=op, rows=len(data), longest=max(len(d.tokens) for d in data), request=request,
                        run_together=self.run_together, max_members=self.max_models, token_limit=self.token_limit)

    def token_limit(self, longest: int) -> int:
        """The most padded tokens a joined pass may hold: TINK_BATCH_ADAPTERS_MAX_TOKENS, and no more than
        one of the trainer's micro-batches now. A larger joined pass is cut into micro-batches anyway, so
        it saves no pass over the base model and only loses the grouped LoRA product where a cut falls
        inside a member (at 7B, 8 requests of 8 x 512 joined ran at 0.84x of the same one by one)."""
        trainer = self.trainer()
        fits = getattr(trainer, "joined_pass_tokens", None)
        return self.max_tokens if fits is None else min(self.max_tokens, fits(longest))

    def run_together(self, members: list[_JoinedRequest]) -> list[Outcome | BaseException]:
        """One result or error per member, in order; members of one call share `forward_only`."""
        results: list[Outcome | BaseException | None] = [None] * len(members)
        ready = []
        for i, member in enumerate(members):
            try:
                self.prepare(member.request.model_id)
                ready.append(i)
            except BaseException as exc:
                results[i] = exc
        passes, forward_only, trainer = [members[i].request for i in ready], members[0].forward_only, self.trainer()
        try:
            outputs = (trainer.forward_backward_many(passes, forward_only) if joins_passes(trainer)
                       else [_alone(trainer, p, forward_only) for p in passes])
        except BaseException as exc:  # the trainer's contract is one result per pass; keep ours if it breaks it
            outputs = [exc] * len(passes)
        for i, output in zip(ready, outputs, strict=True):
            results[i] = output if isinstance(output, BaseException) else _finished(members[i].finish, output)
        return results  # type: ignore[return-value]  # every slot is filled above


def _alone(trainer: Any, p: AdapterPass, forward_only: bool) -> ForwardBackwardResult | BaseException:
    try:
        return trainer.forward_backward(p.model_id, p.data, p.loss_fn, p.loss_fn_config, forward_only)
    except BaseException as exc:
        return exc


def _finished(finish: Callable[[ForwardBackwardResult], Outcome],
              result: ForwardBackwardResult) -> Outcome | BaseException:
    try:
        return finish(result)
    except BaseException as exc:
        return exc
