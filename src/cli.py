"""Command line: `tink serve | demo | build-model | export | bench` (also `python -m src ...`).

    tink serve                                   # the worker, configured from env / .env (CONFIGURATION.md)
    tink demo                                    # start a worker on the tiny model, run the RL demo against it
    tink build-model ~/tiny                      # write the tiny default model folder
    tink export tinker://<id>/sampler_weights/<name> ./merged   # adapter merged into the base, HF format
    tink bench                                   # train and sample throughput through the API

`tink <command> --help` explains every option. Long work shows a progress bar on stderr when it
is a terminal.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from waitress import wasyncore

# Each tinker SDK client keeps about five keep-alive connections (one per pool: session, train,
# sample, retrieve, telemetry). waitress's default limit of 100 open connections would cap a worker
# at ~20 clients and stall everyone else's connects for seconds, so allow several per thread.
CONNECTIONS_PER_THREAD = 8


def make_server(app, config):
    """The waitress server `serve` runs, sized from the config (tests build theirs with it too)."""
    from waitress.server import create_server

    return create_server(app, host=config.host, port=config.port, threads=config.threads,
                         connection_limit=max(100, CONNECTIONS_PER_THREAD * config.threads),
                         channel_timeout=max(60, int(config.retrieve_wait_s) * 3))


@contextlib.contextmanager
def progress(desc: str, steps: Sequence[str]) -> Iterator[Callable[[str], None]]:
    """A bar over named steps on stderr, drawn only when stderr is a terminal; yields `step(name)`,
    to be called as each step begins."""
    from tqdm import tqdm

    bar = tqdm(total=len(steps), desc=desc, unit="step", disable=not sys.stderr.isatty(), leave=False,
               bar_format="{desc}: {n_fmt}/{total_fmt} {bar} {postfix} [{elapsed}]")
    begun = 0

    def step(name: str) -> None:
        nonlocal begun
        if begun:
            bar.update(1)
        begun += 1
        bar.set_postfix_str(name)

    try:
        yield step
        bar.update(bar.total - bar.n)
    finally:
        bar.close()


SERVE_STEPS = ("base model", "trainer and sampler", "HTTP server")


def serve(config=None) -> None:
    """Run the worker under waitress until SIGINT/SIGTERM, then drain and exit 0.

    On the signal the worker stops accepting connections, runs queued work for up to
    TINK_SHUTDOWN_GRACE_S (what is left fails with a reason the client reads), keeps answering
    the connections already open meanwhile (so long-polls get their results), then exits.
    """
    from .app import create_app
    from .config import Config
    from .worker import Worker

    config = config or Config.from_env()
    with progress("starting the worker", SERVE_STEPS) as step:
        step(SERVE_STEPS[0])
        config.resolved_base_model()  # builds the embedded tiny model on first use
        step(SERVE_STEPS[1])
        worker = Worker.from_config(config)
        step(SERVE_STEPS[2])
        app = create_app(config, worker)
        server = make_server(app, config)
    health = worker.health()
    logging.getLogger("tink").info("Tink worker on http://%s:%s serving %s (trainer=%s, sampler=%s, status=%s)%s",
                                   config.host, server.effective_port, worker.base_model, worker.trainer.name,
                                   health["sampler"].get("active", worker.sampler.name), health["status"],
                                   "".join(f"\n  degraded: {reason}" for reason in health["reasons"]))
    gpu = health["memory"].get("gpu")
    if gpu:
        logging.getLogger("tink").info("GPU memory at start: %.1f of %.1f GiB free (%s)", gpu["free_gib"],
                                       gpu["total_gib"], gpu["device"])
    print(f"TINK_READY http://{config.host}:{server.effective_port}", flush=True)

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    signal.signal(signal.SIGINT, lambda signum, frame: stop.set())
    try:
        while not stop.is_set():
            _poll(server)
        logging.getLogger("tink").info("stopping: finishing queued work for up to %.0fs", config.shutdown_grace_s)
        # Close only the listening socket: open connections keep being served while the queue drains.
        # (waitress's own close() would also close the loop's wake-up pipe under requests in flight.)
        wasyncore.dispatcher.close(server)
        drain = threading.Thread(target=worker.scheduler.shutdown, args=(config.shutdown_grace_s,),
                                 name="tink-drain")
        drain.start()
        while drain.is_alive():
            _poll(server)
        deadline = time.monotonic() + ANSWER_IN_FLIGHT_S
        while _busy(server) and time.monotonic() < deadline:
            _poll(server)
    finally:
        server.close()
        server.task_dispatcher.shutdown(timeout=1)
        worker.close()


# After the queue drained: how long requests still being served may take to get their answers out.
ANSWER_IN_FLIGHT_S = 2.0


def _poll(server) -> None:
    """One turn of waitress's event loop (a signal interrupts it within the timeout)."""
    wasyncore.loop(timeout=0.2, map=server._map, use_poll=server.adj.asyncore_use_poll, count=1)


