"""Look inside while sampling: per-request activation capture and steering, and the HF sampler's hooks.

A request may ask to `capture` activations (`{layer, site, reduce}`) and to `steer` the residual
stream (`{layer, vector | vector_id, scale, positions}`); `parse_look` validates both once at the
HTTP edge into a `LookInside`, which the samplers receive on `SampleJob.look`. Captured values come
back per sample on `SampledSequence.captures`, one float32 array per capture, in request order.

Positions. The row captured for generated token i is the residual stream at the position that
*predicted* it: the last prompt token for the first one, generated token i-1 after. So `all` has
one row per generated token, `last` is the state that chose the final token, `mean` is their mean.
Steering `positions`: `prompt` (every prompt token, so the KV cache is steered too), `generated`
(the generated tokens fed back), `all`. Steering is added before capturing at the same layer.

Sites: `resid_post` (the decoder layer's output: the residual stream after it), `attn_out` and
`mlp_out` (what the attention / MLP block adds to the residual stream). Steering: `resid_post` only.

    >>> look = parse_look({"capture": [{"layer": 1, "reduce": "mean"}],
    ...                    "steer": [{"layer": 0, "vector": [0.1] * 256, "scale": 4}]},
    ...                   ModelDims(num_layers=2, hidden_size=256), max_tokens=8)
    >>> result = hf_sampler.sample(SampleJob(prompt, 1, params, look=look))
    >>> result.sequences[0].captures[0].shape          # (256,)
"""

from __future__ import annotations

import base64
import functools
import numbers
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .backends import UserInputError

SITES = ("resid_post", "attn_out", "mlp_out")
REDUCES = ("last", "mean", "all")
POSITIONS = ("prompt", "generated", "all")
FORMATS = ("json", "base64")
ALL_LIMIT_SETTING = "TINK_CAPTURE_ALL_MAX_TOKENS"


@dataclass(frozen=True)
class CaptureSpec:
    layer: int
    site: str = "resid_post"
    reduce: str = "last"


@dataclass(frozen=True)
class SteerSpec:
    layer: int
    vector: np.ndarray  # float32 [hidden_size]
    scale: float = 1.0
    positions: str = "all"

    def steers(self, position: int, prompt_len: int) -> bool:
        """Whether absolute token position `position` of a request with `prompt_len` prompt tokens is steered."""
        return self.positions == "all" or (position < prompt_len) == (self.positions == "prompt")


@dataclass(frozen=True)
class LookInside:
    """What one request asks to see and change inside the model; empty lists change nothing."""

    capture: tuple[CaptureSpec, ...] = ()
    steer: tuple[SteerSpec, ...] = field(default=())

    def to_wire(self) -> dict[str, Any]:
        """Plain lists and numbers: travels to vLLM's engine process in `SamplingParams.extra_args`."""
        return {"capture": [[c.layer, c.site, c.reduce] for c in self.capture],
                "steer": [[s.layer, s.vector.astype(np.float32).tolist(), float(s.scale), s.positions]
                          for s in self.steer]}

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> LookInside:
        return cls(tuple(CaptureSpec(*c) for c in data.get("capture", ())),
                   tuple(SteerSpec(layer, np.asarray(vector, dtype=np.float32), scale, positions)
                         for layer, vector, scale, positions in data.get("steer", ())))


@dataclass(frozen=True)
class ModelDims:
    num_layers: int
    hidden_size: int


