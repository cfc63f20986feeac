"""The trainer server: one process per rank (torchrun), rank 0 answers HTTP, all ranks train.

    $ torchrun --nproc-per-node 2 -m src.trainer_server --engine megatron --tp 2 --model /models/llama --port 8100
    $ torchrun --nproc-per-node 2 -m src.trainer_server --engine peft --model /models/tiny --port 8100   # CPU, gloo
    $ curl -s 127.0.0.1:8100/v1/health
    {"live": true, "engine": "megatron", "world_size": 2, "ops_done": 0, ...}

The worker reaches it through `MegatronTrainer` (USE_MEGATRON=true, MEGATRON_SERVER_URL).

How an operation runs: an HTTP thread on rank 0 decodes the request (JSON, arrays as base64,
see `megatron_backend.encode`) and queues it. One op thread takes operations in arrival order,
one at a time, broadcasts each to every rank over a gloo control group, runs it on its own
rank while the others run it too, then gathers every rank's outcome: all fine → 200 with rank
0's result; a `UserInputError` → 400 with its field; any other failure → 500 with the message.

Faults: every collective has a timeout (`--op-timeout-s`), and when idle rank 0 sends a
heartbeat every `--heartbeat-s`, so a dead or stuck rank is noticed within that time. When a
control collective fails, or torchrun sends SIGTERM because another rank died, rank 0 answers
the operation in flight and every queued one with 503 and the reason, reports `live: false`
on /v1/health for a moment, then exits non-zero. It never retries an operation.
"""

from __future__ import annotations

import argparse
import logging
import os
import queue
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from .backends import AdamParams, DimuonParams, ForwardBackwardResult, LoraSpec, UserInputError
from .megatron_backend import decode, decode_data, encode, params_from_json, spec_from_json, spec_to_json
from .ports import free_port

log = logging.getLogger("tink.trainer_server")

# ----------------------------------------------------------------------------- operations

# op name -> the engine method's argument names. Every op runs on every rank.
OPS: dict[str, tuple[str, ...]] = {
    "create_adapter": ("model_id", "spec"),
    "delete_adapter": ("model_id",),
    "forward_backward": ("model_id", "data", "loss_fn", "loss_fn_config", "forward_only"),
    "optim_step": ("model_id", "params"),
    "save_state": ("model_id", "directory"),
    "load_state": ("model_id", "directory", "with_optimizer"),
    "export_adapter": ("model_id", "directory"),
    "lora_spec": ("model_id",),
    "has_adapter": ("model_id",),
    "vocab_size": (),
    "compute_logprobs": ("model_id", "tokens"),
}


def decode_args(op: str, payload: dict[str, Any]) -> dict[str, Any]:
    """Turn a request body into the engine method's typed arguments (or raise UserInputError)."""
    if not isinstance(payload, dict):
        raise UserInputError("the request body must be a JSON object", "body")
    missing = [name for name in OPS[op] if name not in payload and name not in ("loss_fn_config",)]
    if missing:
        raise UserInputError(f"{op} needs {missing[0]}", missing[0])
    args = {name: payload.get(name) for name in OPS[op]}
    if "model_id" in args and not (args["model_id"] is None and op == "compute_logprobs"):
        if not isinstance(args["model_id"], str) or not args["model_id"]:
            raise UserInputError("model_id must be a non-empty string", "model_id")
    if "spec" in args:
        if not isinstance(args["spec"], dict):
            raise UserInputError("spec must be an object of LoraSpec fields", "spec")
        args["spec"] = spec_from_json(args["spec"])
    if "data" in args:
        args["data"] = decode_data(args["data"])
    if "params" in args:
        args["params"] = params_from_json(args["params"])
    if "directory" in args:
        directory = args["directory"]
        if not isinstance(directory, str) or not os.path.isabs(directory):
            raise UserInputError("directory must be an absolute path on the server's filesystem", "directory")
        args["directory"] = Path(directory)
    if "tokens" in args:
        if not isinstance(args["tokens"], list) or len(args["tokens"]) < 2:
            raise UserInputError("tokens must be a list of at least 2 token ids", "tokens")
        args["tokens"] = [int(t) for t in args["tokens"]]
    for flag in ("forward_only", "with_optimizer"):
        if flag in args:
            args[flag] = bool(args[flag])
    return args