def _busy(server) -> bool:
    """Whether a request is queued or being served, or an answer is not fully sent yet."""
    tasks = server.task_dispatcher
    return bool(tasks.queue) or tasks.active_count > 0 or any(
        getattr(channel, "total_outbufs_len", 0) for channel in list(server._map.values()))


# ---------------------------------------------------------------------- the parser


def build_parser() -> argparse.ArgumentParser:
    """The `tink` parser (the docs test parses every documented command with it)."""
    from .bench import BenchShape
    from .export import DTYPES

    parser = argparse.ArgumentParser(
        prog="tink", description="Tink: a self-hosted worker for the Tinker API (LoRA training and sampling).",
        epilog="Every setting of the worker is an env var (or a line of .env): see CONFIGURATION.md.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve_cmd = sub.add_parser(
        "serve", help="run the worker (configured by env vars / .env)",
        description="Run the worker until SIGINT/SIGTERM; then it finishes queued work (TINK_SHUTDOWN_GRACE_S), "
                    "saves every loaded model and exits 0. Prints `TINK_READY <url>` once it serves. Options "
                    "override the env var named in their help; every other setting is in CONFIGURATION.md.")
    serve_cmd.add_argument("--host", help="address to bind (TINK_HOST; default 127.0.0.1)")
    serve_cmd.add_argument("--port", type=int, help="HTTP port (TINK_PORT; default 8000)")
    serve_cmd.add_argument("--base-model", help="model folder or hub id to train and sample, or `tiny` for the "
                                                "embedded model (TINK_BASE_MODEL; default tiny)")
    serve_cmd.add_argument("--state-dir", type=Path, help="folder of the database and checkpoints "
                                                          "(TINK_STATE_DIR; default ~/.cache/tink/state)")

    demo = sub.add_parser(
        "demo", help="start a worker on the tiny model and run the RL demo against it",
        description="A GRPO-style loop with the tinker SDK (8 prompts x 8 samples a step, reward = how often "
                    "the completion says ' yes'). Starts its own worker on TINK_BASE_MODEL (default: the tiny "
                    "model) unless TINKER_BASE_URL names a running one. Exits 0 if the reward rose.")
    demo.add_argument("--steps", type=int, default=30, help="RL steps to run (default 30; the reward rises "
                                                            "within about 10 on the tiny model)")
    demo.add_argument("--seed", type=int, default=0, help="seeds the adapter and every sampling request (default 0)")

    build = sub.add_parser(
        "build-model", help="build the tiny local model folder",
        description="Write the embedded default model (random-init, 2 layers, head_dim 64, a BPE tokenizer "
                    "trained locally) as a Hugging Face folder; nothing is downloaded. Prints its path. "
                    "Does nothing if a complete model is already there.")
    build.add_argument("path", type=Path, help="folder to write (e.g. ~/.cache/tink/models/tiny-llama, where "
                                               "TINK_BASE_MODEL=tiny looks)")
    build.add_argument("--family", default="llama", choices=["llama", "qwen2", "qwen3"],
                       help="architecture of the model (default llama)")
    build.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    build.add_argument("--tied", action="store_true", help="share lm_head with the input embeddings, as "
                                                           "Qwen2.5-0.5B and Qwen3-0.6B do")

    export = sub.add_parser(
        "export", help="merge a checkpoint into its base model, as a standalone HF model folder",
        description="Merge a LoRA checkpoint into the base weights (PEFT merge_and_unload) and write a folder "
                    "that transformers and `vllm serve` load as is: config, safetensors weights, tokenizer; "
                    "no adapter files. Runs on the CPU; the worker need not be running.")
    export.add_argument("source", help="a tinker://<model_id>/<weights|sampler_weights|external_weights>/<name> "
                                       "path of the worker whose state is in --state-dir, or a PEFT adapter "
                                       "folder (e.g. from `tinker checkpoint download`)")
    export.add_argument("out", type=Path, help="folder to write (must not exist or be empty, unless --overwrite)")
    export.add_argument("--state-dir", type=Path, help="the worker's state folder (TINK_STATE_DIR; default "
                                                       "~/.cache/tink/state)")
    export.add_argument("--base-model", help="base model folder or hub id (default: the one the checkpoint "
                                             "was trained on)")
    export.add_argument("--dtype", default="auto", choices=DTYPES,
                        help="dtype of the saved weights (default auto: the base model's)")
    export.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")

    default = BenchShape()
    bench = sub.add_parser(
        "bench", help="measure a worker's training and sampling throughput through the API",
        description="Train (forward_backward + optim_step) and sample through the tinker SDK, as a client "
                    "does, and print tokens/s and the median time of a step. Starts its own worker on "
                    "TINK_BASE_MODEL (default: the tiny model) unless --url names one. "
                    "bench/bench_sampling.py measures the vLLM sampler alone against direct vLLM.")
    bench.add_argument("--url", help="a running worker (default: TINKER_BASE_URL, else start one)")
    bench.add_argument("--api-key", help="its API key (default: TINKER_API_KEY, else tml-tink-bench)")
    bench.add_argument("--rounds", type=int, default=default.rounds,
                       help=f"timed training steps, and timed sampling rounds (default {default.rounds})")
    bench.add_argument("--batch", type=int, default=default.batch,
                       help=f"datums per forward_backward (default {default.batch})")
    bench.add_argument("--seq-len", type=int, default=default.seq_len,
                       help=f"tokens per datum (default {default.seq_len})")
    bench.add_argument("--prompts", type=int, default=default.prompts,
                       help=f"sample requests sent together per round (default {default.prompts})")
    bench.add_argument("--samples", type=int, default=default.samples,
                       help=f"completions per sample request (default {default.samples})")
    bench.add_argument("--max-tokens", type=int, default=default.max_tokens,
                       help=f"tokens per completion (default {default.max_tokens})")
    bench.add_argument("--rank", type=int, default=default.rank, help=f"LoRA rank (default {default.rank})")
    bench.add_argument("--seed", type=int, default=default.seed,
                       help=f"seed of the adapter and the random tokens (default {default.seed})")
    return parser


