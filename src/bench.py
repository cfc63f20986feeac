"""`tink bench`: a worker's throughput through the Tinker API, as its clients see it.

Training: `rounds` times one `forward_backward` (cross_entropy) of `batch` datums of `seq_len`
random tokens, then `optim_step`. Sampling: `rounds` times `prompts` sample requests of
`samples` completions × `max_tokens` tokens each, sent together (one GRPO step's shape). The
numbers include everything a client pays: HTTP, queueing, futures, the SDK itself.

    tink bench                                    # starts a worker on TINK_BASE_MODEL (the tiny model)
    tink bench --url http://127.0.0.1:8000        # a running worker (TINKER_API_KEY if it checks keys)

`bench/bench_sampling.py` measures the vLLM sampler alone against direct `LLM.generate`.
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class BenchShape:
    rounds: int = 3
    batch: int = 8
    seq_len: int = 128
    prompts: int = 8
    samples: int = 4
    max_tokens: int = 32
    rank: int = 16
    seed: int = 0


@dataclass(frozen=True)
class BenchResult:
    train_tokens_per_s: float
    train_step_p50_s: float  # one forward_backward + optim_step
    sample_tokens_per_s: float
    sample_round_p50_s: float  # all of one round's sample requests

    def lines(self) -> list[str]:
        return [f"train   : {self.train_tokens_per_s:10.1f} tokens/s   step p50 {self.train_step_p50_s:.3f} s",
                f"sample  : {self.sample_tokens_per_s:10.1f} tokens/s   round p50 {self.sample_round_p50_s:.3f} s"]


def run_bench(base_url: str, api_key: str, shape: BenchShape,
              advance: Callable[[str], None] = lambda phase: None) -> BenchResult:
    """Measure the worker at `base_url`; `advance(phase)` is called after each timed round."""
    import tinker
    from tinker import types

    service = tinker.ServiceClient(base_url=base_url, api_key=api_key)
    try:
        capabilities = tinker.RestClient(base_url=base_url, api_key=api_key).get_server_capabilities().result()
        base_model = capabilities.supported_models[0].model_name
        trainer = service.create_lora_training_client(base_model=base_model, rank=shape.rank, seed=shape.seed).result()
        vocab = len(trainer.get_tokenizer())
        rng = random.Random(shape.seed)
        data = [_datum(types, [rng.randrange(vocab) for _ in range(shape.seq_len + 1)]) for _ in range(shape.batch)]

        train_times = []
        for _ in range(shape.rounds):
            started = time.perf_counter()
            backward = trainer.forward_backward(data, "cross_entropy")
            trainer.optim_step(types.AdamParams(learning_rate=1e-4)).result()
            backward.result()
            train_times.append(time.perf_counter() - started)
            advance("train")

        sampler = trainer.save_weights_and_get_sampling_client().result()
        prompts = [types.ModelInput.from_ints([rng.randrange(vocab) for _ in range(16)]) for _ in range(shape.prompts)]
        params = types.SamplingParams(max_tokens=shape.max_tokens, temperature=1.0)
        sample_times, sampled = [], 0
        for _ in range(shape.rounds):
            started = time.perf_counter()
            futures = [sampler.sample(prompt, shape.samples, params) for prompt in prompts]
            sampled += sum(len(seq.tokens) for future in futures for seq in future.result().sequences)
            sample_times.append(time.perf_counter() - started)
            advance("sample")
    finally:
        service.close("success").result()
    trained = shape.rounds * shape.batch * shape.seq_len
    return BenchResult(trained / sum(train_times), statistics.median(train_times),
                       sampled / sum(sample_times), statistics.median(sample_times))


def _datum(types, tokens: list[int]):
    return types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                       loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)})
