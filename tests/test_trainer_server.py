"""The trainer server as a real separate process (torchrun, gloo, CPU), reached through `MegatronTrainer`.

Covers: the wire codec; the HF <-> Megatron weight mapping; the PEFT engine at world size 1 and 2
(data parallel) against an in-process `HFTrainer`; the Megatron engine at TP=2 and at DP=2 on
CPU against PEFT; ordering; 4xx/5xx mapping; and a rank killed mid-operation.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from src.backends import AdamParams, BackendError, LoraSpec, TrainDatum, UserInputError
from src.megatron_backend import MegatronTrainer, decode, encode

from .conftest import REPO, free_port, serving

# fp32 on CPU, same weights and adapter: the engines differ only in summation order.
LOGPROB_TOL = 1e-4
LORA = LoraSpec(rank=4, alpha=8, seed=0)
ADAM = AdamParams(learning_rate=1e-2, beta1=0.9, beta2=0.95, eps=1e-8)


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def gqa_model_path(tmp_path_factory) -> Path:
    """A Qwen2-family model with 2 KV heads (so TP=2 splits them), qkv biases, tied embeddings,
    and a vocabulary (515) that TP=2 must pad: the mapping's awkward cases in one small model."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    from src.tiny_model import build_tokenizer

    path = tmp_path_factory.getbasetemp() / "models" / "tiny-qwen2-gqa"
    if (path / "config.json").exists():
        return path
    config = Qwen2Config(vocab_size=515, hidden_size=128, intermediate_size=192, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=256,
                         tie_word_embeddings=True, rms_norm_eps=1e-6)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if "norm" in name else 0.0, 0.1 if "norm" in name or "bias" in name else 0.08)
    model.save_pretrained(path, safe_serialization=True)
    build_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def gqa_adapter(gqa_model_path, tmp_path_factory) -> Path:
    """A PEFT adapter with non-zero A and B on every Tink target, written by PEFT itself."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(gqa_model_path, dtype=torch.float32)
    torch.manual_seed(5)
    peft = get_peft_model(model, LoraConfig(r=LORA.rank, lora_alpha=LORA.alpha, init_lora_weights=False,
                                            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                            "up_proj", "down_proj", "lm_head"]))
    out = tmp_path_factory.mktemp("gqa-adapter")
    peft.save_pretrained(out, save_embedding_layers=False)  # LoRA tensors only, as Tink's engines write
    return out


class TrainerServer:
    def __init__(self, model: Path, engine: str, nproc: int, tp: int, log: Path, *extra: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
               "--master-port", str(free_port()), "-m", "src.trainer_server", "--engine", engine,
               "--model", str(model), "--port", str(self.port), "--tp", str(tp), "--device", "cpu",
               "--threads", "1", "--heartbeat-s", "1", "--op-timeout-s", "120", *extra]
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                                     env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)
        self.client = MegatronTrainer(self.url, str(model), timeout_s=120)
        deadline = time.time() + 180
        while not self.client.health().get("live"):
            if self.proc.poll() is not None or time.time() > deadline:
                self.stop()
                raise RuntimeError(f"trainer server did not start; log:\n{log.read_text()[-3000:]}")
            time.sleep(0.3)
        self.info = self.client.health()

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # its own session: torchrun and its ranks
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def start_server(tmp_path_factory):
    started = []

    def start(model: Path, engine: str, nproc: int, tp: int = 1) -> TrainerServer:
        log = tmp_path_factory.mktemp("trainer-server") / f"{engine}-{nproc}-{tp}.log"
        server = TrainerServer(model, engine, nproc, tp, log)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def make_data(seed: int, n: int, length: int, vocab: int) -> list[TrainDatum]:
    rng = np.random.default_rng(seed)
    data = []
    for i in range(n):
        seq = rng.integers(3, vocab, size=length + 1 - (i % 3))  # uneven lengths: padding paths
        data.append(TrainDatum(tokens=seq[:-1].tolist(), loss_fn_inputs={
            "target_tokens": seq[1:].astype(np.int64), "weights": rng.random(len(seq) - 1).astype(np.float32)}))
    return data


def peft_reference_logprobs(model_path: Path, adapter: Path | None, tokens: list[int]) -> np.ndarray:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    with torch.no_grad():
        logits = model(torch.tensor([tokens])).logits[0, :-1].float()
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(tokens[1:])[:, None])[:, 0].numpy()


def logprobs_of(result) -> list[np.ndarray]:
    return [np.asarray(o["logprobs"], dtype=np.float64) for o in result.loss_fn_outputs]


# ----------------------------------------------------------------------------- no process


def test_codec_round_trips_arrays_and_refuses_other_dtypes():
    value = {"a": np.arange(6, dtype=np.int64).reshape(2, 3), "b": [np.float32(1.5), np.ones(2, np.float32)]}
    back = decode(encode(value))
    assert back["a"].dtype == np.int64 and back["a"].shape == (2, 3) and (back["a"] == value["a"]).all()
    assert back["b"][0] == 1.5 and back["b"][1].dtype == np.float32
    wire = encode(np.zeros(2, np.float32))
    wire["__ndarray__"]["dtype"] = "object"
    with pytest.raises(UserInputError):
        decode(wire)
    wire = encode(np.zeros(4, np.float32))
    wire["__ndarray__"]["shape"] = [5]
    with pytest.raises(UserInputError):
        decode(wire)


@pytest.mark.parametrize("family, tp", [("qwen2", 1), ("qwen2", 2), ("llama", 1)])
def test_hf_megatron_mapping_round_trips(request, family, tp):
    """Qwen2 (GQA, qkv bias, tied, vocab padded at TP=2) and the tiny Llama (MQA, untied, no bias)."""
    from transformers import AutoConfig

    from src.megatron_engine import dims_from_hf, hf_to_megatron, megatron_to_hf, open_hf_weights

    gqa_model_path = request.getfixturevalue("gqa_model_path" if family == "qwen2" else "tiny_model_path")
    dims = dims_from_hf(AutoConfig.from_pretrained(gqa_model_path), tp)
    get = open_hf_weights(gqa_model_path)
    shards = [hf_to_megatron(get, dims, rank, tp) for rank in range(tp)]
    # Shapes a TP rank's GPTModel holds: qkv rows = local groups x (q heads per group + 2) x head_dim.
    qkv = shards[0]["decoder.layers.0.self_attention.linear_qkv.weight"]
    assert qkv.shape == (dims.groups // tp * (dims.q_per_group + 2) * dims.head_dim, dims.hidden)
    assert shards[0]["embedding.word_embeddings.weight"].shape[0] == dims.padded_vocab // tp
    back = megatron_to_hf(shards, dims)
    from safetensors.torch import load_file

    original = load_file(str(gqa_model_path / "model.safetensors"))
    assert set(back) == set(original)
    for name, tensor in original.items():
        assert torch.equal(back[name], tensor), name


def test_the_mapping_refuses_what_it_does_not_cover(tiny_model_path):
    from transformers import AutoConfig

    from src.megatron_engine import dims_from_hf

    config = AutoConfig.from_pretrained(tiny_model_path)
    with pytest.raises(ValueError, match="must divide the 1 key/value heads"):
        dims_from_hf(config, 2)
    config.architectures = ["GPT2LMHeadModel"]
    with pytest.raises(ValueError, match="--engine peft"):
        dims_from_hf(config, 1)


def test_qkv_layout_is_grouped_per_kv_head(gqa_model_path):
    """Megatron's fused layout: for each KV group, its query heads, then its k, then its v."""
    from transformers import AutoConfig

    from src.megatron_engine import dims_from_hf, fuse_qkv

    dims = dims_from_hf(AutoConfig.from_pretrained(gqa_model_path), 1)
    hd, qpg = dims.head_dim, dims.q_per_group
    q = torch.arange(dims.heads * hd).float()
    k = 1000 + torch.arange(dims.groups * hd).float()
    v = 2000 + torch.arange(dims.groups * hd).float()
    fused = fuse_qkv(q, k, v, dims).reshape(dims.groups, -1)
    for g in range(dims.groups):
        assert torch.equal(fused[g, : qpg * hd], q[g * qpg * hd: (g + 1) * qpg * hd])
        assert torch.equal(fused[g, qpg * hd: (qpg + 1) * hd], k[g * hd: (g + 1) * hd])
        assert torch.equal(fused[g, (qpg + 1) * hd:], v[g * hd: (g + 1) * hd])


