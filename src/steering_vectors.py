"""Named steering vectors: uploaded, or made from two sets of prompts; owned by an API key like adapters.

A vector is float32 [hidden_size] with the decoder layer it was made for; a sampling request names
it as `steer: [{"vector_id": "sv-...", "scale": 4}]` (the layer defaults to the vector's own).
`mean_difference` is the activation-addition recipe: the mean over `positive` prompts of the residual
stream after `layer` at each prompt's last token (the state that predicts the next token), minus the
same mean over `negative` prompts. It samples one greedy token per prompt with a `capture`, so it runs
on whichever sampler serves the worker (HF hooks or the vLLM engine).

    >>> vectors = SteeringVectors(store, dims)
    >>> record = vectors.upload(caller, "happy", 1, [0.0] * 128)
    >>> vector, layer = vectors.lookup(caller)(record["vector_id"])
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import numpy as np

from .auth import Caller
from .backends import SampleJob, SampleResult, SamplingParams, UserInputError
from .steering import CaptureSpec, LookInside, ModelDims, VectorLookup, parse_vector
from .store import Store

MAX_CONTRAST_PROMPTS = 256  # per side of a mean difference: each is one forward pass
NAME_CHARS = 128


class SteeringVectors:
    """The worker's named vectors in its SQLite store; every method checks the caller may see the vector."""

    def __init__(self, store: Store, dims: ModelDims):
        self.store, self.dims = store, dims

    def upload(self, caller: Caller, name: Any, layer: Any, values: Any) -> dict[str, Any]:
        vector = parse_vector(values, "vector", self.dims.hidden_size)
        return self._save(caller, _name(name), self._layer(layer), vector, "upload")

    def mean_difference(self, caller: Caller, name: Any, layer: Any, positive: Any, negative: Any,
                        encode: Callable[[str], list[int]], sample: Callable[[SampleJob], SampleResult],
                        adapter: Any = None) -> dict[str, Any]:
        """mean(last-token residual after `layer` | positive) - mean(... | negative), through `sample`."""
        name, layer = _name(name), self._layer(layer)
        look = LookInside((CaptureSpec(layer, "resid_post", "last"),))
        means = []
        for field, prompts in (("positive", positive), ("negative", negative)):
            if (not isinstance(prompts, list) or not prompts or len(prompts) > MAX_CONTRAST_PROMPTS
                    or not all(isinstance(p, str) and p for p in prompts)):
                raise UserInputError(f"{field} must be a list of 1 to {MAX_CONTRAST_PROMPTS} non-empty strings", field)
            rows = [sample(SampleJob(encode(p), 1, SamplingParams(max_tokens=1, temperature=0.0), adapter, look=look))
                    .sequences[0].captures[0] for p in prompts]
            means.append(np.mean(np.stack(rows), axis=0, dtype=np.float64))
        return self._save(caller, name, layer, (means[0] - means[1]).astype(np.float32), "mean_difference")

    def list(self, caller: Caller) -> list[dict[str, Any]]:
        return self.store.list_steering_vectors(None if caller.admin else caller.owner)

    def get(self, caller: Caller, vector_id: str, field: str = "vector_id") -> tuple[dict[str, Any], np.ndarray]:
        """The record and its values; NotFoundError (404) when it is not the caller's."""
        from .worker import NotFoundError

        record = self.store.get_steering_vector(vector_id) if isinstance(vector_id, str) else None
        if record is None or not caller.may_see(record["owner"]):
            raise NotFoundError(f"steering vector {vector_id!r} not found; list yours with GET "
                                "/api/v1/steering_vectors", field)
        values = np.frombuffer(record.pop("vector"), dtype="<f4").astype(np.float32)
        return record, values

    def delete(self, caller: Caller, vector_id: str) -> None:
        self.get(caller, vector_id)
        self.store.delete_steering_vector(vector_id)

    def lookup(self, caller: Caller) -> VectorLookup:
        """`lookup(vector_id) -> (vector, layer)` for `parse_look`, None for an id the caller cannot see."""
        def find(vector_id: str) -> tuple[np.ndarray, int] | None:
            record = self.store.get_steering_vector(vector_id)
            if record is None or not caller.may_see(record["owner"]):
                return None
            return np.frombuffer(record["vector"], dtype="<f4").astype(np.float32), int(record["layer"])
        return find

    def _layer(self, layer: Any) -> int:
        if not isinstance(layer, int) or isinstance(layer, bool) or not 0 <= layer < self.dims.num_layers:
            raise UserInputError(f"layer must be a decoder layer index in [0, {self.dims.num_layers}), got {layer!r}",
                                 "layer")
        return layer

    def _save(self, caller: Caller, name: str, layer: int, vector: np.ndarray, source: str) -> dict[str, Any]:
        vector_id = f"sv-{uuid.uuid4().hex[:16]}"
        self.store.add_steering_vector(vector_id, caller.owner, name, layer, vector.astype("<f4").tobytes(),
                                       len(vector), source)
        record, _ = self.get(caller, vector_id)
        return {**record, "norm": float(np.linalg.norm(vector))}


def _name(name: Any) -> str:
    if not isinstance(name, str) or not name.strip() or len(name) > NAME_CHARS:
        raise UserInputError(f"name must be a non-empty string of at most {NAME_CHARS} characters", "name")
    return name.strip()