@functools.lru_cache(maxsize=8)
def model_dims(base_model: str) -> ModelDims:
    """Decoder layers and residual width of `base_model` (its config only; cached)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(base_model).get_text_config()
    return ModelDims(int(config.num_hidden_layers), int(config.hidden_size))


VectorLookup = Callable[[str], "tuple[np.ndarray, int] | None"]
"""`lookup(vector_id)` -> (vector, its layer), or None when the caller has no such vector."""


def parse_look(body: dict[str, Any], dims: ModelDims, max_tokens: int, all_limit: int = 256,
               lookup: VectorLookup | None = None) -> LookInside | None:
    """`capture` and `steer` of a request body as a `LookInside` (None when it asks for neither).

    Raises UserInputError naming the offending field (`capture[0].layer`, `steer[1].vector`, ...).
    """
    captures = _list(body, "capture")
    steers = _list(body, "steer")
    if not captures and not steers:
        return None
    capture = tuple(_capture(item, f"capture[{i}]", dims, max_tokens, all_limit) for i, item in enumerate(captures))
    steer = tuple(_steer(item, f"steer[{i}]", dims, lookup) for i, item in enumerate(steers))
    return LookInside(capture, steer)


def capture_format(body: dict[str, Any]) -> str:
    value = body.get("capture_format", "json")
    if value not in FORMATS:
        raise UserInputError(f"capture_format must be one of {', '.join(FORMATS)}, got {value!r}", "capture_format")
    return value


def _list(body: dict[str, Any], name: str) -> list[Any]:
    value = body.get(name) or []
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise UserInputError(f"{name} must be a list of objects", name)
    return value


def _layer(item: dict[str, Any], where: str, dims: ModelDims, default: int | None = None) -> int:
    value = item.get("layer", default)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < dims.num_layers:
        raise UserInputError(f"{where}.layer must be a decoder layer index in [0, {dims.num_layers}), got {value!r}",
                             f"{where}.layer")
    return value


def _choice(item: dict[str, Any], name: str, where: str, choices: tuple[str, ...], default: str) -> str:
    value = item.get(name, default)
    if value not in choices:
        raise UserInputError(f"{where}.{name} must be one of {', '.join(choices)}, got {value!r}", f"{where}.{name}")
    return value


def _capture(item: dict[str, Any], where: str, dims: ModelDims, max_tokens: int, all_limit: int) -> CaptureSpec:
    spec = CaptureSpec(_layer(item, where, dims), _choice(item, "site", where, SITES, "resid_post"),
                       _choice(item, "reduce", where, REDUCES, "last"))
    if spec.reduce == "all" and max_tokens > all_limit:
        raise UserInputError(f"{where}.reduce 'all' returns one row per generated token: max_tokens {max_tokens} "
                             f"exceeds the limit {all_limit} ({ALL_LIMIT_SETTING}); lower max_tokens or use "
                             "reduce 'mean' or 'last'", f"{where}.reduce")
    return spec


def _steer(item: dict[str, Any], where: str, dims: ModelDims, lookup: VectorLookup | None) -> SteerSpec:
    if ("vector" in item) == ("vector_id" in item):
        raise UserInputError(f"{where} needs exactly one of vector (a list of {dims.hidden_size} floats) or vector_id",
                             f"{where}.vector")
    default_layer = None
    if "vector_id" in item:
        if not isinstance(item["vector_id"], str) or lookup is None:
            raise UserInputError(f"{where}.vector_id must name a steering vector", f"{where}.vector_id")
        found = lookup(item["vector_id"])
        if found is None:
            raise UserInputError(f"{where}.vector_id: unknown steering vector {item['vector_id']!r}; list yours with "
                                 "GET /api/v1/steering_vectors", f"{where}.vector_id")
        vector, default_layer = found
    else:
        vector = parse_vector(item["vector"], f"{where}.vector", dims.hidden_size)
    if vector.shape != (dims.hidden_size,):
        raise UserInputError(f"{where}.vector_id names a vector of size {vector.shape[0]}, the model's residual "
                             f"stream has {dims.hidden_size}", f"{where}.vector_id")
    scale = item.get("scale", 1.0)
    if not isinstance(scale, numbers.Real) or isinstance(scale, bool) or not np.isfinite(scale):
        raise UserInputError(f"{where}.scale must be a finite number", f"{where}.scale")
    return SteerSpec(_layer(item, where, dims, default_layer), vector, float(scale),
                     _choice(item, "positions", where, POSITIONS, "all"))


def parse_vector(value: Any, field_name: str, hidden_size: int) -> np.ndarray:
    """A JSON list of `hidden_size` finite numbers as float32, or UserInputError naming `field_name`."""
    if not isinstance(value, list) or not all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in value):
        raise UserInputError(f"{field_name} must be a list of {hidden_size} numbers", field_name)
    if len(value) != hidden_size:
        raise UserInputError(f"{field_name} has {len(value)} values, the model's residual stream has {hidden_size}",
                             field_name)
    vector = np.asarray(value, dtype=np.float32)
    if not np.isfinite(vector).all():
        raise UserInputError(f"{field_name} must contain only finite numbers", field_name)
    return vector


def reduce_rows(rows: np.ndarray, reduce: str) -> np.ndarray:
    """[tokens, hidden] float32 rows as the capture asked: the last row, their mean, or all of them."""
    if reduce == "all":
        return rows
    if len(rows) == 0:
        return np.zeros(rows.shape[1:], dtype=np.float32)
    return rows[-1] if reduce == "last" else rows.mean(axis=0, dtype=np.float64).astype(np.float32)


def encode_array(array: np.ndarray, fmt: str) -> Any:
    """JSON lists (float32 precision), or `{"dtype": "float16", "shape": [...], "data": base64}` (little-endian)."""
    if fmt == "json":
        return np.asarray(array, dtype=np.float32).tolist()
    data = np.ascontiguousarray(array, dtype="<f2").tobytes()
    return {"dtype": "float16", "shape": list(array.shape), "data": base64.b64encode(data).decode("ascii")}


def decode_array(value: Any) -> np.ndarray:
    """The inverse of `encode_array` (either format), for clients and tests."""
    if isinstance(value, dict):
        raw = np.frombuffer(base64.b64decode(value["data"]), dtype="<f2")
        return raw.reshape(value["shape"]).astype(np.float32)
    return np.asarray(value, dtype=np.float32)


def captures_json(captures: list[np.ndarray] | None, look: LookInside | None, fmt: str) -> list[dict[str, Any]]:
    """A sample's captures as the API answers them: the spec's fields plus `values`."""
    if look is None or captures is None:
        return []
    return [{"layer": spec.layer, "site": spec.site, "reduce": spec.reduce, "values": encode_array(values, fmt)}
            for spec, values in zip(look.capture, captures)]


def look_sampler(sampler: Any) -> Any:
    """`sampler` if it can serve a job with `look` (a FallbackSampler can when either of its pair can, and
    routes the job itself), else the 400 naming `capture`."""
    if getattr(sampler, "looks_inside", False):
        return sampler
    raise UserInputError(f"capture and steer need the hf sampler or the in-process vLLM engine; this worker samples "
                         f"with {getattr(sampler, 'name', sampler)!r}", "capture")


# ----------------------------------------------------------------------------- HF forward hooks


def decoder_layers(model: Any) -> Any:
    """The decoder layers (a ModuleList) of an HF causal LM."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    return decoder.layers


