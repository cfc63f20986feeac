"""What sampled logprobs cost on their way from vLLM's EngineCore to the front end, per step and at the end.

No model: vLLM's own output types and wire encoding (MsgpackEncoder / MsgpackDecoder of EngineCoreOutputs),
for R requests decoding S steps with `logprobs=0`, as the scheduler builds them (each request's logprobs a
slice of the step's batch arrays). Timed: the EngineCore's side (the scheduler patched by
src/vllm_logprobs_at_end.py, its requests marked or not, and the encoding) and the front end's (decoding), per step and at the end, against the same steps
without logprobs at all. On an H100 at the 0.5B shape the front end's decoding bounded sampling
(bench/results/sampling_0.5b_run5.txt); this isolates that cost on any machine.

    .venv/bin/python bench/bench_logprob_transport.py --requests 512 --steps 256
"""

from __future__ import annotations

import argparse
import sys
import time
import types
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def run(requests: int, steps: int, mode: str) -> dict[str, float]:
    """Seconds spent encoding (EngineCore) and decoding (front end) S steps of R requests."""
    from vllm.v1.engine import EngineCoreOutput, EngineCoreOutputs, FinishReason
    from vllm.v1.outputs import LogprobsLists
    from vllm.v1.serial_utils import MsgpackDecoder, MsgpackEncoder

    from src import vllm_logprobs_at_end as at_end

    class Scheduler:  # the two methods of vLLM's that the patch wraps
        def __init__(self):
            self.requests = {}

        def add_request(self, request):
            self.requests[request.request_id] = request

        def update_from_output(self, outputs):
            return outputs

    at_end.patch_scheduler(types.SimpleNamespace(Scheduler=Scheduler))
    scheduler, ids = Scheduler(), [f"req-{i}" for i in range(requests)]
    params = types.SimpleNamespace(extra_args={at_end.EXTRA_KEY: True} if mode == "at_end" else None)
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
        front_s += time.perf_counter() - start
    positions = decoded.outputs[0].new_logprobs
    assert mode == "none" or len(positions.logprobs) == (steps if mode == "at_end" else 1)
    return {"engine_s": engine_s, "front_s": front_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=512)
    parser.add_argument("--steps", type=int, default=256)
    args = parser.parse_args()
    results = {mode: run(args.requests, args.steps, mode) for mode in ("none", "per_step", "at_end")}
    print(f"{args.requests} requests x {args.steps} steps, logprobs=0; seconds over all steps")
    print(f"{'logprobs':<10} {'EngineCore (build+hold+encode)':>32} {'front end (decode)':>20}")
    for mode, r in results.items():
        print(f"{mode:<10} {r['engine_s']:>32.3f} {r['front_s']:>20.3f}")
    base, per_step, at_end = results["none"], results["per_step"], results["at_end"]
    print(f"front end: logprobs per step cost {per_step['front_s'] / base['front_s']:.2f}x no logprobs, "
          f"at the end {at_end['front_s'] / base['front_s']:.2f}x; "
          f"EngineCore: {per_step['engine_s'] / base['engine_s']:.2f}x / {at_end['engine_s'] / base['engine_s']:.2f}x")


if __name__ == "__main__":
    main()
