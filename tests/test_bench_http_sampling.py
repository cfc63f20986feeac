"""bench/bench_http_sampling.py (in `make bench`) on a small batch: a real worker in its own process, the SDK on
both transports the worker's client config can choose, every sampled token and logprob back."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO


def test_the_http_benchmark_gets_every_token_back_on_both_transports():
    done = subprocess.run([sys.executable, str(REPO / "bench/bench_http_sampling.py"), "--prompts", "4", "--n", "2",
                           "--max-tokens", "8", "--reps", "1"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "= 64 tokens" in done.stdout
    for transport in ("pyqwest", "httpx"):
        assert f"SDK transport {transport:>8}:" in done.stdout, done.stdout