class HFHooks:
    """Capture and steering hooks for one `generate` call of one job (every row shares the job's request).

    The hooks act only on the thread that entered them: the HF sampler may share its modules with
    the trainer (`HFTrainer.share_base_model`), whose forward passes on other threads stay untouched.
    Token positions are tracked through a pre-hook on the input embeddings: each forward pass adds
    its sequence length, so the prefix pass over prompt[:-1] and each decoding step are placed
    exactly, whether or not the prompt went through the KV cache first.

        with HFHooks(model, job.look, len(job.prompt)) as hooks:
            model.generate(...)
        per_row = hooks.captures(ends)          # [row][capture] float32 arrays
    """

    def __init__(self, model: Any, look: LookInside, prompt_len: int):
        import torch

        self.model, self.look, self.prompt_len = model, look, prompt_len
        self.offset = self.length = 0
        self.rows: list[list[Any]] = [[] for _ in look.capture]  # per capture: [B, k, H] chunks
        self._handles: list[Any] = []
        self._torch = torch
        self._thread = threading.get_ident()

    def __enter__(self) -> HFHooks:
        layers = decoder_layers(self.model)
        self._handles.append(self.model.get_input_embeddings().register_forward_pre_hook(self._begin))
        for index, layer in enumerate(layers):
            steers = [s for s in self.look.steer if s.layer == index]
            captures = [(i, c) for i, c in enumerate(self.look.capture) if c.layer == index]
            resid = [i for i, c in captures if c.site == "resid_post"]
            if steers or resid:
                self._handles.append(layer.register_forward_hook(self._resid_hook(steers, resid)))
            for site, module in (("attn_out", layer.self_attn), ("mlp_out", layer.mlp)):
                wanted = [i for i, c in captures if c.site == site]
                if wanted:
                    self._handles.append(module.register_forward_hook(self._capture_hook(wanted)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _begin(self, module: Any, args: tuple) -> None:
        if threading.get_ident() != self._thread:
            return
        self.offset += self.length
        self.length = int(args[0].shape[-1])

    def _positions(self) -> Any:
        return self._torch.arange(self.offset, self.offset + self.length)

    def _record(self, indices: list[int], hidden: Any) -> None:
        # Only positions that predict a generated token: the last prompt token and the generated ones.
        # Kept on the model's device (a copy: no sync per step), reduced there once `generate` is done.
        first = max(0, self.prompt_len - 1 - self.offset)
        if first < hidden.shape[1]:
            chunk = hidden[:, first:].detach().to(self._torch.float32, copy=True)
            for i in indices:
                self.rows[i].append(chunk)

    def _resid_hook(self, steers: list[SteerSpec], indices: list[int]) -> Callable:
        def hook(module: Any, args: tuple, output: Any) -> Any:
            if threading.get_ident() != self._thread:
                return None
            hidden = output[0] if isinstance(output, tuple) else output
            for spec in steers:
                mask = [spec.steers(p, self.prompt_len) for p in range(self.offset, self.offset + self.length)]
                if spec.scale and any(mask):
                    delta = self._torch.as_tensor(spec.vector, dtype=hidden.dtype, device=hidden.device) * spec.scale
                    weights = self._torch.tensor(mask, dtype=hidden.dtype, device=hidden.device)
                    hidden = hidden + weights[None, :, None] * delta
            self._record(indices, hidden)
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden
        return hook

    def _capture_hook(self, indices: list[int]) -> Callable:
        def hook(module: Any, args: tuple, output: Any) -> None:
            if threading.get_ident() == self._thread:
                self._record(indices, output[0] if isinstance(output, tuple) else output)
        return hook

    def captures(self, ends: list[int]) -> list[list[np.ndarray]]:
        """Per row, per capture: the reduced float32 values over that row's first `ends[row]` generated tokens."""
        out: list[list[np.ndarray]] = [[] for _ in ends]
        for spec, chunks in zip(self.look.capture, self.rows):
            stacked = self._torch.cat(chunks, dim=1) if chunks else None
            for row, end in enumerate(ends):
                if stacked is None:
                    out[row].append(reduce_rows(np.zeros((0, 0), dtype=np.float32), spec.reduce))
                    continue
                rows = stacked[row, :end]
                if spec.reduce != "all" and len(rows):  # only the reduced row leaves the device
                    rows = rows[-1:] if spec.reduce == "last" else rows.double().mean(0, keepdim=True).float()
                reduced = reduce_rows(rows.cpu().numpy(), spec.reduce)
                out[row].append(np.ascontiguousarray(reduced, dtype=np.float32))
        return out
