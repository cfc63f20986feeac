"""lm_head LoRA through vLLM vs HF+PEFT, per model family: a *tied* tiny Qwen2 (vLLM 0.26 makes lm_head the
embedding module there), an untied tiny Qwen3 and an untied tiny Llama (Tink's vLLM plugin registers lm_head).

    PYTHONPATH=. python bench/gpu/lm_head_check.py /tmp/lmh [/models/Qwen2.5-0.5B]

Prints, per prompt, the sampled-token logprob gap vLLM vs HF and how far the adapter moves the logprobs from
the base model (several nats: the deltas are really applied); then the same for *prompt* logprobs asked
natively (one prefill, src/vllm_prompt_logprobs.py) by an adapter request and a base request in flight
together, the batch in which vLLM's own per-request lm_head mapping gives one request the other's adapter. On CPU (fp32) every family must be within
1e-4. On GPU both sides run bf16 (vLLM's LoRA kernels refuse fp32) and this adapter moves the logits by
~6 nats, so the gap is bf16 rounding of that size (0.1-0.3 measured on vLLM 0.26, 2026-12-02); there the
untied Llama, whose lm_head LoRA vLLM supports natively, is the control: a Qwen family passes when its gap
is no larger than twice the control's.
"""

import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

if __name__ == "__main__":
    import torch

    from src.backends import AdapterRef, SampleJob, SamplingParams
    from src.hf_sampler import HFSampler
    from src.tiny_model import ensure_tiny_model
    from src.vllm_backend import VLLMEngineSampler
    from tests.vllm_fixtures import make_adapter

    root = Path(sys.argv[1])
    if len(sys.argv) > 2:
        models = {"given": Path(sys.argv[2])}
    else:
        models = {f"{family}{'-tied' if tied else ''}": ensure_tiny_model(root / f"tiny-{family}{tied}", family,
                                                                           tied=tied)
                  for family, tied in (("qwen2", True), ("qwen3", False), ("llama", False))}
    gpu = torch.cuda.is_available()
    # vLLM's GPU LoRA kernels take fp16/bf16 only (lora_shrink asserts it): bf16 there, fp32 on CPU.
    dtype, tolerance = ("bfloat16", 0.05) if gpu else ("float32", 1e-4)
    worst_by_model = {}
    for name, model in models.items():
        ref = AdapterRef(f"tinker://{name}/sampler_weights/000001",
                         make_adapter(model, root / f"adapter-{name}", seed=1), rank=8)
        engine = VLLMEngineSampler(str(model), max_loras=2, max_lora_rank=8, dtype=dtype, max_model_len=512,
                                   gpu_memory_utilization=0.3 if gpu else 0.1, enforce_eager=True)
        hf = HFSampler(str(model), device="cuda" if gpu else "cpu", dtype=dtype)
        worst = 0.0
        for prompt in ([1, 40, 41, 97, 12], [1, 200, 7], [1, 33, 34, 35, 36, 37, 38, 39, 300, 301]):
            job = SampleJob(prompt, 1, SamplingParams(max_tokens=16, temperature=1.0, seed=3), ref)
            seq = engine.sample(job).sequences[0]
            tokens = prompt + seq.tokens
            hf_lp = hf.compute_logprobs(ref, tokens)[len(prompt):]
            base_lp = engine.compute_logprobs(None, tokens)[len(prompt):]
            gap = max(abs(a - b) for a, b in zip(seq.logprobs, hf_lp))
            worst = max(worst, gap)
            moved = max(abs(a - b) for a, b in zip(seq.logprobs, base_lp))
            print(f"{name}: |vLLM-HF| {gap:.2e}  |adapter-base| {moved:.2e}", flush=True)
            pair = [SampleJob(tokens, 1, SamplingParams(max_tokens=1), r, prompt_logprobs=True) for r in (ref, None)]
            with ThreadPoolExecutor(2) as pool:  # both in flight at once: one engine step holds both
                native = [r.prompt_logprobs[1:] for r in pool.map(engine.sample, pair)]
            for label, ours, adapter in (("adapter", native[0], ref), ("base", native[1], None)):
                theirs = hf.compute_logprobs(adapter, tokens)[1:]
                gap = max(abs(a - b) for a, b in zip(ours, theirs))
                worst = max(worst, gap)
                print(f"{name}: prompt logprobs ({engine.prompt_logprobs_mode}, runner {engine.model_runner}), {label} beside "
                      f"the other: |vLLM-HF| {gap:.2e}", flush=True)
        engine.close()
        del hf
        worst_by_model[name] = worst
    control = worst_by_model.get("llama")
    if gpu and control is not None:
        tolerance = max(tolerance, 2 * control)
    failed = [name for name, worst in worst_by_model.items() if worst > tolerance]
    for name, worst in worst_by_model.items():
        print(f"{name}: worst {worst:.2e}", "OK" if worst <= tolerance else f"ABOVE {tolerance:.2e}")
    print("ALL OK" if not failed else f"FAILED {failed}")
