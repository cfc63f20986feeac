"""HFSampler on the real tiny Llama, checked token by token against plain forward passes."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from src.backends import AdapterRef, SampleJob, Sampler, SamplingParams, UserInputError
from src.hf_sampler import HFSampler

PROMPT = [1, 40, 41, 97, 12]
TOL = dict(atol=1e-5, rtol=0)


@pytest.fixture(scope="session")
def sampler(tiny_model_path) -> HFSampler:
    # fp32 on every device, so the exactness checks below hold on a GPU too (auto would pick bf16).
    return HFSampler(str(tiny_model_path), dtype="float32", max_loaded_adapters=2)


@pytest.fixture(scope="session")
def base(tiny_model_path):
    return AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def tokenizer(tiny_model_path):
    return AutoTokenizer.from_pretrained(tiny_model_path)


def make_adapter(model_path: Path, out: Path, seed: int) -> Path:
    """A PEFT folder with random, non-zero A and B (so it really changes the model)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj", "lm_head"],
                        init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.1)
    peft_model.save_pretrained(out, save_embedding_layers=False)  # lm_head's LoRA only, as Tink's trainer writes
    return out


@pytest.fixture(scope="session")
def adapters(tiny_model_path, tmp_path_factory) -> dict[str, tuple[AdapterRef, torch.nn.Module]]:
    """Two adapters (names with dots and slashes, as the worker makes them) and their PeftModel references."""
    from peft import PeftModel

    out = {}
    for key, seed in (("a", 1), ("b", 2), ("c", 3)):
        path = make_adapter(tiny_model_path, tmp_path_factory.mktemp(f"adapter-{key}"), seed)
        ref = AdapterRef(name=f"tinker://run-1/sampler_weights/{key}.ckpt@v1", path=path, rank=4)
        reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_path,
                                                                                   dtype=torch.float32), path)
        out[key] = (ref, reference.eval())
    return out


def logits_of(model, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([tokens])).logits[0].float()


def completion_logprobs(model, prompt: list[int], tokens: list[int], temperature: float = 1.0) -> list[float]:
    """log_softmax(logits / T) of each completion token, from one forward pass over prompt + completion."""
    logits = logits_of(model, prompt + tokens)[len(prompt) - 1: -1] / temperature
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(tokens)[:, None])[:, 0].tolist()


def greedy_reference(model, prompt: list[int], n: int) -> tuple[list[int], list[float]]:
    """A plain argmax loop, recomputing the whole sequence each step (no cache)."""
    tokens, logprobs = list(prompt), []
    for _ in range(n):
        logits = logits_of(model, tokens)[-1]
        token = int(logits.argmax())
        logprobs.append(float(torch.log_softmax(logits, -1)[token]))
        tokens.append(token)
    return tokens[len(prompt):], logprobs


def sample(sampler, prompt=PROMPT, n=1, adapter=None, prompt_logprobs=False, **params):
    return sampler.sample(SampleJob(list(prompt), n, SamplingParams(**params), adapter, prompt_logprobs))


def test_implements_sampler(sampler):
    assert isinstance(sampler, Sampler)
    assert sampler.health() == {"live": True, "backend": "hf", "base_model": sampler.base_model,
                                "device": str(sampler.device), "loaded_adapters": len(sampler.loaded_adapters()),
                                "base_weights": "own copy"}


def test_greedy_matches_argmax_loop(sampler, base):
    tokens, logprobs = greedy_reference(base, PROMPT, 8)
    result = sample(sampler, n=3, max_tokens=8, temperature=0.0)
    for seq in result.sequences:
        assert seq.tokens == tokens and seq.stop_reason == "length"
        assert all(isinstance(x, float) for x in seq.logprobs)
        torch.testing.assert_close(torch.tensor(seq.logprobs), torch.tensor(logprobs), **TOL)
    single = sample(sampler, prompt=[PROMPT[0]], max_tokens=4, temperature=0.0).sequences[0]
    assert single.tokens == greedy_reference(base, [PROMPT[0]], 4)[0]


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampled_logprobs_are_of_the_tempered_distribution(sampler, base, temperature):
    result = sample(sampler, n=4, max_tokens=6, temperature=temperature, seed=11)
    assert len({tuple(s.tokens) for s in result.sequences}) > 1  # rows are independent draws
    for seq in result.sequences:
        expected = completion_logprobs(base, PROMPT, seq.tokens, temperature)
        torch.testing.assert_close(torch.tensor(seq.logprobs), torch.tensor(expected), **TOL)


