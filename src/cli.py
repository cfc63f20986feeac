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


def serve(config=None) -> None:
    """Run the worker under waitress until SIGINT/SIGTERM, then drain and exit 0."""
    from waitress.server import create_server

    from .app import create_app
    from .config import Config

    config = config or Config.from_env()
    app = create_app(config)
    worker = app.extensions["tink.worker"]
    server = create_server(app, host=config.host, port=config.port, threads=config.threads,
                           channel_timeout=max(60, int(config.retrieve_wait_s) * 3))
    logging.getLogger("tink").info("Tink worker on http://%s:%s serving %s (trainer=%s, sampler=%s)",
                                   config.host, server.effective_port, worker.base_model,
                                   worker.trainer.name, worker.sampler.name)
    print(f"TINK_READY http://{config.host}:{server.effective_port}", flush=True)

    def stop(signum, frame):
        server.close()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        server.run()
    except (OSError, ValueError):  # closed from the signal handler
        pass
    finally:
        worker.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="tink", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("serve", help="run the worker (configured by env vars / .env)")
    build = sub.add_parser("build-model", help="build the tiny local model folder")
    build.add_argument("path")
    build.add_argument("--family", default="llama", choices=["llama", "qwen2"])
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
