"""`MegatronTrainer`: the worker's `Trainer` that runs in a separate trainer server process.

Chosen by `USE_MEGATRON=true` with `MEGATRON_SERVER_URL`. Training then happens in
`src/trainer_server.py`, started on its own (one process per GPU, torchrun); sampling stays
with the worker's sampler (vLLM or HF), which reads the PEFT folders this trainer exports.

    $ torchrun --nproc-per-node 2 -m src.trainer_server --engine megatron --tp 2 \\
          --model /models/Qwen2.5-0.5B --port 8100
    $ USE_MEGATRON=true MEGATRON_SERVER_URL=http://127.0.0.1:8100 \\
          TINK_BASE_MODEL=/models/Qwen2.5-0.5B python -m src serve

    >>> trainer = MegatronTrainer("http://127.0.0.1:8100", "/models/Qwen2.5-0.5B")
    >>> trainer.create_adapter("m1", LoraSpec(rank=8, seed=0))
    >>> trainer.forward_backward("m1", data, "cross_entropy", None, False).metrics
    {'loss:sum': 41.2...}

Directories passed to `save_state`, `load_state` and `export_adapter` are paths that the
server process opens itself: worker and trainer server must share a filesystem (same
machine, or the same mount at the same path).

This module also holds the wire protocol both sides speak (`encode`/`decode`): JSON only,
with numpy arrays as `{"__ndarray__": {"dtype", "shape", "b64"}}` for a fixed set of dtypes,
so nothing from the network is ever unpickled.
"""

from __future__ import annotations

import base64
import logging
import threading
from pathlib import Path
from typing import Any

import numpy as np
import requests

from .backends import (
    AdamParams,
    BackendError,
    DimuonParams,
    ForwardBackwardResult,
    LoraSpec,
    TrainDatum,
    UserInputError,
)

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------- wire codec

# The only dtypes that cross the wire; anything else is refused rather than guessed.
_DTYPES = {"float32", "float64", "float16", "int64", "int32", "int16", "int8", "uint8", "bool"}


def encode_array(array: np.ndarray) -> dict[str, Any]:
    array = np.ascontiguousarray(array)
    if array.dtype.name not in _DTYPES:
        raise TypeError(f"arrays of dtype {array.dtype} do not cross the trainer wire; use one of {sorted(_DTYPES)}")
    return {"__ndarray__": {"dtype": array.dtype.name, "shape": list(array.shape),
                            "b64": base64.b64encode(array.astype(array.dtype.newbyteorder("<")).tobytes()).decode()}}


def decode_array(obj: dict[str, Any]) -> np.ndarray:
    spec = obj["__ndarray__"]
    dtype = spec.get("dtype")
    if dtype not in _DTYPES:
        raise UserInputError(f"array dtype {dtype!r} is not accepted; use one of {sorted(_DTYPES)}", "dtype")
    shape = tuple(int(n) for n in spec["shape"])
    raw = base64.b64decode(spec["b64"], validate=True)
    array = np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<"))
    if array.size != int(np.prod(shape, dtype=np.int64)):
        raise UserInputError(f"array of shape {list(shape)} does not match its {array.size} values", "shape")
    return array.reshape(shape).astype(dtype)  # native byte order, writable copy