# ----------------------------------------------------------------------------- Megatron engine (CPU, gloo)


# dp2 also runs its batches in micro-batches of at most 30 padded tokens (2 datums of 12).
@pytest.fixture(scope="module", params=[(2, 2, ()), (2, 1, ("--tokens-per-microbatch", "30"))], ids=["tp2", "dp2"])
def megatron_server(request, gqa_model_path, tmp_path_factory):
    nproc, tp, extra = request.param
    log = tmp_path_factory.mktemp("megatron-server") / "server.log"
    server = TrainerServer(gqa_model_path, "megatron", nproc, tp, log, *extra)
    yield server
    server.stop()


def test_megatron_server_reports_its_layout(megatron_server):
    info = megatron_server.info
    assert info["engine"] == "megatron" and info["world_size"] == 2 and len(info["rank_pids"]) == 2
    assert info["tensor_parallel"] * info["data_parallel"] == 2


def test_megatron_logprobs_match_peft(megatron_server, gqa_model_path, gqa_adapter):
    client = megatron_server.client
    client.create_adapter("logprobs", LORA)
    client.load_state("logprobs", gqa_adapter, with_optimizer=False)
    tokens = [1, 7, 42, 300, 511, 514, 3, 99, 100, 250]  # 514: in the last, padded, TP shard
    base = client.compute_logprobs(None, tokens)
    tuned = client.compute_logprobs("logprobs", tokens)
    np.testing.assert_allclose(base, peft_reference_logprobs(gqa_model_path, None, tokens), atol=LOGPROB_TOL)
    np.testing.assert_allclose(tuned, peft_reference_logprobs(gqa_model_path, gqa_adapter, tokens), atol=LOGPROB_TOL)
    assert np.abs(tuned - base).max() > 0.1  # the adapter matters, so the comparison means something


