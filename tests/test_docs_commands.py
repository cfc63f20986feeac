"""The shell commands of README.md, CONFIGURATION.md and VLLM_README.md, as a newcomer copies them.

Each fenced bash block is split into commands, and each command is checked against the real thing it
calls: `tink` / `python -m src` with Tink's own parser, the trainer server with its parser (and
torchrun's), `vllm ... api_server` with vLLM's parser and model config (so `--max-model-len` must fit
the tiny model), `make` against the Makefile, `pip` against requirements.lock, env vars against
src/config.py (or the SDK / vLLM that reads them). The curl commands run for real against a worker on
the embedded model, unless they hold a `<placeholder>` for an id the reader gets from an earlier step;
those must still name a real route with a JSON body.

Commands run as written on the embedded model: a real model's path may appear only in a block whose
first line says "GPU only" (those are parsed, never started).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from werkzeug.exceptions import HTTPException

from .conftest import REPO, free_port, serving
from .vllm_fixtures import requires_vllm

DOCS = ("README.md", "CONFIGURATION.md", "VLLM_README.md")
EMBEDDED_PATH = "~/.cache/tink/models/tiny-llama"  # where TINK_BASE_MODEL=tiny builds and serves the tiny model
EMBEDDED_NAMES = ("tiny", os.path.expanduser(EMBEDDED_PATH))
GPU_ONLY = "GPU only"
DOC_URL = "http://127.0.0.1:8000"  # where the docs' worker listens (TINK_HOST / TINK_PORT defaults)
OPERATORS = {"|", "||", "&&", ";", "&"}
SHELL_LANGUAGES = {"bash", "sh", "shell"}
PYTHONS = {"python", "python3", ".venv/bin/python"}


@dataclass(frozen=True)
class Command:
    doc: str
    line: int
    argv: tuple[str, ...]
    env: dict[str, str] = field(default_factory=dict, hash=False)
    gpu_only: bool = False

    def __str__(self) -> str:
        return f"{self.doc}:{self.line}: {' '.join(self.argv)}"


def shell_blocks(text: str) -> list[tuple[int, list[str]]]:
    """(line number of the first line, lines) of every ```bash / ```sh / ```shell block."""
    blocks: list[tuple[int, list[str]]] = []
    language, lines, start = None, [], 0
    for number, line in enumerate(text.splitlines(), 1):
        fence = re.match(r"^```(\w*)\s*$", line)
        if fence and language is None:
            language, lines, start = fence.group(1) or "text", [], number + 1
        elif fence:
            if language in SHELL_LANGUAGES:
                blocks.append((start, lines))
            language = None
        elif language is not None:
            lines.append(line)
    return blocks