def encode(value: Any) -> Any:
    """Make `value` JSON-able: numpy arrays become tagged base64 objects, scalars plain numbers."""
    if isinstance(value, np.ndarray):
        return encode_array(value)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {str(k): encode(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [encode(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def decode(value: Any) -> Any:
    """Inverse of `encode` on parsed JSON."""
    if isinstance(value, dict):
        if "__ndarray__" in value:
            return decode_array(value)
        return {k: decode(v) for k, v in value.items()}
    if isinstance(value, list):
        return [decode(v) for v in value]
    return value


def encode_data(data: list[TrainDatum]) -> list[dict[str, Any]]:
    return [{"tokens": [int(t) for t in d.tokens], "loss_fn_inputs": encode(d.loss_fn_inputs)} for d in data]


def decode_data(raw: Any) -> list[TrainDatum]:
    if not isinstance(raw, list):
        raise UserInputError("data must be a list of datums", "data")
    data = []
    for i, item in enumerate(raw):
        if not isinstance(item, dict) or not isinstance(item.get("tokens"), list):
            raise UserInputError("each datum needs a list of integer tokens", f"data[{i}].tokens")
        inputs = decode(item.get("loss_fn_inputs") or {})
        if not all(isinstance(v, np.ndarray) for v in inputs.values()):
            raise UserInputError("loss_fn_inputs values must be arrays", f"data[{i}].loss_fn_inputs")
        data.append(TrainDatum(tokens=[int(t) for t in item["tokens"]], loss_fn_inputs=inputs))
    return data


def spec_to_json(spec: LoraSpec) -> dict[str, Any]:
    return dict(spec.__dict__)


def spec_from_json(raw: dict[str, Any]) -> LoraSpec:
    return LoraSpec(**{k: v for k, v in raw.items() if k in LoraSpec.__dataclass_fields__})


def params_to_json(params: AdamParams | DimuonParams) -> dict[str, Any]:
    """A step's hyperparameters, tagged with their optimizer family as Tinker tags them (`type`)."""
    return {"type": "dimuon" if isinstance(params, DimuonParams) else "adamw", **params.__dict__}


def params_from_json(raw: Any) -> AdamParams | DimuonParams:
    """Inverse of `params_to_json` (no `type`: AdamParams, as before the tag existed)."""
    if not isinstance(raw, dict):
        raise UserInputError("params must be an object of AdamParams or DimuonParams fields", "params")
    kind = raw.get("type", "adamw")
    cls = {"adamw": AdamParams, "dimuon": DimuonParams}.get(kind)
    if cls is None:
        raise UserInputError(f"params.type must be adamw or dimuon, got {kind!r}", "params.type")
    try:
        return cls(**{k: float(v) for k, v in raw.items() if k in cls.__dataclass_fields__})
    except (TypeError, ValueError) as exc:
        raise UserInputError(f"params: {exc}", "params") from None


# ----------------------------------------------------------------------------- client

START_HINT = ("start it with `torchrun --nproc-per-node N -m src.trainer_server --engine megatron "
              "--model MODEL --port PORT` (see CONFIGURATION.md), or unset USE_MEGATRON to train in-process")


class MegatronTrainer:
    """A `Trainer` whose every call is one HTTP request to the trainer server, answered in order.

    Guarantees: a call returns only after every rank of the server ran it; a 4xx from the
    server raises `UserInputError` with the server's field; an unreachable, dying or failed
    server raises `BackendError` naming the URL and what to do. It never falls back to
    another trainer.
    """

    name = "megatron"

    def __init__(self, url: str, base_model: str, timeout_s: float = 3600.0, connect_timeout_s: float = 5.0):
        self.url = url.rstrip("/")
        self.base_model = base_model
        self.timeout = (connect_timeout_s, timeout_s)
        self._http = requests.Session()
        self._lock = threading.Lock()  # requests.Session is not documented thread-safe
        self._vocab: int | None = None
        self._checked_model = False
        self.last_op: dict[str, Any] | None = None  # the server's {seq, started, finished} of the last call

    # -- transport

    def _call(self, op: str, payload: dict[str, Any] | None = None) -> Any:
        self._check_model()
        return self._post(op, payload or {})

    def _post(self, op: str, payload: dict[str, Any]) -> Any:
        try:
            with self._lock:
                response = self._http.post(f"{self.url}/v1/{op}", json=encode(payload), timeout=self.timeout)
        except requests.Timeout:
            raise BackendError(
                f"the Megatron trainer server at {self.url} did not answer {op} within {self.timeout[1]:.0f} s; "
                "it may still finish it, so check the server's /v1/health before retrying") from None
        except requests.RequestException as exc:
            raise BackendError(
                f"the Megatron trainer server at {self.url} did not answer {op} ({type(exc).__name__}); "
                f"the operation did not complete. Check that it is running, or {START_HINT}") from None
        try:
            body = response.json()
        except ValueError:
            body = {"error": response.text[:500]}
        if 400 <= response.status_code < 500:
            raise UserInputError(body.get("error", f"{op} was refused"), body.get("field"))
        if response.status_code != 200:
            raise BackendError(f"the Megatron trainer server at {self.url} failed {op} "
                               f"(HTTP {response.status_code}): {body.get('error', '')}")
        self.last_op = body.get("op")
        return decode(body.get("result"))

    def _check_model(self) -> None:
        """On first contact, refuse a server that trains another base model than the worker serves."""
        if self._checked_model:
            return
        info = self.health()
        if not info.get("live"):
            raise BackendError(f"the Megatron trainer server at {self.url} is down: {info.get('error')}")
        served = str(info.get("base_model"))
        if Path(served).expanduser().resolve() != Path(self.base_model).expanduser().resolve() and served != self.base_model:
            raise BackendError(f"the Megatron trainer server at {self.url} trains {served!r} but this worker "
                               f"serves {self.base_model!r}; restart one of them with the same model")
        self._checked_model = True

    def health(self) -> dict[str, Any]:
        """`{"live": bool, ...}` from the server; `live` is False (with `error`) when it cannot be reached."""
        try:
            response = requests.get(f"{self.url}/v1/health", timeout=self.timeout[0])
            info = response.json()
        except (requests.RequestException, ValueError) as exc:
            return {"live": False, "url": self.url, "error": f"not reachable ({type(exc).__name__}); {START_HINT}"}
        info.setdefault("live", response.status_code == 200)
        info["url"] = self.url
        return info

    # -- Trainer

    def create_adapter(self, model_id: str, spec: LoraSpec) -> None:
        self._call("create_adapter", {"model_id": model_id, "spec": spec_to_json(spec)})

    def delete_adapter(self, model_id: str) -> None:
        self._call("delete_adapter", {"model_id": model_id})

    def forward_backward(self, model_id: str, data: list[TrainDatum], loss_fn: str,
                         loss_fn_config: dict[str, float | str] | None, forward_only: bool) -> ForwardBackwardResult:
        result = self._call("forward_backward", {
            "model_id": model_id, "data": encode_data(data), "loss_fn": loss_fn,
            "loss_fn_config": loss_fn_config, "forward_only": bool(forward_only)})
        return ForwardBackwardResult(loss_fn_outputs=result["loss_fn_outputs"],
                                     metrics={k: float(v) for k, v in result["metrics"].items()})

    def optim_step(self, model_id: str, params: AdamParams | DimuonParams) -> dict[str, float]:
        return self._call("optim_step", {"model_id": model_id, "params": params_to_json(params)})

    def save_state(self, model_id: str, directory: Path) -> None:
        self._call("save_state", {"model_id": model_id, "directory": str(Path(directory).resolve())})

    def load_state(self, model_id: str, directory: Path, with_optimizer: bool) -> None:
        self._call("load_state", {"model_id": model_id, "directory": str(Path(directory).resolve()),
                                  "with_optimizer": bool(with_optimizer)})

    def export_adapter(self, model_id: str, directory: Path) -> None:
        self._call("export_adapter", {"model_id": model_id, "directory": str(Path(directory).resolve())})

    def lora_spec(self, model_id: str) -> LoraSpec:
        return spec_from_json(self._call("lora_spec", {"model_id": model_id}))

    def has_adapter(self, model_id: str) -> bool:
        return bool(self._call("has_adapter", {"model_id": model_id}))

    def vocab_size(self) -> int:
        if self._vocab is None:  # the worker asks on every batch; the model does not change
            self._vocab = int(self._call("vocab_size"))
        return self._vocab

    def compute_logprobs(self, model_id: str | None, tokens: list[int]) -> np.ndarray:
        """Per-token logprobs of `tokens[1:]` under the adapter (None: the base model)."""
        return np.asarray(self._call("compute_logprobs", {"model_id": model_id, "tokens": [int(t) for t in tokens]}),
                          dtype=np.float32)

    def close(self) -> None:
        self._http.close()