def test_megatron_export_is_the_peft_adapter(megatron_server, gqa_model_path, gqa_adapter, tmp_path):
    from safetensors.torch import load_file

    client = megatron_server.client
    client.create_adapter("export", LORA)
    client.load_state("export", gqa_adapter, with_optimizer=False)
    client.export_adapter("export", tmp_path)
    ours, theirs = load_file(str(tmp_path / "adapter_model.safetensors")), load_file(
        str(gqa_adapter / "adapter_model.safetensors"))
    assert set(ours) == set(theirs)
    for key in theirs:
        assert torch.equal(ours[key], theirs[key]), key
    tokens = [2, 5, 9, 17, 33, 65]
    np.testing.assert_allclose(peft_reference_logprobs(gqa_model_path, tmp_path, tokens),
                               client.compute_logprobs("export", tokens), atol=LOGPROB_TOL)


def test_refusals_are_4xx_naming_the_field(megatron_server, tmp_path):
    import requests

    client = megatron_server.client
    assert client.has_adapter("nobody") is False
    with pytest.raises(UserInputError) as err:
        client.lora_spec("nobody")
    assert err.value.field == "model_id"
    client.create_adapter("twice", LORA)
    with pytest.raises(UserInputError, match="already"):
        client.create_adapter("twice", LORA)
    with pytest.raises(UserInputError) as err:
        client.load_state("twice", tmp_path / "missing", with_optimizer=False)
    assert err.value.field == "path"
    url = megatron_server.url
    assert requests.post(f"{url}/v1/no_such_op", json={}).status_code == 404
    answer = requests.post(f"{url}/v1/create_adapter", data=b"{not json", timeout=10)
    assert answer.status_code == 400 and answer.json()["field"] == "body"
    answer = requests.post(f"{url}/v1/optim_step", json={"model_id": "twice"}, timeout=10)
    assert answer.status_code == 400 and answer.json()["field"] == "params"
    pickled = {"model_id": "twice", "loss_fn": "cross_entropy", "forward_only": True,
               "data": [{"tokens": [1, 2], "loss_fn_inputs": {"target_tokens": {"__ndarray__": {
                   "dtype": "object", "shape": [2], "b64": "AAAA"}}}}]}
    answer = requests.post(f"{url}/v1/forward_backward", json=pickled, timeout=10)
    assert answer.status_code == 400 and "dtype" in answer.json()["error"]
    bad = make_data(seed=9, n=4, length=6, vocab=515)
    bad[3].loss_fn_inputs["target_tokens"][0] = 9999  # in the last DP rank's slice
    with pytest.raises(UserInputError) as err:
        client.forward_backward("twice", bad, "cross_entropy", None, False)
    assert err.value.field == "data[3].loss_fn_inputs.target_tokens"  # the batch's index, not the slice's
    assert client.health()["live"]  # refusals do not hurt the server


