"""CONFIGURATION.md documents every variable the worker reads, and nothing it does not."""

from __future__ import annotations

import re

from src.config import _ENV_FIELDS

from .conftest import REPO


def test_every_env_var_is_documented():
    documented = set(re.findall(r"^\| `([A-Z_]+)` \|", (REPO / "CONFIGURATION.md").read_text(), re.M))
    assert set(_ENV_FIELDS) - documented == set(), "add these to CONFIGURATION.md"
    # Read outside Config: the CLI's home and dotenv, and TINK_LOOK_INSIDE in vLLM's own processes (src/vllm_plugin.py)
    assert documented - set(_ENV_FIELDS) - {"TINK_HOME", "TINK_DOTENV", "TINK_LOOK_INSIDE"} == set(), \
        "documented but not read"


def test_sampling_concurrency_does_not_cap_the_vllm_batch():
    from src.config import Config

    # 64 prompts x n=8 of one GRPO step must all reach vLLM at once; HF runs one job at a time anyway
    assert Config(use_vllm=True).sampling_concurrency == 256
    assert Config().sampling_concurrency == 16
    assert Config(use_vllm=True, sampling_threads=8).sampling_concurrency == 8
