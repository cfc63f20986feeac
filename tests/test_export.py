"""Merged export: a checkpoint trained through the SDK, folded into the base weights, gives the same
logprobs (fp32, within 1e-4) as the adapter on the base, from a folder of standard HF files only.
The HTTP route checks ownership as `load_weights` does; the tied-embedding case keeps the input
embeddings as they were."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import requests
import tinker
import torch
from safetensors import safe_open
from tinker import types

from .conftest import API_KEY, OTHER_KEY, free_port
from .vllm_fixtures import VLLMServer, make_adapter, requires_vllm

PROBE = [1, 40, 41, 97, 12, 300, 5, 33, 34, 35, 36, 77, 200]
# What a model hub checkpoint folder holds; anything else (adapter_*, optimizer.pt) must not be there.
STANDARD_FILES = re.compile(r"(config\.json|generation_config\.json|model\.safetensors|model\.safetensors\.index\.json"
                            r"|model-\d{5}-of-\d{5}\.safetensors|tokenizer\.json|tokenizer_config\.json"
                            r"|special_tokens_map\.json|chat_template\.jinja|vocab\.json|merges\.txt)")


def train_checkpoint(service_client, base_model: str, name: str) -> str:
    """A sampler checkpoint of an adapter (SDK defaults: every linear layer and lm_head) trained a few
    steps with a large learning rate, so that it moves the logprobs far from the base model's."""
    trainer = service_client.create_lora_training_client(base_model=base_model, rank=8, seed=3).result()
    tokens = [1, 40, 41, 97, 12, 300, 5, 40, 41, 97]
    datum = types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                        loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)})
    for _ in range(3):
        trainer.forward_backward([datum], "cross_entropy").result()
        trainer.optim_step(types.AdamParams(learning_rate=5e-2)).result()
    return trainer.save_weights_for_sampler(name).result().path


def logprobs(model, tokens: list[int]) -> torch.Tensor:
    """log p(tokens[t] | tokens[:t]) for t >= 1, in fp32."""
    ids = torch.tensor([tokens])
    with torch.no_grad():
        logits = model(ids).logits[0, :-1].float()
    return torch.log_softmax(logits, -1).gather(1, ids[0, 1:, None])[:, 0]


def adapter_on_base(base_model: str, adapter_dir: Path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.float32)
    return PeftModel.from_pretrained(base, str(adapter_dir)).eval()