def encode_result(value: Any) -> Any:
    if isinstance(value, ForwardBackwardResult):
        return {"loss_fn_outputs": encode(value.loss_fn_outputs), "metrics": encode(value.metrics)}
    if isinstance(value, LoraSpec):
        return spec_to_json(value)
    return encode(value)


def run_local(engine: Any, op: str, args: dict[str, Any]) -> tuple[tuple[str, str | None, str | None], Any]:
    """Run one op on this rank: ((kind, message, field), value) with kind ok | user | error."""
    try:
        return ("ok", None, None), getattr(engine, op)(**args)
    except UserInputError as exc:
        return ("user", str(exc), exc.field), None
    except Exception as exc:  # reported to the caller; the rank keeps serving
        log.exception("rank %d: %s failed", _rank(), op)
        return ("error", f"rank {_rank()}: {type(exc).__name__}: {exc}", None), None


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0


# ----------------------------------------------------------------------------- rank 0: queue and op thread


@dataclass
class Job:
    op: str
    args: dict[str, Any]
    done: threading.Event = field(default_factory=threading.Event)
    status: int = 0
    body: dict[str, Any] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def finish(self, status: int, body: dict[str, Any]) -> None:
        """The first answer wins (the op thread's result, or a failure from `Coordinator.fail`)."""
        with self._lock:
            if not self.done.is_set():
                self.status, self.body = status, body
                self.done.set()


class Coordinator:
    """Rank 0's side: a FIFO of operations and the thread that runs them on all ranks in lockstep."""

    def __init__(self, control_group, heartbeat_s: float):
        self.control = control_group
        self.heartbeat_s = heartbeat_s
        self.jobs: queue.Queue[Job] = queue.Queue()
        self.engine: Any = None
        self.info: dict[str, Any] = {"status": "loading"}
        self.current: Job | None = None
        self.ops_done = 0
        self.error: str | None = None
        self.last_heartbeat = time.time()
        self._lock = threading.Lock()

    # -- called from HTTP threads

    def submit(self, op: str, args: dict[str, Any]) -> Job:
        job = Job(op, args)
        with self._lock:
            if self.error is not None:
                job.finish(503, {"error": self.error})
            else:
                self.jobs.put(job)
        return job

    def health(self) -> tuple[int, dict[str, Any]]:
        live = self.error is None and self.engine is not None
        body = {**self.info, "live": live, "busy": self.current.op if self.current else None,
                "queued": self.jobs.qsize(), "ops_done": self.ops_done,
                "heartbeat_age_s": round(time.time() - self.last_heartbeat, 3)}
        if self.error is not None:
            body.update(status="down", error=self.error)
        return (200 if live else 503), body

    # -- failure: from the op thread or the SIGTERM handler

    def fail(self, reason: str) -> None:
        """Mark the server down and answer the in-flight and queued operations with 503 and `reason`."""
        with self._lock:
            if self.error is None:
                self.error = reason
                log.error("trainer server is going down: %s", reason)
            pending = [self.current] if self.current else []
            while not self.jobs.empty():
                pending.append(self.jobs.get_nowait())
        for job in pending:
            if job is not None:
                job.finish(503, {"error": f"{reason}; the operation did not complete. Restart the trainer "
                                          "server, then retry from the last saved state"})

    # -- the op thread

    def serve(self, build_engine) -> None:
        try:
            engine = build_engine()
            self.info = {"status": "ready", "engine": engine.name, "base_model": engine.base_model,
                         "world_size": _world_size(), "rank_pids": _rank_pids(self.control),
                         **getattr(engine, "describe", dict)()}
            self.engine = engine  # last: health says live only once everything above is in place
            log.info("trainer server ready: %s", self.info)
        except Exception as exc:
            log.exception("engine build failed")
            self.fail(f"the trainer engine could not be built: {type(exc).__name__}: {exc}")
            return
        while self.error is None:
            try:
                job = self.jobs.get(timeout=self.heartbeat_s)
            except queue.Empty:
                job = None
            with self._lock:  # so `fail` either sees this job as current or finds the server down here
                if self.error is not None:
                    if job is not None:
                        job.finish(503, {"error": self.error})
                    return
                self.current = job
            try:
                self._run(job)
            except Exception as exc:  # a control collective failed: a rank is dead or stuck
                self.fail(f"a trainer rank stopped answering ({type(exc).__name__}: {exc})")
                return
            finally:
                self.current = None

    def _run(self, job: Job | None) -> None:
        import torch.distributed as dist

        op, args = (job.op, job.args) if job else ("_heartbeat", {})
        dist.broadcast_object_list([op, args], src=0, group=self.control)
        started = time.time()
        outcome, value = run_local(self.engine, op, args) if job else (("ok", None, None), None)
        outcomes: list[Any] = [None] * _world_size()
        dist.all_gather_object(outcomes, outcome, group=self.control)
        self.last_heartbeat = time.time()
        if job is None:
            return
        self.ops_done += 1
        meta = {"seq": self.ops_done, "op": op, "started": started, "finished": time.time()}
        errors = [o for o in outcomes if o[0] == "error"]
        if errors:
            job.finish(500, {"error": errors[0][1], "op": meta})
        elif outcome[0] == "user":
            job.finish(400, {"error": outcome[1], "field": outcome[2], "op": meta})
        else:
            try:
                job.finish(200, {"result": encode_result(value), "op": meta})
            except Exception as exc:  # an engine returned something the wire cannot carry: a bug, not a dead rank
                log.exception("%s: result not encodable", op)
                job.finish(500, {"error": f"{op} returned an unencodable result: {exc}", "op": meta})


