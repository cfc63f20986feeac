"""Capture and steering that survive torch.compile and CUDA graphs (TINK_LOOK_INSIDE=static).

src/steering_vllm.py's default hooks run Python per step (they read the step's plan and slice the
batch per request), so they need an eager engine: a compiled model has no Python left in its forward,
and a CUDA graph replays kernels without calling any. These hooks instead are fixed tensor operations
on buffers allocated once at model load, installed *before* vLLM compiles the model so that
torch.compile traces them into its graph:

* steering: `hidden + table[l][index[l][:tokens]]`. `table[l]` holds one combined steering vector
  (sum of vector x scale) per slot, slot 0 zero; `index[l]` gives each token of the step its slot.
  A step that steers nothing at layer l has an all-zero index: it adds zeros.
* capture: `captured[l][site] = stream.index_select(0, rows)` at every layer and site; `rows` lists
  the step's token rows that some request captures (at most one per request per step: the row that
  predicts its next token), zero otherwise.

Between steps the model runner's patch (src/steering_vllm.py) writes the step's slots, indices and
rows into these buffers before the forward, and reads the captured rows after it. What the buffers
cost: per layer, a gather and an add over the step's tokens and four row gathers of at most
`max_num_seqs` rows (one kernel each in a graph), and in memory L x (2 S + 1 + 3 S) x hidden values
of the model's dtype (S = max_num_seqs) plus L x max_num_batched_tokens indices.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .steering import SITES


@dataclass
class PendingCaptures:
    """What a step's forward will leave in `captured`: per row slot, the request and position it is for."""

    rows: list[tuple[Any, int]]  # (the request's _RequestLook, absolute position), by row slot
    sites: set[tuple[int, str]]  # (layer, site) some of those requests capture


