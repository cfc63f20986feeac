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


ENGINE_S = 1.5  # the stand-in engine's pass: every request of the batch ends this long after the first arrived


def test_a_batch_held_as_an_engine_holds_it_takes_at_least_the_engine_time():
    """--engine-s: every request of the batch ends together, that long after the first arrived; the batch through
    the SDK cannot be faster than that (a stand-in answering early would make the HTTP path look free), nor take
    a second engine pass: 20 requests are more than the 16 an HF worker runs at once, so a worker that did not
    run them all together (as a vLLM worker does) would hold them in two waves, 3 s."""
    done = subprocess.run([sys.executable, str(REPO / "bench/bench_http_sampling.py"), "--prompts", "20", "--n", "2",
                           "--max-tokens", "8", "--reps", "1", "--transports", "httpx", "--engine-s", str(ENGINE_S)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(line for line in done.stdout.splitlines() if line.startswith("SDK transport"))
    batch_s = float(line.split(":")[1].split(" s a batch")[0])
    # at least the engine's pass, and less than two of them (measured: 1.61 s; with 16 threads, 3.07 s failed it)
    assert ENGINE_S <= batch_s < 2 * ENGINE_S, line