def test_operations_run_one_at_a_time_in_arrival_order(megatron_server, gqa_model_path):
    seen: list[list[dict]] = [[] for _ in range(4)]

    def caller(i: int) -> None:
        client = MegatronTrainer(megatron_server.url, str(gqa_model_path))
        for _ in range(5):
            client.compute_logprobs(None, list(range(3, 3 + 40 + i)))
            seen[i].append(client.last_op)

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    ops = sorted((op for ops in seen for op in ops), key=lambda op: op["seq"])
    assert len(ops) == 20 and len({op["seq"] for op in ops}) == 20
    for earlier, later in zip(ops, ops[1:]):
        assert later["started"] >= earlier["finished"]  # never two at once
    for ops_of_one in seen:  # each caller's operations ran in the order it sent them
        assert [op["seq"] for op in ops_of_one] == sorted(op["seq"] for op in ops_of_one)


def test_a_killed_rank_fails_operations_clearly_and_health_reports_down(gqa_model_path, tmp_path):
    server = TrainerServer(gqa_model_path, "megatron", 2, 1, tmp_path / "server.log")
    try:
        client = server.client
        client.create_adapter("victim", LORA)
        outcomes: list[BaseException | None] = []

        def busy() -> None:
            caller = MegatronTrainer(server.url, str(gqa_model_path), timeout_s=60)
            for _ in range(200):
                try:
                    caller.compute_logprobs("victim", list(range(3, 200)))
                except BaseException as exc:  # noqa: BLE001 (the test inspects it)
                    outcomes.append(exc)
                    return
            outcomes.append(None)

        threads = [threading.Thread(target=busy) for _ in range(3)]
        for t in threads:
            t.start()
        time.sleep(1.0)
        started = time.time()
        os.kill(server.info["rank_pids"][1], signal.SIGKILL)
        for t in threads:
            t.join(60)
        assert time.time() - started < 30, "callers hung after a rank died"
        assert len(outcomes) == 3 and all(isinstance(o, BackendError) for o in outcomes), outcomes
        causes = ("rank stopped answering", "signal", "did not answer")  # gloo saw it / torchrun said / gone
        for exc in outcomes:
            assert server.url in str(exc) and any(cause in str(exc) for cause in causes), str(exc)
        # Operations in flight or queued when it died are answered (503, with the cause), not dropped.
        assert any("HTTP 503" in str(exc) for exc in outcomes), outcomes
        deadline = time.time() + 30
        while client.health()["live"] and time.time() < deadline:
            time.sleep(0.2)
        assert client.health()["live"] is False
        with pytest.raises(BackendError, match="trainer server"):
            client.has_adapter("victim")
        assert server.proc.wait(30) != 0  # the server exits instead of limping on
    finally:
        server.stop()


