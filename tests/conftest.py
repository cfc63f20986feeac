"""Shared fixtures: the tiny model (built once per session) and a real Tink server on loopback."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from src.ports import free_port  # noqa: F401  # the tests import it from here
from src.tiny_model import ensure_tiny_model

REPO = Path(__file__).resolve().parents[1]
API_KEY = "tml-tink-test-key"
OTHER_KEY = "tml-tink-other-key"  # a second user: must never see the first one's models
ADMIN_KEY = "tml-tink-admin-key"

os.environ.setdefault("TINKER_TELEMETRY", "0")


def gpu_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


def pytest_collection_modifyitems(config, items):
    if gpu_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run on the device machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory) -> Path:
    return ensure_tiny_model(tmp_path_factory.getbasetemp() / "models" / "tiny-llama")


@dataclass
class RunningServer:
    url: str
    worker: object
    state_dir: Path


@contextlib.contextmanager
def serving(app, config) -> Iterator[str]:
    """Serve `app` in this process as `python -m src serve` does (same waitress sizing); yields its URL."""
    from src.cli import make_server

    wsgi = make_server(app, config)
    threading.Thread(target=wsgi.run, daemon=True).start()
    url = f"http://127.0.0.1:{config.port}"
    try:
        _wait_ready(url)
        yield url
    finally:
        wsgi.close()


@pytest.fixture(scope="session")
def server(tiny_model_path, tmp_path_factory) -> Iterator[RunningServer]:
    """A real worker behind waitress on a free loopback port, shared by the session's tests."""
    from src.app import create_app
    from src.config import Config
    from src.worker import Worker

    state = tmp_path_factory.mktemp("state")
    # One worker serves every test file's runs, most of them made with API_KEY: room for all of them.
    config = Config(base_model=str(tiny_model_path), state_dir=state, api_keys=(API_KEY, OTHER_KEY),
                    admin_keys=(ADMIN_KEY,), port=free_port(), retrieve_wait_s=5.0, threads=32,
                    max_adapters=512, max_adapters_per_key=256)
    worker = Worker.from_config(config)
    with serving(create_app(config, worker), config) as url:
        yield RunningServer(url=url, worker=worker, state_dir=state)
    worker.close()


@pytest.fixture(scope="session")
def service_client(server):
    import tinker

    client = tinker.ServiceClient(base_url=server.url, api_key=API_KEY)
    yield client
    client.close("success").result()  # else its session heartbeat complains once the server is gone


def _wait_ready(url: str, timeout: float = 120.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"worker exited with {proc.returncode}")
        try:
            if requests.get(f"{url}/api/v1/healthz", timeout=2).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"worker at {url} not ready after {timeout}s")


def start_worker_process(model_path: Path, state_dir: Path, port: int, **env: str) -> subprocess.Popen:
    """`python -m src serve` as a separate process (for restart and signal tests)."""
    environment = {
        **os.environ,
        "TINK_BASE_MODEL": str(model_path),
        "TINK_STATE_DIR": str(state_dir),
        "TINK_PORT": str(port),
        "TINK_API_KEYS": API_KEY,
        "TINK_RETRIEVE_WAIT_S": "5",
        **env,
    }
    log = open(state_dir / f"worker-{port}.log", "a")  # a file, not a pipe: a full pipe would block it
    proc = subprocess.Popen([sys.executable, "-m", "src", "serve"], cwd=REPO, env=environment,
                            stdout=log, stderr=subprocess.STDOUT, text=True)
    _wait_ready(f"http://127.0.0.1:{port}", proc=proc)
    return proc


def new_session() -> str:
    """A fresh session id: model ids derive from (session_id, model_seq_id), as in the SDK."""
    return f"test-{uuid.uuid4().hex}"


# ----------------------------------------------------------------------------- headless Chromium (the pages)


CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@pytest.fixture
def browser(tmp_path):
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("Debian's chromium and chromium-driver are not installed "
                    "(apt-get install -y --no-install-recommends chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1440,1500",
                "--disable-gpu", f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()
