"""What sampled logprobs cost on their way from vLLM's EngineCore to the front end, per step and at the end.

No model: vLLM's own output types and wire encoding (MsgpackEncoder / MsgpackDecoder of EngineCoreOutputs),
for R requests decoding S steps with `logprobs=0`, as the scheduler builds them (each request's logprobs a
slice of the step's batch arrays). Timed: the EngineCore's side (the scheduler patched by
src/vllm_logprobs_at_end.py, its requests marked or not, and the encoding) and the front end's (decoding, then
each request's `LogprobsProcessor` taking its positions, as AsyncLLM's output handler does), per step and at
the end, against the same steps without logprobs at all. `at_end` takes the joined positions in bulk (the
plugin's front-end patch), `at_end_vllm` through vLLM's own per-position loop: the same entries, checked. On
an H100 at the 0.5B shape the front end's decoding bounded sampling (bench/results/sampling_0.5b_run5.txt);
this isolates that cost on any machine. `--repeats K` runs each mode K times (each line printed, the best
compared); `--src DIR` imports Tink's `src` from another checkout, for the EngineCore side before and after a
change (a checkout without the front-end patch takes positions through vLLM's loop in every mode).

    .venv/bin/python bench/bench_logprob_transport.py --requests 512 --steps 256
    git worktree add /tmp/before 82c7da1 && .venv/bin/python bench/bench_logprob_transport.py --repeats 5 --src /tmp/before
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
import types
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def run(requests: int, steps: int, mode: str) -> dict[str, Any]:
    """Seconds spent encoding (EngineCore) and decoding and taking in (front end) S steps of R requests, and
    the first request's logprobs as the front end holds them at the end."""
    from vllm.logprobs import FlatLogprobs
    from vllm.v1.engine import EngineCoreOutput, EngineCoreOutputs, FinishReason
    from vllm.v1.engine import logprobs as front_end
    from vllm.v1.outputs import LogprobsLists
    from vllm.v1.serial_utils import MsgpackDecoder, MsgpackEncoder

    from src import vllm_logprobs_at_end as at_end

    if hasattr(at_end, "patch_logprobs_processor"):  # an older checkout (--src) has no front-end patch
        at_end.patch_logprobs_processor(front_end)
    gc.collect()
    gc.freeze()  # what the EngineCore does once started (vLLM's freeze_gc_heap): only a pass's objects are collected
    take_in = front_end.LogprobsProcessor._update_sample_logprobs
    if mode == "at_end_vllm":
        take_in = getattr(take_in, "vllm_original", take_in)
    with_logprobs = mode != "none"
    processors = [front_end.LogprobsProcessor(tokenizer=None, logprobs=FlatLogprobs() if with_logprobs else None,
                                              prompt_logprobs=None, num_prompt_logprobs=None,
                                              cumulative_logprob=0.0 if with_logprobs else None,
                                              num_logprobs=0 if with_logprobs else None) for _ in range(requests)]

    class Scheduler:  # the two methods of vLLM's that the patch wraps
        def __init__(self):
            self.requests = {}

        def add_request(self, request):
            self.requests[request.request_id] = request

        def update_from_output(self, outputs):
            return outputs

    at_end.patch_scheduler(types.SimpleNamespace(Scheduler=Scheduler))
    scheduler, ids = Scheduler(), [f"req-{i}" for i in range(requests)]
    params = types.SimpleNamespace(extra_args={at_end.EXTRA_KEY: True} if mode.startswith("at_end") else None)
    for rid in ids:
        scheduler.add_request(types.SimpleNamespace(request_id=rid, sampling_params=params))
    encoder, decoder = MsgpackEncoder(), MsgpackDecoder(EngineCoreOutputs)
    rng = np.random.default_rng(0)
    engine_s = front_s = 0.0
    for step in range(steps):
        last = step == steps - 1
        tokens = rng.integers(3, 50_000, requests)
        batch = LogprobsLists(tokens[:, None].astype(np.int32), -rng.random((requests, 1), dtype=np.float32),
                              np.ones(requests, np.int32))
        start = time.perf_counter()
        outputs = [EngineCoreOutput(request_id=rid, new_token_ids=[int(tokens[i])],
                                    new_logprobs=None if mode == "none" else batch.slice_request(i, 1),
                                    finish_reason=FinishReason.LENGTH if last else None)
                   for i, rid in enumerate(ids)]
        if last:
            scheduler.requests.clear()  # vLLM frees finished requests before it returns their outputs
        step_outputs = scheduler.update_from_output({0: EngineCoreOutputs(outputs=outputs)})
        frames = encoder.encode(step_outputs[0])
        engine_s += time.perf_counter() - start
        start = time.perf_counter()
        decoded = decoder.decode(frames)
        for processor, out in zip(processors, decoded.outputs):
            if out.new_logprobs is not None:
                take_in(processor, out.new_logprobs)
        front_s += time.perf_counter() - start
        positions = decoded.outputs[0].new_logprobs
        assert mode == "none" or (positions is not None) == (last or mode == "per_step")
    assert mode == "none" or len(processors[0].logprobs) == steps
    gc.unfreeze()
    return {"engine_s": engine_s, "front_s": front_s, "first": processors[0].logprobs,
            "cumulative": processors[0].cumulative_logprob}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=512)
    parser.add_argument("--steps", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=1, help="runs of each mode (the best is compared)")
    parser.add_argument("--src", default=None, help="a checkout whose src/ to measure instead of this one's")
    args = parser.parse_args()
    if args.src:
        sys.path.insert(0, str(Path(args.src).resolve()))
    modes = ("none", "per_step", "at_end_vllm", "at_end")
    print(f"{args.requests} requests x {args.steps} steps, logprobs=0; seconds over all steps; src from "
          f"{args.src or Path(__file__).resolve().parents[1]}")
    print(f"{'logprobs':<12} {'EngineCore (build+hold+encode)':>32} {'front end (decode+take in)':>28}")
    results = {}
    for mode in modes:
        for _ in range(args.repeats):
            r = run(args.requests, args.steps, mode)
            print(f"{mode:<12} {r['engine_s']:>32.3f} {r['front_s']:>28.3f}")
            best = results.setdefault(mode, r)
            best["engine_s"], best["front_s"] = min(best["engine_s"], r["engine_s"]), min(best["front_s"], r["front_s"])
    base, per_step, vllm_loop, bulk = (results[mode] for mode in modes)
    assert bulk["first"] == vllm_loop["first"] == per_step["first"], "the front end holds other logprobs"
    assert bulk["cumulative"] == vllm_loop["cumulative"] == per_step["cumulative"]
    print(f"front end: logprobs per step cost {per_step['front_s'] / base['front_s']:.2f}x no logprobs, at the end "
          f"{vllm_loop['front_s'] / base['front_s']:.2f}x through vLLM's loop, {bulk['front_s'] / base['front_s']:.2f}x "
          f"in bulk (the same entries); EngineCore: {per_step['engine_s'] / base['engine_s']:.2f}x / "
          f"{bulk['engine_s'] / base['engine_s']:.2f}x")


if __name__ == "__main__":
    main()