def tokens_of(source: str) -> list[str]:
    """The words bash sees, `~/` expanded as bash does at the start of a word or an assignment's value."""
    lexer = shlex.shlex(source, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    return [re.sub(r"^((?:[A-Za-z_][A-Za-z0-9_]*=)?)~/", lambda m: m.group(1) + os.path.expanduser("~/"), word)
            for word in lexer]


def commands_in(doc: str) -> list[Command]:
    """Every command of the doc's shell blocks: quoted text may span lines; `\\` continues a line."""
    found = []
    for start, lines in shell_blocks((REPO / doc).read_text()):
        gpu_only = bool(lines) and lines[0].startswith("#") and GPU_ONLY in lines[0]
        pending, first = "", start
        for offset, line in enumerate(lines):
            if not pending:
                first = start + offset
            pending += line + "\n"
            try:
                words = tokens_of(pending.replace("\\\n", " "))
            except ValueError:  # a quote still open: the command goes on
                continue
            if pending.rstrip("\n").endswith("\\"):
                continue
            pending = ""
            for argv in _split(words):
                env = {}
                while argv and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", argv[0]):
                    name, value = argv.pop(0).split("=", 1)
                    env[name] = value
                if argv:
                    found.append(Command(doc, first, tuple(argv), env, gpu_only))
        assert not pending, f"{doc}:{first}: unterminated command"
    return found


def _split(words: list[str]) -> list[list[str]]:
    parts: list[list[str]] = [[]]
    for word in words:
        if word in OPERATORS:
            parts.append([])
        else:
            parts[-1].append(word)
    return [p for p in parts if p]


COMMANDS = [command for doc in DOCS for command in commands_in(doc)]


def test_the_docs_have_their_commands():
    """The extraction finds the commands (a broken parser would make every other test vacuous)."""
    by_tool = {c.argv[0] for c in COMMANDS}
    assert {"make", "curl", "tink", "torchrun", "pip", "python"} <= by_tool, by_tool
    assert len(COMMANDS) >= 20
    assert any(c.gpu_only for c in COMMANDS) and any(not c.gpu_only for c in COMMANDS)


# ---------------------------------------------------------------------- one check per kind of command


def parse_or_fail(parser_call, argv: list[str], command: Command) -> argparse.Namespace:
    try:
        return parser_call(argv)
    except SystemExit as exc:  # argparse printed why
        pytest.fail(f"{command}: the real parser refuses it (exit {exc.code})")


def check_tink(argv: list[str], command: Command) -> None:
    from src.cli import build_parser

    args = parse_or_fail(build_parser().parse_args, argv, command)
    if args.command == "serve" and args.base_model is not None and not command.gpu_only:
        assert args.base_model in EMBEDDED_NAMES, f"{command}: serve the embedded model (--base-model tiny)"


def check_trainer_server(argv: list[str], command: Command) -> None:
    from src.trainer_server import parse_args

    args = parse_or_fail(parse_args, argv, command)
    if not command.gpu_only:
        assert args.model == EMBEDDED_NAMES[1], f"{command}: --model {EMBEDDED_PATH}"
        assert args.engine == "peft", f"{command}: --engine megatron needs CUDA: mark the block '{GPU_ONLY}'"


def check_python(argv: list[str], command: Command) -> None:
    if argv[0] != "-m":
        script = REPO / argv[0]
        assert script.is_file(), f"{command}: no {argv[0]} in the repository"
        done = subprocess.run([sys.executable, str(script), *argv[1:], "--help"], cwd=REPO, capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 0, f"{command}: {done.stderr[-1000:]}"
        return
    module, rest = argv[1], argv[2:]
    if module == "src":
        check_tink(rest, command)
    elif module == "src.demo":
        assert len(rest) <= 1 and all(arg.isdigit() for arg in rest), f"{command}: src.demo takes [steps]"
    elif module == "src.trainer_server":
        check_trainer_server(rest, command)
    elif module == "pytest":
        markers = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]["markers"]
        for i, arg in enumerate(rest):
            if arg == "-m":
                declared = {m.split(":")[0] for m in markers}
                assert set(re.findall(r"\w+", rest[i + 1])) - {"not", "and", "or"} <= declared, str(command)
    elif module == "vllm.entrypoints.openai.api_server":
        return  # test_vllm_serve_commands
    else:
        pytest.fail(f"{command}: the docs test does not know module {module}; add a check for it")


def check_torchrun(argv: list[str], command: Command) -> None:
    from torch.distributed.run import get_args_parser

    args = parse_or_fail(get_args_parser().parse_args, argv, command)
    assert args.module and args.training_script == "src.trainer_server", str(command)
    check_trainer_server(args.training_script_args, command)


def check_make(argv: list[str], command: Command) -> None:
    targets = set(re.findall(r"^([\w-]+):", (REPO / "Makefile").read_text(), re.M))
    assert set(argv) <= targets, f"{command}: the Makefile has no target {set(argv) - targets}"


def check_pip(argv: list[str], command: Command) -> None:
    """Versions named must be the ones requirements.lock pins (what CI proves)."""
    pins = dict(re.findall(r"^([A-Za-z0-9_.\-]+)==([^\s;]+)", (REPO / "requirements.lock").read_text(), re.M))
    pins = {name.lower().replace("_", "-"): version for name, version in pins.items()}
    assert argv[0] in ("install", "uninstall"), str(command)
    for requirement in (a for a in argv[1:] if not a.startswith("-") and a != "."):
        name, _, version = requirement.partition("==")
        name = name.lower().replace("_", "-")
        if argv[0] == "install":
            assert name in pins, f"{command}: {name} is not in requirements.lock"
            assert not version or pins[name] == version, f"{command}: requirements.lock pins {name}=={pins[name]}"


@dataclass
class CurlCall:
    url: str
    method: str
    headers: dict[str, str]
    body: str | None


def parse_curl(argv: list[str], command: Command) -> CurlCall:
    url, method, headers, body = None, None, {}, None
    args = iter(argv)
    for arg in args:
        if arg in ("-H", "--header"):
            name, _, value = next(args).partition(":")
            headers[name.strip().lower()] = value.strip()
        elif arg in ("-d", "--data", "--data-raw"):
            body = next(args)
        elif arg in ("-X", "--request"):
            method = next(args)
        elif arg in ("-o", "--output"):
            next(args)
        elif arg.startswith("http"):
            url = arg
        else:
            assert arg in ("-N", "-s", "-S", "-sS", "--no-buffer", "--silent"), f"{command}: unknown curl option {arg}"
    assert url and url.startswith(DOC_URL), f"{command}: the URL must be the worker's, {DOC_URL}/..."
    if body is not None:
        json.loads(body)  # the body is JSON (placeholders live inside its strings)
        assert headers.get("content-type") == "application/json", \
            f"{command}: -d needs -H 'Content-Type: application/json' (else Flask sees a form, not JSON)"
    return CurlCall(url, method or ("POST" if body is not None else "GET"), headers, body)


KNOWN_TOOLS = {"tink": lambda argv, c: check_tink(argv, c), "torchrun": check_torchrun, "make": check_make,
               "pip": check_pip, "curl": parse_curl}


# Variables Tink does not read, by prefix: the package that does and the files that name its variables.
FOREIGN_VARIABLES = {"TINKER_": ("tinker", "**/*.py"), "VLLM_": ("vllm", "envs.py")}


def foreign_variable_known(name: str) -> bool:
    """Whether the tinker SDK or vLLM reads `name` (it is quoted in their source)."""
    import importlib.util

    for prefix, (package, files) in FOREIGN_VARIABLES.items():
        spec = importlib.util.find_spec(package) if name.startswith(prefix) else None
        if spec is not None:
            return any(f'"{name}"' in source.read_text(errors="ignore")
                       for source in Path(spec.origin).parent.glob(files))
    return False


@pytest.mark.parametrize("command", COMMANDS, ids=str)
def test_command_is_well_formed(command: Command):
    from src.config import _ENV_FIELDS, Config

    settings = set(_ENV_FIELDS) | {"TINK_HOME", "TINK_DOTENV"}
    for name, value in command.env.items():
        assert name in settings or foreign_variable_known(name), f"{command}: {name} is not a setting"
        if name == "TINK_BASE_MODEL" and not command.gpu_only:
            assert value in EMBEDDED_NAMES, f"{command}: use the embedded model, or mark the block '{GPU_ONLY}'"
    tink_env = {k: v for k, v in command.env.items() if k in _ENV_FIELDS}
    Config.from_env(tink_env, dotenv_path=REPO / "no-such.env")  # values parse and validate together
    assert not [w for w in command.argv if "$" in w], f"{command}: a shell variable the reader has not set"
    assert not {"<", ">", "<<", ">>"} & set(command.argv), f"{command}: quote the <placeholders>"
    tool, rest = command.argv[0], list(command.argv[1:])
    if tool in PYTHONS:
        check_python(rest, command)
    elif tool in KNOWN_TOOLS:
        KNOWN_TOOLS[tool](rest, command)
    else:
        pytest.fail(f"{command}: the docs test does not know how to check `{tool}`; add a check for it")


# ---------------------------------------------------------------------- vLLM's own parser


@pytest.mark.vllm
@requires_vllm
def test_vllm_serve_commands_are_accepted_by_vllm(tiny_model_path):
    """vLLM's own parser and model config accept each server command; on the embedded model that
    includes `--max-model-len` against the tiny model's max_position_embeddings."""
    from transformers import AutoConfig
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    servers = [c for c in COMMANDS if c.argv[:3] == ("python", "-m", "vllm.entrypoints.openai.api_server")]
    assert len(servers) >= 2
    limit = AutoConfig.from_pretrained(tiny_model_path).max_position_embeddings
    for command in servers:
        parser = make_arg_parser(FlexibleArgumentParser())
        args = parse_or_fail(parser.parse_args, list(command.argv[3:]), command)
        validate_parsed_serve_args(args)
        if command.gpu_only:
            continue
        assert args.model == EMBEDDED_NAMES[1], f"{command}: --model {EMBEDDED_PATH}"
        assert args.max_model_len is None or args.max_model_len <= limit, \
            f"{command}: --max-model-len {args.max_model_len} > the tiny model's max_position_embeddings {limit}"
        args.model = str(tiny_model_path)  # the same model, built in this test session
        AsyncEngineArgs.from_cli_args(args).create_model_config()  # vLLM's own validation of the lengths


# ---------------------------------------------------------------------- curl, for real


@pytest.fixture(scope="module")
def embedded_worker(tmp_path_factory):
    """`tink serve` with no settings: TINK_BASE_MODEL=tiny (built here in its own TINK_HOME), no keys."""
    from src.app import create_app
    from src.config import Config
    from src.worker import Worker

    home = tmp_path_factory.mktemp("tink-home")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("TINK_HOME", str(home))
        config = Config(state_dir=home / "state", port=free_port(), retrieve_wait_s=5.0, threads=16)
        worker = Worker.from_config(config)
        app = create_app(config, worker)
        with serving(app, config) as url:
            yield url, app
    worker.close()


CURLS = [c for c in COMMANDS if c.argv[0] == "curl"]


@pytest.mark.parametrize("command", CURLS, ids=str)
def test_curl_names_a_route_and_runs_on_the_embedded_model(command: Command, embedded_worker, tmp_path):
    url, app = embedded_worker
    call = parse_curl(list(command.argv[1:]), command)
    path = re.sub(r"<[^>]*>", "x", call.url[len(DOC_URL):].split("?")[0])
    try:
        app.url_map.bind("127.0.0.1").match(path, method=call.method)
    except HTTPException as exc:
        pytest.fail(f"{command}: no {call.method} route serves {path} ({exc})")
    if "<" in " ".join(command.argv):
        return  # it needs an id from an earlier step: the route and the JSON are all there is to check
    argv = [url + arg[len(DOC_URL):] if arg.startswith(DOC_URL) else arg for arg in command.argv[1:]]
    done = subprocess.run(["curl", *argv, "-sS", "-o", str(tmp_path / "answer"), "-w", "%{http_code}"],
                          capture_output=True, text=True, timeout=300)
    answer = (tmp_path / "answer").read_text()
    assert done.returncode == 0 and done.stdout in ("200", "201"), f"{command}: {done.stdout} {done.stderr} {answer[:500]}"
    assert answer.strip(), str(command)
