"""Command line: `python -m src serve | build-model | demo`.

    python -m src serve                      # the worker, configured from env / .env
    python -m src build-model ~/tiny         # write the tiny default model folder
    python -m src demo                       # start a worker and run the RL demo against it
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time

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


def serve(config=None) -> None:
    """Run the worker under waitress until SIGINT/SIGTERM, then drain and exit 0.

    On the signal the worker stops accepting connections, runs queued work for up to
    TINK_SHUTDOWN_GRACE_S (what is left fails with a reason the client reads), keeps answering
    the connections already open meanwhile (so long-polls get their results), then exits.
    """
    from .app import create_app
    from .config import Config

    config = config or Config.from_env()
    app = create_app(config)
    worker = app.extensions["tink.worker"]
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="tink", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("serve", help="run the worker (configured by env vars / .env)")
    build = sub.add_parser("build-model", help="build the tiny local model folder")
    build.add_argument("path")
    build.add_argument("--family", default="llama", choices=["llama", "qwen2", "qwen3"])
    demo = sub.add_parser("demo", help="start a worker on the tiny model and run the RL demo")
    demo.add_argument("--steps", type=int, default=30)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    if args.command == "serve":
        serve()
    elif args.command == "build-model":
        from .tiny_model import ensure_tiny_model

        print(ensure_tiny_model(args.path, args.family))
    elif args.command == "demo":
        from .demo import main as demo_main

        sys.exit(demo_main(steps=args.steps))


if __name__ == "__main__":
    main()