def peft_reference_step(model_path: Path, adapter: Path, data: list[TrainDatum], adam: AdamParams,
                        probe: list[int]) -> tuple[float, list[np.ndarray], np.ndarray]:
    """One forward_backward + AdamW step done by hand with PEFT: (loss, per-datum logprobs, probe logprobs after)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from src.losses import compute_loss

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32),
                                      adapter, is_trainable=True)
    params = [p for n, p in model.named_parameters() if p.requires_grad]
    assert params and all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    total, logprobs = torch.zeros(()), []
    for datum in data:
        logits = model(torch.tensor([datum.tokens])).logits[0].float()
        lp = torch.log_softmax(logits, -1).gather(-1, torch.as_tensor(datum.loss_fn_inputs["target_tokens"])[:, None])[:, 0]
        total = total + compute_loss("cross_entropy", lp, datum.loss_fn_inputs, None).loss
        logprobs.append(lp.detach().numpy())
    total.backward()
    if adam.grad_clip_norm > 0:
        torch.nn.utils.clip_grad_norm_(params, adam.grad_clip_norm)
    torch.optim.AdamW(params, lr=adam.learning_rate, betas=(adam.beta1, adam.beta2), eps=adam.eps,
                      weight_decay=adam.weight_decay).step()
    with torch.no_grad():
        logits = model(torch.tensor([probe])).logits[0, :-1].float()
    after = torch.log_softmax(logits, -1).gather(-1, torch.tensor(probe[1:])[:, None])[:, 0].numpy()
    return float(total), logprobs, after


# A large eps makes Adam's first step ~ lr * g / eps: linear in the gradient, so a wrong gradient
# scale (say DP ranks summing twice) or a wrong clipping norm shows up in the logprobs after it.
GRAD_SENSITIVE_ADAM = AdamParams(learning_rate=0.5, beta1=0.9, beta2=0.95, eps=10.0, weight_decay=0.1)


@pytest.mark.parametrize("clip", [0.0, 0.05], ids=["noclip", "clip"])
def test_megatron_training_step_matches_peft(megatron_server, gqa_model_path, gqa_adapter, clip):
    client = megatron_server.client
    model_id = f"train-{clip}"
    client.create_adapter(model_id, LORA)
    client.load_state(model_id, gqa_adapter, with_optimizer=False)
    data = make_data(seed=1, n=5, length=12, vocab=515)  # 5 datums: DP=2 splits them 2 + 3
    adam = AdamParams(**{**GRAD_SENSITIVE_ADAM.__dict__, "grad_clip_norm": clip})
    probe = [4, 8, 15, 16, 23, 42, 108, 300]
    result = client.forward_backward(model_id, data, "cross_entropy", None, forward_only=False)
    metrics = client.optim_step(model_id, adam)
    loss, ref_logprobs, ref_after = peft_reference_step(gqa_model_path, gqa_adapter, data, adam, probe)
    assert result.metrics["loss:sum"] == pytest.approx(loss, rel=1e-5)
    for ours, theirs in zip(logprobs_of(result), ref_logprobs):
        np.testing.assert_allclose(ours, theirs, atol=LOGPROB_TOL)
    after = client.compute_logprobs(model_id, probe)
    np.testing.assert_allclose(after, ref_after, atol=LOGPROB_TOL)
    assert np.abs(after - peft_reference_logprobs(gqa_model_path, gqa_adapter, probe)).max() > 1e-3  # it moved
    assert metrics  # e.g. the gradient norm


def test_megatron_save_and_load_state_resume_training_exactly(megatron_server, gqa_adapter, tmp_path):
    client = megatron_server.client
    first, second = make_data(seed=2, n=4, length=10, vocab=515), make_data(seed=3, n=4, length=10, vocab=515)
    probe = [9, 99, 199, 299, 399, 499]
    adam = AdamParams(learning_rate=5e-3, beta1=0.9, beta2=0.95, eps=1e-8)
    client.create_adapter("resume-a", LORA)
    client.load_state("resume-a", gqa_adapter, with_optimizer=False)
    client.forward_backward("resume-a", first, "cross_entropy", None, False)
    client.optim_step("resume-a", adam)
    client.save_state("resume-a", tmp_path)
    assert {"adapter_model.safetensors", "adapter_config.json", "optimizer.safetensors",
            "tink_state.json"} <= {p.name for p in tmp_path.iterdir()}
    client.forward_backward("resume-a", second, "cross_entropy", None, False)
    client.optim_step("resume-a", adam)
    expected = client.compute_logprobs("resume-a", probe)

    for with_optimizer in (True, False):
        model_id = f"resume-b-{with_optimizer}"
        client.create_adapter(model_id, LoraSpec(rank=LORA.rank, alpha=LORA.alpha, seed=99))
        client.load_state(model_id, tmp_path, with_optimizer=with_optimizer)
        client.forward_backward(model_id, second, "cross_entropy", None, False)
        client.optim_step(model_id, adam)
        got = client.compute_logprobs(model_id, probe)
        if with_optimizer:  # Adam's moments and step came back: the same second step
            np.testing.assert_allclose(got, expected, atol=1e-5)
        else:  # fresh moments: a different second step, so the test can tell them apart
            assert np.abs(got - expected).max() > 1e-4


# ----------------------------------------------------------------------------- PEFT engine (CPU, gloo)


@pytest.fixture(scope="module", params=[1, 2], ids=["world1", "world2"])
def peft_server(request, tiny_model_path, tmp_path_factory):
    log = tmp_path_factory.mktemp("peft-server") / "server.log"
    server = TrainerServer(tiny_model_path, "peft", request.param, 1, log)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def local_hf_trainer(tiny_model_path):
    from src.hf_trainer import HFTrainer

    return HFTrainer(str(tiny_model_path), device="cpu", dtype="float32")


def test_peft_server_trains_like_the_in_process_trainer(peft_server, local_hf_trainer, tmp_path):
    """Same model, seed and batch: the server (1 rank, or 2 data-parallel ranks) and HFTrainer agree."""
    from safetensors.torch import load_file

    server, local = peft_server.client, local_hf_trainer
    model_id = f"same-{peft_server.info['world_size']}"
    spec = LoraSpec(rank=4, alpha=8, seed=7)
    vocab = server.vocab_size()
    assert vocab == local.vocab_size()
    data = make_data(seed=4, n=5, length=14, vocab=vocab)
    probe = [1, 20, 40, 80, 160, 320, 400]
    results = {}
    for name, trainer in (("server", server), ("local", local)):
        trainer.create_adapter(model_id, spec)
        assert trainer.has_adapter(model_id) and trainer.lora_spec(model_id) == spec
        fb = trainer.forward_backward(model_id, data, "cross_entropy", None, False)
        step = trainer.optim_step(model_id, GRAD_SENSITIVE_ADAM)
        after = trainer.forward_backward(model_id, data, "cross_entropy", None, True)
        export = tmp_path / name
        export.mkdir()
        trainer.export_adapter(model_id, export)
        results[name] = (fb, step, after, load_file(str(export / "adapter_model.safetensors")),
                         np.asarray(trainer.compute_logprobs(model_id, probe)))
    (fb_s, step_s, after_s, files_s, probe_s), (fb_l, step_l, after_l, files_l, probe_l) = results["server"], results["local"]
    assert fb_s.metrics["loss:sum"] == pytest.approx(fb_l.metrics["loss:sum"], rel=1e-5)
    assert len(fb_s.loss_fn_outputs) == len(data)  # every datum, in the batch's order
    for ours, theirs in zip(logprobs_of(fb_s), logprobs_of(fb_l)):
        np.testing.assert_allclose(ours, theirs, atol=LOGPROB_TOL)
    for ours, theirs in zip(logprobs_of(after_s), logprobs_of(after_l)):
        np.testing.assert_allclose(ours, theirs, atol=LOGPROB_TOL)
    assert after_s.metrics["loss:sum"] < fb_s.metrics["loss:sum"]  # the step helped
    assert set(files_s) == set(files_l)
    for key in files_l:
        torch.testing.assert_close(files_s[key], files_l[key], atol=1e-5, rtol=1e-4)
    np.testing.assert_allclose(probe_s, probe_l, atol=LOGPROB_TOL)
    assert set(step_s) == set(step_l)


def test_peft_server_save_load_and_delete(peft_server, tmp_path):
    client = peft_server.client
    data = make_data(seed=5, n=3, length=8, vocab=client.vocab_size())
    client.create_adapter("saved", LoraSpec(rank=4, seed=1))
    client.forward_backward("saved", data, "cross_entropy", None, False)
    client.optim_step("saved", GRAD_SENSITIVE_ADAM)
    before = client.forward_backward("saved", data, "cross_entropy", None, True)
    client.save_state("saved", tmp_path)
    client.create_adapter("restored", LoraSpec(rank=4, seed=2))
    client.load_state("restored", tmp_path, with_optimizer=True)
    after = client.forward_backward("restored", data, "cross_entropy", None, True)
    for ours, theirs in zip(logprobs_of(after), logprobs_of(before)):
        np.testing.assert_allclose(ours, theirs, atol=1e-6)
    bad = make_data(seed=9, n=4, length=6, vocab=client.vocab_size())
    bad[3].loss_fn_inputs["weights"] = bad[3].loss_fn_inputs["weights"][:-1]  # in the last rank's slice
    with pytest.raises(UserInputError) as err:
        client.forward_backward("saved", bad, "cross_entropy", None, False)
    assert err.value.field == "data[3].loss_fn_inputs.weights"
    client.delete_adapter("saved")
    assert not client.has_adapter("saved") and client.has_adapter("restored")
    with pytest.raises(UserInputError):
        client.forward_backward("saved", data, "cross_entropy", None, True)


def test_megatron_resumes_a_state_saved_by_the_hf_engine(megatron_server, gqa_model_path, gqa_adapter, tmp_path):
    """An HFTrainer checkpoint (PEFT files + optimizer.pt) resumes on Megatron with the same next step."""
    from src.hf_trainer import HFTrainer

    local = HFTrainer(str(gqa_model_path), device="cpu", dtype="float32")
    first, second = make_data(seed=6, n=3, length=9, vocab=515), make_data(seed=7, n=3, length=9, vocab=515)
    probe = [5, 50, 150, 250, 350, 450, 514]
    adam = AdamParams(learning_rate=5e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.01)
    local.create_adapter("hf", LORA)
    local.load_state("hf", gqa_adapter, with_optimizer=False)
    local.forward_backward("hf", first, "cross_entropy", None, False)
    local.optim_step("hf", adam)
    local.save_state("hf", tmp_path)
    assert (tmp_path / "optimizer.pt").is_file()

    client = megatron_server.client
    client.create_adapter("from-hf", LORA)
    client.load_state("from-hf", tmp_path, with_optimizer=True)
    np.testing.assert_allclose(client.compute_logprobs("from-hf", probe), local.compute_logprobs("hf", probe),
                               atol=LOGPROB_TOL)
    ours = client.forward_backward("from-hf", second, "cross_entropy", None, False)
    theirs = local.forward_backward("hf", second, "cross_entropy", None, False)
    assert ours.metrics["loss:sum"] == pytest.approx(theirs.metrics["loss:sum"], rel=1e-5)
    step_ours, step_theirs = client.optim_step("from-hf", adam), local.optim_step("hf", adam)
    assert step_ours["step:max"] == step_theirs["step:max"] == 2.0
    assert step_ours["grad_norm:mean"] == pytest.approx(step_theirs["grad_norm:mean"], rel=1e-4)
    np.testing.assert_allclose(client.compute_logprobs("from-hf", probe), local.compute_logprobs("hf", probe),
                               atol=LOGPROB_TOL)


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
def test_megatron_on_gpu_matches_hf_in_bf16(gqa_model_path, gqa_adapter, tmp_path):
    """The real thing: CUDA, NCCL, bf16 (TP=2 when two GPUs are there). bench/gpu/megatron_check.py goes further."""
    from src.hf_trainer import HFTrainer

    tp = 2 if torch.cuda.device_count() >= 2 else 1
    server = TrainerServer(gqa_model_path, "megatron", tp, tp, tmp_path / "server.log",
                           "--device", "cuda", "--dtype", "bfloat16")
    try:
        data = make_data(seed=8, n=4, length=64, vocab=515)
        reference = HFTrainer(str(gqa_model_path), device="cuda", dtype="float32")
        results = {}
        for name, trainer in (("megatron", server.client), ("hf", reference)):
            trainer.create_adapter("gpu", LORA)
            trainer.load_state("gpu", gqa_adapter, with_optimizer=False)
            results[name] = trainer.forward_backward("gpu", data, "cross_entropy", None, False)
            trainer.optim_step("gpu", ADAM)
        diff = np.concatenate([a - b for a, b in zip(logprobs_of(results["megatron"]), logprobs_of(results["hf"]))])
        assert np.abs(diff).mean() < 0.02 and np.abs(diff).max() < 0.2  # bf16 against an fp32 reference
        assert results["megatron"].metrics["loss:sum"] == pytest.approx(results["hf"].metrics["loss:sum"], rel=0.01)
    finally:
        server.stop()


def test_without_torchrun_the_heartbeat_notices_a_dead_rank(gqa_model_path, tmp_path):
    """Ranks started by hand (no torchrun agent to stop the others): rank 0's idle heartbeat
    finds the dead rank, reports it on /v1/health and exits."""
    port, master = free_port(), free_port()
    procs = []
    for rank in (0, 1):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(master), "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, "-m", "src.trainer_server", "--engine", "megatron", "--device", "cpu", "--model",
               str(gqa_model_path), "--port", str(port), "--heartbeat-s", "0.5", "--threads", "1"]
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=open(tmp_path / f"rank{rank}.log", "w"),
                                      stderr=subprocess.STDOUT))
    try:
        client = MegatronTrainer(f"http://127.0.0.1:{port}", str(gqa_model_path))
        deadline = time.time() + 120
        while not client.health().get("live"):
            assert time.time() < deadline and procs[0].poll() is None, (tmp_path / "rank0.log").read_text()[-2000:]
            time.sleep(0.3)
        procs[1].kill()
        seen = []
        while procs[0].poll() is None and time.time() < deadline:
            seen.append(client.health())
            time.sleep(0.1)
        assert procs[0].wait(30) != 0
        down = [h for h in seen if not h["live"] and "error" in h]
        assert down and "rank stopped answering" in down[0]["error"], seen[-3:]
        with pytest.raises(BackendError, match="did not answer|down"):
            client.vocab_size()
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()


# ----------------------------------------------------------------------------- the worker in front


def test_worker_trains_through_the_megatron_server_and_samples_its_export(tiny_model_path, tmp_path):
    """What USE_MEGATRON=true builds: the worker's trainer is a MegatronTrainer talking to a
    separate Megatron process (DP=2 here); the tinker SDK drives the worker; the adapter the
    trainer server exports for the sampler is a PEFT folder. Then the trainer dies: the worker says so."""
    import requests
    import tinker
    from tinker import types

    from src.app import create_app
    from src.config import Config
    from src.hf_sampler import HFSampler
    from src.registry import build_trainer
    from src.store import Store
    from src.worker import Worker

    api_key = "tml-trainer-server-test"  # the SDK insists on the tml- prefix
    trainer_server = TrainerServer(tiny_model_path, "megatron", 2, 1, tmp_path / "trainer.log")
    config = Config(base_model=str(tiny_model_path), state_dir=tmp_path / "state", api_keys=(api_key,),
                    port=free_port(), retrieve_wait_s=5.0, use_megatron=True, megatron_server_url=trainer_server.url)
    trainer = build_trainer(config, config.base_model)  # what USE_MEGATRON=true picks
    assert isinstance(trainer, MegatronTrainer)
    worker = Worker(config, trainer, HFSampler(config.base_model, device="cpu"), Store(config.database_path))
    stack = contextlib.ExitStack()
    try:
        url = stack.enter_context(serving(create_app(config, worker), config))
        service = tinker.ServiceClient(base_url=url, api_key=api_key)
        tc = service.create_lora_training_client(base_model=config.base_model, rank=8, seed=0).result()
        tokens = list(range(10, 40))
        datum = types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                            loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)})
        losses = []
        for _ in range(5):
            losses.append(tc.forward_backward([datum, datum], "cross_entropy").result().metrics["loss:sum"])
            tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()  # Tinker scale: 32/8 = 4
        assert losses[-1] < 0.7 * losses[0], losses
        # The sampler's input: a PEFT folder the trainer server wrote where the worker keeps checkpoints.
        saved = tc.save_weights_for_sampler("megatron-export").result()
        folder = Path(worker.store.get_checkpoint(saved.path)["directory"])
        probe = tokens[:12]
        np.testing.assert_allclose(peft_reference_logprobs(tiny_model_path, folder, probe),
                                   trainer.compute_logprobs(tc.model_id, probe), atol=LOGPROB_TOL)

        trainer_server.stop()  # the trainer goes away: no silent fallback, a clear failure
        assert trainer.health()["live"] is False
        health = requests.get(f"{url}/api/v1/healthz", timeout=10).json()
        assert health["status"] == "degraded" and health["trainer_health"]["live"] is False
        body = {"model_id": tc.model_id, "forward_backward_input": {"loss_fn": "cross_entropy", "data": [
            {"model_input": {"chunks": [{"type": "encoded_text", "tokens": tokens[:-1]}]},
             "loss_fn_inputs": {"target_tokens": {"data": tokens[1:], "dtype": "int64"},
                                "weights": {"data": [1.0] * (len(tokens) - 1), "dtype": "float32"}}}]}}
        time.sleep(1.1)  # the worker trusts one trainer health probe for a second
        refused = requests.post(f"{url}/api/v1/forward_backward", json=body, headers={"X-API-Key": api_key},
                                timeout=30)
        assert refused.status_code == 503 and "trainer is down" in refused.json()["error"], refused.text
        # Sampling does not depend on the trainer and keeps working.
        sampled = requests.post(f"{url}/api/v1/sample", headers={"X-API-Key": api_key}, timeout=60, json={
            "model_id": saved.path, "prompts": ["hello"], "sampling_params": {"max_tokens": 3}})
        assert sampled.status_code == 200, sampled.text
    finally:
        stack.close()
        worker.close()
        trainer_server.stop()