def test_top_k_restricts_and_renormalises(sampler, base):
    seq = sample(sampler, max_tokens=6, temperature=0.7, top_k=3, seed=5).sequences[0]
    logits = logits_of(base, PROMPT + seq.tokens)[len(PROMPT) - 1: -1] / 0.7
    top = logits.topk(3, -1)
    for step, token in enumerate(seq.tokens):
        assert token in top.indices[step].tolist()
        expected = torch.log_softmax(top.values[step], -1)[top.indices[step].tolist().index(token)]
        assert abs(seq.logprobs[step] - float(expected)) < 1e-5


def test_top_p_keeps_only_the_nucleus(sampler, base):
    seq = sample(sampler, max_tokens=6, top_p=1e-6, seed=5).sequences[0]  # a tiny nucleus: the argmax alone
    assert seq.tokens == greedy_reference(base, PROMPT, 6)[0]
    assert seq.logprobs == [0.0] * 6


def test_seed_reproduces(sampler):
    first = sample(sampler, n=3, max_tokens=8, seed=1234)
    again = sample(sampler, n=3, max_tokens=8, seed=1234)
    other = sample(sampler, n=3, max_tokens=8, seed=4321)
    assert [s.tokens for s in first.sequences] == [s.tokens for s in again.sequences]
    assert [s.logprobs for s in first.sequences] == [s.logprobs for s in again.sequences]
    assert [s.tokens for s in first.sequences] != [s.tokens for s in other.sequences]
    assert sample(sampler, max_tokens=2, seed=-1).sequences[0].tokens  # any int is a seed


def test_stop_token_and_max_tokens(sampler, base):
    greedy, _ = greedy_reference(base, PROMPT, 8)
    stop = greedy[3]
    cut = greedy.index(stop) + 1
    seq = sample(sampler, max_tokens=8, temperature=0.0, stop_token_ids=(stop,)).sequences[0]
    assert (seq.tokens, seq.stop_reason, len(seq.logprobs)) == (greedy[:cut], "stop", cut)
    seq = sample(sampler, max_tokens=2, temperature=0.0).sequences[0]
    assert (seq.tokens, seq.stop_reason) == (greedy[:2], "length")


def test_stop_string_ends_at_the_completing_token(sampler, base, tokenizer):
    # The random model emits many byte fragments; find a prompt whose greedy text has two clean
    # characters across a token boundary (the last of token k-1's text, the first of token k's).
    for prompt in (PROMPT, [1, 450, 460], [1, 300, 301, 302]):
        greedy, _ = greedy_reference(base, prompt, 8)
        texts = [tokenizer.decode(greedy[:k], skip_special_tokens=True) for k in range(9)]
        pairs = [texts[k - 1][-1] + texts[k][len(texts[k - 1])] for k in range(2, 9)
                 if texts[k - 1] and texts[k].startswith(texts[k - 1]) and len(texts[k]) > len(texts[k - 1])]
        pairs = [p for p in pairs if "\ufffd" not in p]
        if pairs:
            break
    assert pairs, "no prompt gave a clean stop string"
    cut = next(k for k in range(1, 9) if pairs[0] in texts[k])
    seq = sample(sampler, prompt=prompt, max_tokens=8, temperature=0.0,
                 stop_strings=("never-there", pairs[0])).sequences[0]
    assert (seq.tokens, seq.stop_reason) == (greedy[:cut], "stop")
    assert cut < 8


@pytest.mark.parametrize("file", ["config.json", "generation_config.json"])
def test_eos_stops_unless_stop_at_eos_is_false(sampler, base, tiny_model_path, tmp_path, file):
    greedy, _ = greedy_reference(base, PROMPT, 6)
    eos = greedy[2]
    cut = greedy.index(eos) + 1
    # The same weights with one more EOS id, one the greedy decode is known to produce; instruct
    # models often list their end-of-turn token in generation_config.json alone.
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_path, folder)
    config = json.loads((folder / file).read_text())
    (folder / file).write_text(json.dumps({**config, "eos_token_id": [config["eos_token_id"], eos]}))
    other = HFSampler(str(folder), dtype="float32")
    seq = sample(other, max_tokens=6, temperature=0.0).sequences[0]
    assert (seq.tokens, seq.stop_reason) == (greedy[:cut], "stop")
    seq = sample(other, max_tokens=6, temperature=0.0, stop_at_eos=False).sequences[0]
    assert (seq.tokens, seq.stop_reason) == (greedy, "length")
    other.close()
    assert other.health()["live"] is False


