"""What the HTTP path adds to sampling: the Tinker SDK -> waitress -> worker -> sampler and back, with a sampler
that answers at once.

Item 1 of the throughput issue measures sampling through the SDK against `LLM.generate`. The engine's part is
`bench/bench_sampling.py`; this is the rest. A real worker (Flask behind waitress on loopback, real store and
scheduler) serves the tiny model, but its sampler is replaced by one that returns ready-made results of the
requested shape (random tokens, their logprobs) without computing anything. Every `sample` of a batch is sent at
once from one sampling client, as an RL loop does, and the batch's wall time is what the HTTP path costs it:
requests of one batch end together, so their results are encoded, sent and decoded after the engine's last
step, on top of it.

    .venv/bin/python bench/bench_http_sampling.py                     # 64 prompts x 8 x 256, the issue's batch
    .venv/bin/python bench/bench_http_sampling.py --prompts 8 --n 4 --max-tokens 32 --reps 1

The worker runs in its own process (as in use: the SDK must not share its GIL). Prints, for each HTTP
transport the worker's client config can give the SDK (`use_pyqwest_transport`: the Rust-based pyqwest, or
httpx's own, Tink's choice: src/api/service.py says why), the batch's seconds through the SDK (best of
--reps), and what the SDK would reach at a few engine speeds: engine seconds / (engine seconds + HTTP
seconds).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_sampling's py-spy helper

from src.backends import SampledSequence, SampleJob, SampleResult  # noqa: E402
from src.ports import free_port  # noqa: E402

API_KEY = "tml-tink-bench-key"


class InstantSampler:
    """Answers each job with `num_samples` ready-made sequences of `max_tokens` tokens (the same content every
    time: building them would be the engine's work, which this bench leaves out).

    With `engine_s` > 0 it answers as a batched engine does instead: every job that arrives while others are in
    flight ends together, `engine_s` after the first of them arrived. Then a batch's seconds through the SDK
    minus `engine_s` is what the HTTP path adds to a pass whose results all wait on its last step (the long-poll
    and result transfer after a real wait, not only after an instant answer)."""

    name = "instant"

    def __init__(self, inner, vocab: int, engine_s: float = 0.0):
        self._inner, self._vocab, self._made = inner, vocab, {}
        self._engine_s, self._lock, self._in_flight, self._ends_at = engine_s, threading.Lock(), 0, 0.0

    def __getattr__(self, name):  # health(), close(), adapters: the real sampler's
        return getattr(self._inner, name)

    def _sequence(self, length: int, index: int) -> SampledSequence:
        key = (length, index)
        if key not in self._made:
            rng = np.random.default_rng(index)
            self._made[key] = (rng.integers(3, self._vocab, length).tolist(),
                               rng.uniform(-6.0, 0.0, length).astype(np.float32).tolist())
        tokens, logprobs = self._made[key]
        return SampledSequence(list(tokens), list(logprobs), "length")

    def sample(self, job: SampleJob, sink=None) -> SampleResult:
        if self._engine_s > 0:
            with self._lock:
                if self._in_flight == 0:  # the first of a batch starts the engine's clock
                    self._ends_at = time.monotonic() + self._engine_s
                self._in_flight += 1
            try:
                time.sleep(max(0.0, self._ends_at - time.monotonic()))
            finally:
                with self._lock:
                    self._in_flight -= 1
        return SampleResult([self._sequence(job.params.max_tokens, i) for i in range(job.num_samples)],
                            served_by=self.name)


def serve(root: Path, port: int, transport: str, engine_s: float) -> None:
    """The worker process: the tiny model's worker with its sampler replaced, on `port`, until killed; it tells
    the SDK to use `transport` (the client config's `use_pyqwest_transport`)."""
    from src.api.service import CLIENT_CONFIG
    from src.app import create_app
    from src.cli import make_server
    from src.config import Config
    from src.tiny_model import ensure_tiny_model
    from src.worker import Worker

    model = ensure_tiny_model(root / "tiny")
    # As many samples at once as a vLLM worker runs (TINK_SAMPLING_THREADS' vLLM default), not HF's 16
    config = Config(base_model=str(model), state_dir=root / "state", api_keys=(API_KEY,), port=port,
                    sampling_threads=256)
    worker = Worker.from_config(config)
    worker.sampler = InstantSampler(worker.sampler, vocab=500, engine_s=engine_s)
    CLIENT_CONFIG["use_pyqwest_transport"] = transport == "pyqwest"
    make_server(create_app(config, worker), config).run()


def start_worker(root: Path, port: int, transport: str, engine_s: float) -> subprocess.Popen:
    """This script in `--serve` mode, in its own process (the client's SDK must not share the worker's GIL)."""
    worker = subprocess.Popen([sys.executable, __file__, "--serve", str(port), "--root", str(root),
                               "--transports", transport, "--engine-s", str(engine_s)],
                              stdout=subprocess.DEVNULL, stderr=open(root / "worker.log", "w"))
    deadline = time.time() + 300
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/healthz", timeout=2) as response:
                if response.status == 200:
                    return worker
        except OSError:
            assert worker.poll() is None, f"the worker exited: {(root / 'worker.log').read_text()[-2000:]}"
            time.sleep(0.5)
    raise TimeoutError("the worker did not answer /healthz within 300 s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--n", type=int, default=8, help="samples per prompt")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--pyspy", default=None,
                        help="py-spy raw profiles of --reps more batches per transport: FILE.<transport> (this "
                             "process, the client) and FILE.<transport>.worker (the worker)")
    parser.add_argument("--transports", default="pyqwest,httpx",
                        help="the SDK's HTTP transports to compare (the worker's client config picks one: "
                             "pyqwest, or httpx's own, Tink's)")
    parser.add_argument("--engine-s", type=float, default=0.0,
                        help="the stand-in sampler ends each batch this long after its first request arrived, as a "
                             "batched engine would (0: it answers at once)")
    parser.add_argument("--serve", type=int, default=None, help=argparse.SUPPRESS)  # the worker process's port
    parser.add_argument("--root", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(Path(args.root), args.serve, args.transports, args.engine_s)
        return
    tokens = args.prompts * args.n * args.max_tokens
    print(f"batch: {args.prompts} prompts x {args.n} samples x {args.max_tokens} tokens = {tokens:,} tokens, with logprobs")
    for transport in args.transports.split(","):
        sdk_s = batch_seconds(args, transport)
        if args.engine_s > 0:
            print(f"SDK transport {transport:>8}: {sdk_s:.3f} s a batch (best of {args.reps}) whose engine takes "
                  f"{args.engine_s:.2f} s: the HTTP path adds {sdk_s - args.engine_s:.3f} s, the SDK reaches "
                  f"{args.engine_s / sdk_s:.3f}x of the engine")
            continue
        print(f"SDK transport {transport:>8}: {sdk_s:.3f} s a batch (best of {args.reps}), the sampler answering at once;"
              f" alone, the HTTP path would carry {tokens / sdk_s:,.0f} tokens/s")
        for engine_tok_s in (20_000, 40_000, 60_000):
            engine_s = tokens / engine_tok_s
            print(f"  an engine at {engine_tok_s:>6,} tok/s ({engine_s:.2f} s): through the SDK "
                  f"{engine_s / (engine_s + sdk_s):.3f}x of itself, if none of it overlapped the engine's work")


def batch_seconds(args, transport: str) -> float:
    """The best of --reps batches through the SDK against a fresh worker telling the SDK to use `transport`."""
    import tinker
    from tinker import types

    tokens = args.prompts * args.n * args.max_tokens
    with tempfile.TemporaryDirectory() as root:
        port = free_port()
        worker = start_worker(Path(root), port, transport, args.engine_s)
        try:
            client = tinker.ServiceClient(base_url=f"http://127.0.0.1:{port}", api_key=API_KEY)
            sampler = client.create_sampling_client(base_model=str(Path(root) / "tiny")).result()
            prompts = [types.ModelInput.from_ints([1] + [(17 * i + 5 * j) % 400 + 3 for j in range(args.prompt_len - 1)])
                       for i in range(args.prompts)]
            params = types.SamplingParams(max_tokens=args.max_tokens, temperature=1.0)

            def through_sdk() -> float:
                start = time.perf_counter()
                futures = [sampler.sample(p, args.n, params) for p in prompts]
                got = sum(len(s.tokens) for f in futures for s in f.result().sequences)
                assert got == tokens, f"{got} tokens came back, {tokens} expected"
                return time.perf_counter() - start

            through_sdk()  # warm: connections, the session, the sampler's ready-made sequences
            sdk_s = min(through_sdk() for _ in range(args.reps))
            if args.pyspy:
                from bench_sampling import py_spy

                with py_spy(f"{args.pyspy}.{transport}"), py_spy(f"{args.pyspy}.{transport}.worker", worker.pid):
                    for _ in range(args.reps):
                        through_sdk()
            client.close("success").result()
        finally:
            worker.terminate()
            worker.wait(30)
    return sdk_s


if __name__ == "__main__":
    main()