def assert_merged_export(folder: Path, base_model: str, adapter_dir: Path) -> None:
    """`folder` is a standalone HF model whose logprobs are those of the adapter on the base."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    files = sorted(p.name for p in folder.iterdir())
    assert all(STANDARD_FILES.fullmatch(name) for name in files), files
    assert {"config.json", "tokenizer.json"} <= set(files) and any(n.endswith(".safetensors") for n in files)
    for weights in folder.glob("*.safetensors"):
        with safe_open(str(weights), "pt") as tensors:
            keys = list(tensors.keys())
        assert not [k for k in keys if "lora_" in k or k.startswith("base_model.")], keys[:5]
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())

    merged = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    reference = logprobs(adapter_on_base(base_model, adapter_dir), PROBE)
    exported = logprobs(merged, PROBE)
    base = logprobs(AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.float32).eval(), PROBE)
    assert (exported - reference).abs().max().item() <= 1e-4
    assert (exported - base).abs().max().item() > 1e-2  # the adapter is really in the weights
    assert AutoTokenizer.from_pretrained(folder).encode("hello world") == \
        AutoTokenizer.from_pretrained(base_model).encode("hello world")


def export(url: str, body: dict, key: str = API_KEY) -> requests.Response:
    return requests.post(f"{url}/api/v1/export", json=body, headers={"X-API-Key": key}, timeout=300)


@pytest.fixture(scope="module")
def checkpoint(service_client, server) -> str:
    return train_checkpoint(service_client, server.worker.base_model, "export-me")


def test_http_export_writes_a_merged_model_into_the_state_dir(server, checkpoint):
    answer = export(server.url, {"path": checkpoint})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    model_id = checkpoint.split("/")[2]
    folder = Path(body["directory"])
    assert folder == server.state_dir / "exports" / model_id / "sampler_weights" / "export-me"
    assert body["path"] == checkpoint and body["base_model"] == server.worker.base_model
    assert body["size_bytes"] == sum(p.stat().st_size for p in folder.iterdir())
    adapter_dir = Path(server.worker.store.get_checkpoint(checkpoint)["directory"])
    assert_merged_export(folder, server.worker.base_model, adapter_dir)

    again = export(server.url, {"path": checkpoint})  # the dashboard button pressed twice: replaced, same place
    assert again.status_code == 200 and again.json()["directory"] == body["directory"]
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no staging folder left behind


def test_http_export_checks_ownership_as_load_weights_does(server, service_client, checkpoint):
    other = export(server.url, {"path": checkpoint}, key=OTHER_KEY)
    assert other.status_code == 404 and other.json()["field"] == "path"
    # ... and once published, every key may read it, so may export it
    rest = tinker.RestClient(base_url=server.url, api_key=API_KEY)
    published = train_checkpoint(service_client, server.worker.base_model, "export-published")
    rest.publish_checkpoint_from_tinker_path(published).result()
    answer = export(server.url, {"path": published}, key=OTHER_KEY)
    assert answer.status_code == 200, answer.text
    assert Path(answer.json()["directory"]).is_dir()


@pytest.mark.parametrize("body, status, message", [
    ({}, 400, "path is required"),
    ({"path": 7}, 400, "path is required"),
    ({"path": "/tmp/some/folder"}, 400, "must be a tinker:// path"),
    ({"path": "tinker://nobody/sampler_weights/x"}, 404, "no checkpoint at"),
    ({"path": "tinker://nobody/bad_kind/x"}, 400, "<kind> one of"),
])
def test_http_export_refuses_bad_input_naming_the_field(server, body, status, message):
    answer = export(server.url, body)
    assert answer.status_code == status, answer.text
    assert answer.json()["field"] == "path" and message in answer.json()["error"]


def test_http_export_needs_a_key(server, checkpoint):
    assert requests.post(f"{server.url}/api/v1/export", json={"path": checkpoint}, timeout=30).status_code == 401


def test_tied_embeddings_are_untied_so_only_the_logits_change(tmp_path):
    """Qwen3-0.6B's shape: lm_head shares the input embeddings. Merging the lm_head LoRA into that shared
    weight would change the embeddings too; the export gives lm_head its own weight instead."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from src.export import ExportSource, merge_adapter
    from src.tiny_model import ensure_tiny_model

    base = ensure_tiny_model(tmp_path / "qwen3-tied", "qwen3", tied=True)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    torch.manual_seed(0)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                  target_modules=["q_proj", "v_proj", "down_proj", "lm_head"]))
    peft_model.save_pretrained(tmp_path / "adapter")

    size = merge_adapter(ExportSource(tmp_path / "adapter", str(base)), tmp_path / "merged")
    assert size > 0
    assert_merged_export(tmp_path / "merged", str(base), tmp_path / "adapter")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    original = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    assert merged.config.tie_word_embeddings is False
    assert torch.equal(merged.get_input_embeddings().weight, original.get_input_embeddings().weight)
    assert not torch.equal(merged.get_output_embeddings().weight, original.get_output_embeddings().weight)


def test_merge_refuses_a_folder_that_is_not_an_adapter_and_keeps_existing_output(tmp_path, tiny_model_path):
    from src.backends import UserInputError
    from src.export import ExportSource, merge_adapter

    with pytest.raises(UserInputError, match="not a PEFT adapter folder") as refused:
        merge_adapter(ExportSource(tiny_model_path, str(tiny_model_path)), tmp_path / "out")
    assert refused.value.field == "source"
    adapter = ExportSource(make_adapter(tiny_model_path, tmp_path / "adapter", seed=1), str(tiny_model_path))
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    with pytest.raises(UserInputError, match="not empty") as refused:
        merge_adapter(adapter, tmp_path / "taken")
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"
    with pytest.raises(UserInputError, match="dtype must be one of"):
        merge_adapter(adapter, tmp_path / "x", dtype="int8")
    assert not (tmp_path / "x").exists()


@pytest.mark.vllm
@requires_vllm
def test_vllm_serves_the_export_as_it_is(server, checkpoint, tmp_path):
    """`vllm serve <export>` (the external-server command of VLLM_README.md, without LoRA) answers with
    the merged model's greedy tokens."""
    from transformers import AutoModelForCausalLM

    answer = export(server.url, {"path": checkpoint})
    folder = Path(answer.json()["directory"])
    merged = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    prompt = PROBE[:6]
    expected = merged.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False)[0, len(prompt):].tolist()
    vllm_server = VLLMServer(folder, free_port(), tmp_path / "vllm.log", lora=False).start()
    try:
        served = requests.post(f"{vllm_server.url}/v1/completions", timeout=300, json={
            "model": str(folder), "prompt": prompt, "max_tokens": 8, "temperature": 0.0, "ignore_eos": True,
            "return_token_ids": True}).json()
    finally:
        vllm_server.stop()
    assert served["choices"][0]["token_ids"] == expected
