"""A worker killed with SIGKILL takes its vLLM engine processes with it (src/vllm_plugin.py).

Without the plugin vLLM's EngineCore (and its worker) outlive the worker, reparented to init, holding
their memory (on a GPU: the whole KV cache); run with `VLLM_PLUGINS=` (no plugin), the engine test fails.
The first test checks the same mechanism in seconds, without vLLM: forked, spawned and grandchild
processes, a process that arms itself after its owner died, and one the plugin must leave alone.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import requests

from tests.conftest import API_KEY, REPO, _wait_ready, free_port
from tests.vllm_fixtures import requires_vllm

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")

GONE_WITHIN_S = 10

# What vLLM's processes do with the plugin: load it first (load_general_plugins), then live on.
# argv: role, folder for the pid files. The "spawned" one starts two grandchildren, as an EngineCore
# starts its GPU workers (spawned, or forked); the "late" one loads the plugin only after its owner died.
ENGINE_PROCESS = """
import os, subprocess, sys, time
from pathlib import Path
from src import vllm_plugin
role, folder = sys.argv[1], Path(sys.argv[2])
if role == "late":
    (folder / role).write_text(str(os.getpid()))
    parent = os.getppid()
    while os.getppid() == parent:
        time.sleep(0.05)
vllm_plugin.register()
if role == "spawned":
    subprocess.Popen([sys.executable, __file__, "grandchild", str(folder)])
    if os.fork() == 0:
        role = "forked-grandchild"
(folder / role).write_text(str(os.getpid()))
time.sleep(600)
os._exit(0)
"""

# The worker: its engine's processes start inside owning_engine_processes(), another one after it.
OWNER = """
import os, subprocess, sys, time
from src import vllm_plugin
engine, folder = sys.argv[1], sys.argv[2]
vllm_plugin.register()
with vllm_plugin.owning_engine_processes():
    subprocess.Popen([sys.executable, engine, "spawned", folder])  # vLLM's start method on CPU, and on GPU
    subprocess.Popen([sys.executable, engine, "late", folder])     # once CUDA is initialized
    if os.fork() == 0:  # VLLM_WORKER_MULTIPROC_METHOD=fork: such a child never loads the plugin itself
        open(os.path.join(folder, "forked"), "w").write(str(os.getpid()))
        time.sleep(600)
        os._exit(0)
subprocess.Popen([sys.executable, engine, "unmarked", folder])
time.sleep(600)
"""
ROLES = ("spawned", "grandchild", "forked-grandchild", "late", "forked", "unmarked")


def test_marked_processes_die_with_the_owner_and_others_live_on(tmp_path):
    psutil = pytest.importorskip("psutil")  # comes with vLLM; this test does not need vLLM itself

    (tmp_path / "engine.py").write_text(ENGINE_PROCESS)
    (tmp_path / "owner.py").write_text(OWNER)
    pids = tmp_path / "pids"
    pids.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    owner = subprocess.Popen([sys.executable, str(tmp_path / "owner.py"), str(tmp_path / "engine.py"), str(pids)],
                             cwd=REPO, env=env)
    processes = {}
    try:
        deadline = time.monotonic() + 60
        while len(processes) < len(ROLES) and time.monotonic() < deadline:
            processes = {role: psutil.Process(int(f.read_text())) for role in ROLES
                         if (f := pids / role).exists() and f.read_text()}
            time.sleep(0.05)
        assert set(processes) == set(ROLES), f"started: {sorted(processes)}"
        owner.send_signal(signal.SIGKILL)
        owner.wait(timeout=10)
        deadline = time.monotonic() + 5  # the watchdog looks every second
        marked = [role for role in ROLES if role != "unmarked"]
        while any(running(processes[role]) for role in marked) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [role for role in marked if running(processes[role])] == []
        assert running(processes["unmarked"])  # not the engine: a process the worker started later
    finally:
        for process in processes.values():
            if running(process):
                process.kill()
        if owner.poll() is None:
            owner.kill()
            owner.wait()


def start_vllm_worker(model_path, state_dir, port: int) -> subprocess.Popen:
    """`python -m src serve` with the in-process vLLM engine (~1 min to start on 2 CPU cores)."""
    env = {**os.environ, "TINK_BASE_MODEL": str(model_path), "TINK_STATE_DIR": str(state_dir),
           "TINK_PORT": str(port), "TINK_API_KEYS": API_KEY, "USE_VLLM": "true",
           "VLLM_GPU_MEMORY_UTILIZATION": "0.1", "VLLM_MAX_MODEL_LEN": "512"}
    log = open(state_dir / "worker.log", "a")  # a file, not a pipe: a full pipe would block it
    proc = subprocess.Popen([sys.executable, "-m", "src", "serve"], cwd=REPO, env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    _wait_ready(f"http://127.0.0.1:{port}", timeout=600, proc=proc)
    return proc


def running(process) -> bool:
    """Still a process that holds memory (a zombie waiting for init to reap it does not)."""
    import psutil

    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.vllm
@requires_vllm
def test_engine_processes_die_when_the_worker_is_killed(tiny_model_path, tmp_path):
    import psutil

    port = free_port()
    worker = start_vllm_worker(tiny_model_path, tmp_path, port)
    descendants = []
    try:
        health = requests.get(f"http://127.0.0.1:{port}/api/v1/healthz", timeout=10).json()
        descendants = psutil.Process(worker.pid).children(recursive=True)
        assert descendants, f"the worker started no engine process; healthz: {health}"
        names = [p.name() for p in descendants]
        worker.send_signal(signal.SIGKILL)
        worker.wait(timeout=10)
        deadline = time.monotonic() + GONE_WITHIN_S
        while any(running(p) for p in descendants) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = [f"{p.pid} {name}" for p, name in zip(descendants, names) if running(p)]
        assert not left, f"still running {GONE_WITHIN_S} s after the worker was killed: {left}"
    finally:
        for process in descendants:  # never leak an engine into the rest of the session
            if running(process):
                process.kill()
        if worker.poll() is None:
            worker.kill()
            worker.wait()