def _world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_initialized() else 1


def _rank_pids(control_group) -> list[int]:
    """Every rank's process id, in rank order (for operators, and for the fault tests)."""
    import torch.distributed as dist

    pids: list[Any] = [None] * _world_size()
    dist.all_gather_object(pids, os.getpid(), group=control_group)
    return pids


def follow(engine: Any, control_group) -> None:
    """Ranks > 0: run whatever rank 0 broadcasts, forever, in the same order."""
    import torch.distributed as dist

    _rank_pids(control_group)
    while True:
        message: list[Any] = [None, None]
        dist.broadcast_object_list(message, src=0, group=control_group)
        op, args = message
        outcome = run_local(engine, op, args)[0] if op != "_heartbeat" else ("ok", None, None)
        dist.all_gather_object([None] * dist.get_world_size(), outcome, group=control_group)


# ----------------------------------------------------------------------------- HTTP (rank 0)


def make_http_server(coordinator: Coordinator, host: str, port: int):
    """Rank 0's HTTP face: `POST /v1/<op>` for each `OPS` entry and `GET /v1/health`.

    The standard library's threading server, so a GPU node needs no web stack beyond Python:
    each request gets a thread that decodes it, queues it and waits for its answer.
    """
    import json
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _answer(self, status: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):  # noqa: N802 (http.server's naming)
            if self.path.rstrip("/") != "/v1/health":
                return self._answer(404, {"error": f"no GET {self.path}; try /v1/health", "field": "path"})
            self._answer(*coordinator.health())

        def do_POST(self):  # noqa: N802
            op = self.path.rstrip("/").removeprefix("/v1/")
            try:
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            except (OSError, ValueError) as exc:
                return self._answer(400, {"error": f"unreadable request body: {exc}", "field": "body"})
            if op not in OPS:
                return self._answer(404, {"error": f"unknown operation {op!r}; one of {sorted(OPS)}", "field": "op"})
            try:
                args = decode_args(op, decode(json.loads(raw or b"{}")))
            except UserInputError as exc:
                return self._answer(400, {"error": str(exc), "field": exc.field})
            except Exception as exc:  # malformed JSON or values
                return self._answer(400, {"error": f"malformed {op} request: {exc}", "field": "body"})
            job = coordinator.submit(op, args)
            job.done.wait()
            self._answer(job.status, job.body)

        def log_message(self, format, *args):  # one line per request, through logging
            log.debug("%s %s", self.address_string(), format % args)

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    return server


# ----------------------------------------------------------------------------- engines


def _merge_metrics(parts: list[tuple[int, dict[str, float]]]) -> dict[str, float]:
    """Combine per-rank batch metrics named `name:reduction` (sum, mean, max, min)."""
    merged: dict[str, float] = {}
    total = sum(n for n, _ in parts)
    for key in {k for _, m in parts for k in m}:
        values = [(n, m[key]) for n, m in parts if key in m]
        reduction = key.rsplit(":", 1)[-1]
        if reduction == "sum":
            merged[key] = float(sum(v for _, v in values))
        elif reduction == "max":
            merged[key] = float(max(v for _, v in values))
        elif reduction == "min":
            merged[key] = float(min(v for _, v in values))
        else:  # mean, and anything unnamed: weighted by the datums each rank ran
            merged[key] = float(sum(n * v for n, v in values) / max(1, sum(n for n, _ in values) or total))
    return merged


