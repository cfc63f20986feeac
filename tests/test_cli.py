"""The `tink` console script: every subcommand's --help explains every option; build-model, export,
serve and bench work end to end as subprocesses; progress bars appear only on a terminal."""

from __future__ import annotations

import argparse
import fcntl
import os
import pty
import re
import struct
import subprocess
import sys
import termios
import time
import tomllib
from pathlib import Path

import pytest
import requests

from .conftest import API_KEY, REPO, free_port
from .test_export import assert_merged_export, train_checkpoint
from .test_metrics import scrape, value

TINK = Path(sys.executable).parent / "tink"
COMMANDS = ("serve", "demo", "build-model", "export", "bench")


def run(*args: str, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    assert TINK.is_file(), f"{TINK} is missing: install the package (pip install -e .)"
    environment = {**os.environ, "TINKER_TELEMETRY": "0", **env}
    return subprocess.run([str(TINK), *args], cwd=REPO, env=environment, capture_output=True, text=True,
                          timeout=timeout)


def subcommands() -> dict[str, argparse.ArgumentParser]:
    from src.cli import build_parser

    (action,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def test_the_console_script_is_declared_and_lists_every_command():
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["tink"] == "src.cli:main"
    assert set(subcommands()) == set(COMMANDS)
    done = run("--help")
    assert done.returncode == 0, done.stderr
    assert all(command in done.stdout for command in COMMANDS)


@pytest.mark.parametrize("command", COMMANDS)
def test_help_names_and_explains_every_option(command):
    done = run(command, "--help")
    assert done.returncode == 0, done.stderr
    parser = subcommands()[command]
    assert parser.description, f"tink {command} needs a description"
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help and action.help != argparse.SUPPRESS, f"tink {command}: {action.dest} has no help"
        names = action.option_strings or [action.metavar or action.dest]
        missing = [name for name in names if name not in done.stdout]
        assert not missing, (missing, done.stdout)


def test_build_model_writes_a_loadable_model_folder(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    done = run("build-model", str(tmp_path / "qwen3"), "--family", "qwen3", "--tied", "--seed", "2")
    assert done.returncode == 0, done.stderr
    folder = Path(done.stdout.strip())
    assert folder == (tmp_path / "qwen3").resolve()
    config = AutoConfig.from_pretrained(folder)
    assert config.model_type == "qwen3" and config.tie_word_embeddings and config.head_dim == 64
    AutoModelForCausalLM.from_pretrained(folder)
    again = run("build-model", str(tmp_path / "qwen3"))  # already there: kept as it is
    assert again.returncode == 0 and Path(again.stdout.strip()) == folder
    assert run("build-model", str(tmp_path / "x"), "--family", "gpt2").returncode == 2  # argparse refuses it


@pytest.fixture(scope="module")
def checkpoint(service_client, server) -> str:
    return train_checkpoint(service_client, server.worker.base_model, "cli-export")


def test_export_a_tinker_path_from_the_state_dir(server, checkpoint, tmp_path):
    out = tmp_path / "merged"
    done = run("export", checkpoint, str(out), "--state-dir", str(server.state_dir))
    assert done.returncode == 0, done.stderr
    assert Path(done.stdout.strip()) == out.resolve()
    adapter_dir = Path(server.worker.store.get_checkpoint(checkpoint)["directory"])
    assert_merged_export(out, server.worker.base_model, adapter_dir)
    assert not re.search(r"export: \d/\d", done.stderr)  # stderr is a pipe here: no progress bar

    taken = run("export", checkpoint, str(out), "--state-dir", str(server.state_dir))
    assert taken.returncode == 2 and "not empty" in taken.stderr
    missing = run("export", checkpoint.replace("cli-export", "nope"), str(tmp_path / "m"),
                  "--state-dir", str(server.state_dir))
    assert missing.returncode == 2 and "no checkpoint at" in missing.stderr and "nope" in missing.stderr
    no_state = run("export", checkpoint, str(tmp_path / "m"), "--state-dir", str(tmp_path / "empty"))
    assert no_state.returncode == 2 and "no Tink worker state" in no_state.stderr


def test_export_a_downloaded_adapter_folder_with_python_m_src(server, checkpoint, tmp_path):
    """The `python -m src` entry point, on an adapter folder (what `tinker checkpoint download` gives)."""
    adapter_dir = Path(server.worker.store.get_checkpoint(checkpoint)["directory"])
    done = subprocess.run([sys.executable, "-m", "src", "export", str(adapter_dir), str(tmp_path / "merged"),
                           "--dtype", "float32"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert_merged_export(tmp_path / "merged", server.worker.base_model, adapter_dir)


def test_progress_bar_on_a_terminal(server, checkpoint, tmp_path):
    """With stderr on a terminal, export draws its bar through the five steps (cleared when done)."""
    primary, secondary = pty.openpty()
    fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # a terminal has a size
    proc = subprocess.Popen([str(TINK), "export", checkpoint, str(tmp_path / "merged"), "--state-dir",
                             str(server.state_dir)], cwd=REPO, stdout=subprocess.PIPE, stderr=secondary)
    os.close(secondary)
    drawn = b""
    while True:
        try:
            chunk = os.read(primary, 4096)
        except OSError:  # the terminal closed: the process has exited
            break
        if not chunk:
            break
        drawn += chunk
    assert proc.wait(120) == 0
    os.close(primary)
    text = drawn.decode(errors="replace")
    steps = re.findall(r"export: (\d)/5 .*?, ([a-z ]+) \[", text)
    assert {("0", "load the base model"), ("1", "apply the adapter"), ("2", "merge"), ("3", "save the weights"),
            ("4", "save the tokenizer")} <= set(steps), repr(text[-2000:])


def test_serve_options_override_the_environment(tiny_model_path, tmp_path):
    port = free_port()
    environment = {**os.environ, "TINK_PORT": "1", "TINK_STATE_DIR": str(tmp_path / "from-env"),
                   "TINK_BASE_MODEL": "/nonexistent/model", "TINK_HOME": str(tmp_path / "home")}
    proc = subprocess.Popen([str(TINK), "serve", "--port", str(port), "--state-dir", str(tmp_path / "state"),
                             "--base-model", str(tiny_model_path)], cwd=REPO, env=environment,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        ready = proc.stdout.readline()
        assert ready.strip() == f"TINK_READY http://127.0.0.1:{port}", ready
        assert requests.get(f"http://127.0.0.1:{port}/metrics", timeout=30).status_code == 200
        caps = requests.get(f"http://127.0.0.1:{port}/api/v1/get_server_capabilities", timeout=30).json()
        assert caps["supported_models"][0]["model_name"] == str(tiny_model_path)
        assert (tmp_path / "state" / "tink.sqlite3").is_file() and not (tmp_path / "from-env").exists()
    finally:
        proc.terminate()
        assert proc.wait(60) == 0


def test_bench_against_a_running_worker(server):
    before = scrape(server.url)
    started = time.monotonic()
    done = run("bench", "--url", server.url, "--api-key", API_KEY, "--rounds", "2", "--batch", "2",
               "--seq-len", "8", "--prompts", "2", "--samples", "2", "--max-tokens", "4")
    assert done.returncode == 0, done.stderr
    rates = dict(re.findall(r"^(train|sample)\s*:\s*([\d.]+) tokens/s", done.stdout, re.M))
    assert set(rates) == {"train", "sample"} and all(float(rate) > 0 for rate in rates.values()), done.stdout
    after = scrape(server.url)
    # 2 rounds x 2 datums x 8 tokens, as the bench says it sent
    assert value(after, "tink_tokens_trained_total") - value(before, "tink_tokens_trained_total") == 32
    assert time.monotonic() - started < 240