# ---------------------------------------------------------------------- the commands


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "serve":
        serve(_serve_config(args))
    elif args.command == "build-model":
        from .tiny_model import ensure_tiny_model

        print(ensure_tiny_model(args.path, args.family, args.seed, args.tied))
    elif args.command == "demo":
        from .demo import main as demo_main

        sys.exit(demo_main(steps=args.steps, seed=args.seed))
    elif args.command == "export":
        sys.exit(_export(args))
    elif args.command == "bench":
        sys.exit(_bench(args))


def _serve_config(args: argparse.Namespace):
    from .config import Config

    config = Config.from_env()
    overrides = {"host": args.host, "port": args.port, "base_model": args.base_model, "state_dir": args.state_dir}
    config = dataclasses.replace(config, **{k: v for k, v in overrides.items() if v is not None})
    config.validate()
    return config


def _export(args: argparse.Namespace) -> int:
    from .backends import UserInputError
    from .config import Config
    from .export import STEPS, local_source, merge_adapter

    state_dir = args.state_dir or Config.from_env().state_dir
    try:
        source = local_source(args.source, state_dir.expanduser(), args.base_model)
        with progress("export", STEPS) as step:
            size = merge_adapter(source, args.out.expanduser().resolve(), args.dtype, args.overwrite, step)
    except UserInputError as exc:
        print(f"tink export: {exc}", file=sys.stderr)
        return 2
    logging.getLogger("tink").info("merged %s into %s: %.1f MB", source.adapter_dir, source.base_model, size / 1e6)
    print(args.out.expanduser().resolve())
    return 0


def _bench(args: argparse.Namespace) -> int:
    import os

    from .bench import BenchShape, run_bench
    from .demo import start_worker

    shape = BenchShape(rounds=args.rounds, batch=args.batch, seq_len=args.seq_len, prompts=args.prompts,
                       samples=args.samples, max_tokens=args.max_tokens, rank=args.rank, seed=args.seed)
    os.environ.setdefault("TINKER_TELEMETRY", "0")
    api_key = args.api_key or os.environ.get("TINKER_API_KEY", "tml-tink-bench")  # the SDK wants the tml- prefix
    url, proc = args.url or os.environ.get("TINKER_BASE_URL"), None
    with contextlib.ExitStack() as cleanup:
        if not url:
            import tempfile

            state = Path(cleanup.enter_context(tempfile.TemporaryDirectory(prefix="tink-bench-")))
            with progress("starting a worker", ["worker"]) as step:
                step("worker")
                proc, url = start_worker(state, api_key)
            cleanup.callback(lambda: (proc.terminate(), proc.wait(60)))
        from tqdm import tqdm

        with tqdm(total=2 * shape.rounds, desc="bench", unit="round", disable=not sys.stderr.isatty(),
                  leave=False) as bar:
            result = run_bench(url, api_key, shape, lambda phase: (bar.set_postfix_str(phase), bar.update(1)))
    print(f"worker  : {url}")
    print(f"shape   : {shape.rounds} rounds; train {shape.batch} x {shape.seq_len} tokens; sample {shape.prompts} "
          f"prompts x {shape.samples} x {shape.max_tokens} tokens; LoRA rank {shape.rank}")
    print("\n".join(result.lines()))
    return 0


if __name__ == "__main__":
    main()