def test_prompt_logprobs_match_forward(sampler, base):
    result = sample(sampler, max_tokens=1, prompt_logprobs=True)
    logprobs = torch.log_softmax(logits_of(base, PROMPT)[:-1], -1).gather(-1, torch.tensor(PROMPT[1:])[:, None])
    assert result.prompt_logprobs[0] is None and len(result.prompt_logprobs) == len(PROMPT)
    torch.testing.assert_close(torch.tensor(result.prompt_logprobs[1:]), logprobs[:, 0], **TOL)
    assert sampler.compute_logprobs(None, PROMPT) == result.prompt_logprobs
    assert sampler.compute_logprobs(None, [7]) == [None]
    assert sample(sampler, max_tokens=1).prompt_logprobs is None


def test_adapter_changes_output_and_matches_peft(sampler, base, adapters):
    ref, reference = adapters["a"]
    seq = sample(sampler, max_tokens=6, temperature=0.0, adapter=ref).sequences[0]
    tokens, logprobs = greedy_reference(reference, PROMPT, 6)
    assert seq.tokens == tokens
    torch.testing.assert_close(torch.tensor(seq.logprobs), torch.tensor(logprobs), **TOL)
    assert (tokens, logprobs) != greedy_reference(base, PROMPT, 6)
    prompt_lps = sampler.compute_logprobs(ref, PROMPT)
    expected = torch.log_softmax(logits_of(reference, PROMPT)[:-1], -1).gather(-1, torch.tensor(PROMPT[1:])[:, None])
    torch.testing.assert_close(torch.tensor(prompt_lps[1:]), expected[:, 0], **TOL)


def test_adapters_and_base_alternate(sampler, base, adapters):
    expected = {key: greedy_reference(model, PROMPT, 5)[0] for key, (_, model) in adapters.items()}
    expected[None] = greedy_reference(base, PROMPT, 5)[0]
    for key in ["a", "b", None, "a", "b", "b", None, "a"]:
        ref = adapters[key][0] if key else None
        assert sample(sampler, max_tokens=5, temperature=0.0, adapter=ref).sequences[0].tokens == expected[key]


def test_lru_eviction_and_reload(sampler, adapters):
    (a, model_a), (b, _), (c, _) = adapters["a"], adapters["b"], adapters["c"]
    for ref in (a, b, a, c):  # a is used after b, so b is the least recently used when c arrives
        sample(sampler, max_tokens=1, adapter=ref)
    assert sampler.loaded_adapters() == [a.name, c.name]
    sample(sampler, max_tokens=1, adapter=b)
    assert sampler.loaded_adapters() == [c.name, b.name]
    seq = sample(sampler, max_tokens=4, temperature=0.0, adapter=a).sequences[0]  # reloaded, still right
    assert seq.tokens == greedy_reference(model_a, PROMPT, 4)[0]


def test_concurrent_jobs_are_served_correctly(sampler, base, adapters):
    targets = [adapters["a"][0], None, adapters["b"][0], None]
    expected = [sample(sampler, max_tokens=4, temperature=0.0, adapter=t).sequences[0].tokens for t in targets]
    got: dict[int, list[int]] = {}

    def work(i: int) -> None:
        got[i] = sample(sampler, max_tokens=4, temperature=0.0, adapter=targets[i]).sequences[0].tokens

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(targets))]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert [got[i] for i in range(len(targets))] == expected


@pytest.mark.parametrize("prompt, params, field", [
    ([], {}, "prompt"),
    ([1, -1], {}, "prompt"),
    ([1, 512], {}, "prompt"),
    (PROMPT, {"max_tokens": 0}, "sampling_params.max_tokens"),
    (PROMPT, {"temperature": -0.5}, "sampling_params.temperature"),
    (PROMPT, {"top_p": 0.0}, "sampling_params.top_p"),
    (PROMPT, {"top_k": -2}, "sampling_params.top_k"),
])
def test_bad_inputs_name_the_field(sampler, prompt, params, field):
    with pytest.raises(UserInputError) as info:
        sample(sampler, prompt=prompt, **params)
    assert info.value.field == field


def test_bad_num_samples_and_missing_adapter(sampler, tmp_path):
    with pytest.raises(UserInputError) as info:
        sample(sampler, n=0)
    assert info.value.field == "num_samples"
    with pytest.raises(UserInputError) as info:
        sample(sampler, adapter=AdapterRef("tinker://gone@v1", tmp_path / "gone", 4))
    assert info.value.field == "model_path"
    with pytest.raises(UserInputError) as info:
        sampler.compute_logprobs(None, [])
    assert info.value.field == "prompt"