class StaticLook:
    """The persistent buffers of one model and the hooks that read and write them."""

    def __init__(self, layers: list[tuple[int, Any]], hidden_size: int, max_tokens: int, max_requests: int,
                 dtype: Any, device: Any):
        import torch

        self.max_rows = max_requests
        slots = 2 * max_requests + 1  # per request: one combination for prompt rows, one for generated rows
        self.rows = torch.zeros(max_requests, dtype=torch.long, device=device)
        self.table = {index: torch.zeros(slots, hidden_size, dtype=dtype, device=device) for index, _ in layers}
        self.index = {index: torch.zeros(max_tokens, dtype=torch.long, device=device) for index, _ in layers}
        self.captured = {(index, site): torch.zeros(max_requests, hidden_size, dtype=dtype, device=device)
                         for index, _ in layers for site in SITES}
        self._steered: set[int] = set()  # layers whose index is not all zero
        for index, layer in layers:
            layer.register_forward_hook(self._resid_hook(index))
            layer.self_attn.register_forward_hook(self._site_hook(self.captured[index, "attn_out"]))
            layer.mlp.register_forward_hook(self._site_hook(self.captured[index, "mlp_out"]))

    @classmethod
    def for_runner(cls, runner: Any) -> StaticLook:
        """Buffers sized by the runner's step limits, on the device and in the dtype of its model."""
        model = runner.get_model()
        layers = getattr(getattr(model, "model", model), "layers", None) or ()
        present = [(i, layer) for i, layer in enumerate(layers) if hasattr(layer, "mlp")]  # not a PP placeholder
        return cls(present, int(runner.model_config.get_hidden_size()), int(runner.max_num_tokens),
                   int(runner.max_num_reqs), runner.dtype, runner.device)

    # -------------------------------------------------------------- traced into the model's graph

    def _resid_hook(self, layer: int) -> Any:
        table, index, rows, captured = self.table[layer], self.index[layer], self.rows, self.captured[layer, "resid_post"]

        def hook(module: Any, args: Any, output: Any) -> Any:
            hidden, residual = output if isinstance(output, tuple) else (output, None)
            hidden = hidden + table.index_select(0, index[:hidden.shape[0]])
            picked = hidden.index_select(0, rows)
            captured.copy_(picked if residual is None else picked + residual.index_select(0, rows))
            return (hidden, residual) if isinstance(output, tuple) else hidden
        return hook

    def _site_hook(self, captured: Any) -> Any:
        rows = self.rows

        def hook(module: Any, args: Any, output: Any) -> None:
            values = output[0] if isinstance(output, tuple) else output
            captured.copy_(values.index_select(0, rows))
        return hook

    # -------------------------------------------------------------- between steps, on the host

    def apply(self, plan: list[Any], num_tokens: int) -> PendingCaptures:
        """Write the step's steering slots and capture rows; `plan`: src/steering_vllm.py's `_Slice`s.
        `collect` must follow the step's forward, whatever happens: it also clears them. If this fails,
        nothing stays written: stale slots would steer every later step."""
        try:
            return self._write(plan, num_tokens)
        except BaseException:
            self.reset()
            raise

    def _write(self, plan: list[Any], num_tokens: int) -> PendingCaptures:
        import torch

        steering: dict[int, tuple[np.ndarray, list[np.ndarray]]] = {}
        for part in plan:
            request = part.request
            for layer in sorted({s.layer for s in request.look.steer if s.scale}):
                if layer not in self.index:
                    continue
                index, vectors = steering.setdefault(layer, (np.zeros(num_tokens, np.int64), []))
                positions = np.arange(part.first_position, part.first_position + part.end - part.start)
                for in_prompt in (True, False):
                    row = 0 if in_prompt else request.prompt_len  # any prompt position, any generated one
                    parts = [np.asarray(s.vector, np.float32) * s.scale for s in request.look.steer
                             if s.layer == layer and s.scale and s.steers(row, request.prompt_len)]
                    chosen = (positions < request.prompt_len) == in_prompt
                    if not parts or not chosen.any():
                        continue
                    vectors.append(np.sum(parts, axis=0))
                    index[part.start:part.end][chosen] = len(vectors)  # slot 0 stays the zero row
        for layer, (index, vectors) in steering.items():
            if not vectors:  # e.g. prompt-only steering in a decode step
                continue
            self._steered.add(layer)
            table = self.table[layer]
            table[1:1 + len(vectors)].copy_(torch.from_numpy(np.stack(vectors)).to(table.dtype))
            self.index[layer][:num_tokens].copy_(torch.from_numpy(index))

        rows: list[tuple[Any, int]] = []
        offsets: list[int] = []
        for part in plan:
            request = part.request
            if not request.look.capture:
                continue
            # only positions that predict a generated token and were not read before (a recomputed prefix)
            first = max(part.first_position, request.prompt_len - 1, request.newest + 1)
            for position in range(first, part.first_position + part.end - part.start):
                offsets.append(part.start + position - part.first_position)
                rows.append((request, position))
                request.newest = position
        if len(rows) > self.max_rows:
            raise RuntimeError(f"{len(rows)} capture rows in one step, more than the {self.max_rows} buffered")
        if rows:
            self.rows[:len(rows)].copy_(torch.tensor(offsets, dtype=torch.long))
        sites = {(spec.layer, spec.site) for request, _ in rows for spec in request.look.capture}
        return PendingCaptures(rows, sites)

    def collect(self, pending: PendingCaptures) -> None:
        """After the step's forward: hand each captured row to its request, then clear the step."""
        try:
            if pending.rows:
                count = len(pending.rows)
                values = {key: self.captured[key][:count].float().cpu().numpy() for key in pending.sites
                          if key in self.captured}
                for slot, (request, position) in enumerate(pending.rows):
                    for spec, store in zip(request.look.capture, request.rows):
                        store.add(position, values[spec.layer, spec.site][slot].copy())
        finally:
            self.reset()

    def reset(self) -> None:
        """No steering and no capture rows: the state every step starts from."""
        for layer in self._steered:
            self.index[layer].zero_()
        self._steered.clear()
        self.rows.zero_()