class PeftDPEngine:
    """The HF PEFT trainer (`src/hf_trainer.py`) as a data-parallel engine: one full replica per rank.

    Guarantees, with W ranks: a batch is split into W contiguous slices, each rank runs its
    slice, outputs come back in the batch's order; gradients stay local until `optim_step`,
    which sums them over ranks (the losses are sums over datums, so this is the full batch's
    gradient) and then steps identically everywhere. New and loaded adapters are broadcast
    from rank 0 so the replicas start equal even without a seed. Files are written by rank 0
    only; every rank reads `load_state`'s folder (a shared filesystem).
    """

    name = "peft"

    def __init__(self, base_model: str, device: str = "auto", dtype: str = "auto", max_adapters: int = 64):
        import torch.distributed as dist

        from .hf_trainer import HFTrainer

        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.objects = dist.new_group(backend="gloo")  # python objects stay on CPU whatever the device
        self.trainer = HFTrainer(base_model, device=device, dtype=dtype, max_adapters=max_adapters)
        self.base_model = base_model

    def describe(self) -> dict[str, Any]:
        return {"data_parallel": self.world, "tensor_parallel": 1}

    def _params(self, model_id: str) -> list:
        return list(self.trainer.adapter_parameters(model_id))

    def _sync_from_rank0(self, model_id: str) -> None:
        import torch.distributed as dist

        for p in self._params(model_id):
            dist.broadcast(p.data, src=0)

    def create_adapter(self, model_id: str, spec: LoraSpec) -> None:
        self.trainer.create_adapter(model_id, spec)
        self._sync_from_rank0(model_id)

    def delete_adapter(self, model_id: str) -> None:
        self.trainer.delete_adapter(model_id)

    def forward_backward(self, model_id, data, loss_fn, loss_fn_config, forward_only) -> ForwardBackwardResult:
        import torch.distributed as dist

        from .megatron_engine import validate_batch

        if not self.trainer.has_adapter(model_id):
            raise UserInputError(f"unknown model_id {model_id!r}", "model_id")
        # The whole batch on every rank: a bad datum is refused everywhere, named by its batch index.
        validate_batch(data, loss_fn, loss_fn_config, self.trainer.vocab_size())
        bounds = [len(data) * r // self.world for r in range(self.world + 1)]
        mine = data[bounds[self.rank]:bounds[self.rank + 1]]
        outcome: tuple[str, Any] = ("ok", None)
        if mine:
            try:
                result = self.trainer.forward_backward(model_id, mine, loss_fn, loss_fn_config, forward_only)
                outcome = ("ok", (len(mine), result.loss_fn_outputs, result.metrics))
            except UserInputError as exc:  # shared so every rank raises it, not only the one that saw it
                outcome = ("user", (str(exc), exc.field))
        gathered: list[Any] = [None] * self.world
        dist.all_gather_object(gathered, outcome, group=self.objects)
        for kind, payload in gathered:
            if kind == "user":
                raise UserInputError(*payload)
        parts = [payload for _, payload in gathered if payload is not None]
        outputs = [out for _, outs, _ in parts for out in outs]
        return ForwardBackwardResult(loss_fn_outputs=outputs, metrics=_merge_metrics([(n, m) for n, _, m in parts]))

    def optim_step(self, model_id: str, params: AdamParams | DimuonParams) -> dict[str, float]:
        import torch
        import torch.distributed as dist

        if not self.trainer.has_adapter(model_id):
            raise UserInputError(f"unknown model_id {model_id!r}", "model_id")
        if self.world > 1:
            grads = []
            for p in self._params(model_id):
                if p.grad is None:  # this rank ran no datum since the last step
                    p.grad = torch.zeros_like(p)
                grads.append(p.grad)
            flat = torch.cat([g.reshape(-1).float() for g in grads])
            dist.all_reduce(flat)
            offset = 0
            for g in grads:
                g.copy_(flat[offset:offset + g.numel()].view_as(g))
                offset += g.numel()
        return self.trainer.optim_step(model_id, params)

    def save_state(self, model_id: str, directory: Path) -> None:
        if self.rank == 0:
            self.trainer.save_state(model_id, directory)

    def export_adapter(self, model_id: str, directory: Path) -> None:
        if self.rank == 0:
            self.trainer.export_adapter(model_id, directory)

    def load_state(self, model_id: str, directory: Path, with_optimizer: bool) -> None:
        self.trainer.load_state(model_id, directory, with_optimizer)
        self._sync_from_rank0(model_id)

    def lora_spec(self, model_id: str) -> LoraSpec:
        return self.trainer.lora_spec(model_id)

    def has_adapter(self, model_id: str) -> bool:
        return self.trainer.has_adapter(model_id)

    def vocab_size(self) -> int:
        return self.trainer.vocab_size()

    def compute_logprobs(self, model_id: str | None, tokens: list[int]):
        return self.trainer.compute_logprobs(model_id, tokens) if self.rank == 0 else None


def build_engine(args: argparse.Namespace):
    if args.engine == "peft":
        return PeftDPEngine(args.model, device=args.device, dtype=args.dtype, max_adapters=args.max_adapters)
    if args.engine == "megatron":
        from .megatron_engine import MegatronEngine

        return MegatronEngine(args.model, tp=args.tp, dtype=args.dtype, device=args.device,
                              max_adapters=args.max_adapters, tokens_per_microbatch=args.tokens_per_microbatch)
    raise SystemExit(f"unknown --engine {args.engine!r}: use peft or megatron")


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Tink trainer server (start with torchrun).")
    p.add_argument("--engine", choices=["peft", "megatron"], default="megatron")
    p.add_argument("--model", required=True, help="Hugging Face checkpoint folder of the base model")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8100)
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size (megatron); the rest is data parallel")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--max-adapters", type=int, default=64)
    p.add_argument("--tokens-per-microbatch", type=int, default=16384,
                   help="megatron: padded tokens per forward/backward pass; larger batches run in several")
    p.add_argument("--op-timeout-s", type=float, default=900.0, help="the longest one operation may take")
    p.add_argument("--heartbeat-s", type=float, default=5.0, help="idle liveness check of all ranks")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads per rank (0: leave torch's default)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    import torch
    import torch.distributed as dist

    args = parse_args(argv)
    # Megatron's tensor-parallel backward overlaps its all-reduce with compute only in issue order
    # when CUDA has one hardware queue; it must be set before the first CUDA call.
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s rank{os.environ.get('RANK', '0')} %(levelname)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    timeout = timedelta(seconds=args.op_timeout_s)
    use_cuda = torch.cuda.is_available() and args.device != "cpu"
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if "RANK" not in os.environ:  # plain `python -m src.trainer_server`: a world of one
        os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    dist.init_process_group("cpu:gloo,cuda:nccl" if use_cuda else "gloo", timeout=timeout)
    # Operations travel on their own gloo group: objects on CPU, whatever the engine's backend.
    control = dist.new_group(backend="gloo", timeout=timeout)

    if dist.get_rank() != 0:
        engine = build_engine(args)
        try:
            follow(engine, control)
        except Exception as exc:
            log.error("rank %d lost rank 0 (%s: %s); exiting", dist.get_rank(), type(exc).__name__, exc)
            os._exit(1)
        return

    coordinator = Coordinator(control, args.heartbeat_s)
    http = make_http_server(coordinator, args.host, args.port)
    threading.Thread(target=http.serve_forever, daemon=True, name="http").start()
    ops = threading.Thread(target=coordinator.serve, args=(lambda: build_engine(args),), daemon=True, name="ops")
    ops.start()

    def on_sigterm(signum, frame):
        coordinator.fail(f"the trainer server got signal {signum} (torchrun stops every rank when one dies)")

    signal.signal(signal.SIGTERM, on_sigterm)
    signal.signal(signal.SIGINT, on_sigterm)
    # The main thread only supervises, so signals are handled even while a collective blocks the op thread.
    while coordinator.error is None:
        time.sleep(0.2)
    time.sleep(1.5)  # let the HTTP threads send the 503 answers and a `live: false` health
    http.server_close()
    sys.stdout.flush()
    os._exit(1)


if __name__ == "__main__":
    main()
