"""Sampled logprobs sent once per request, at its end (src/vllm_logprobs_at_end.py).

The scheduler patch on vLLM's own output types and wire encoding (no engine), then the real engine: the
same seeded tokens and logprobs with the patch's marker on and off, many requests held at once.
"""

from __future__ import annotations

import types

import numpy as np
import pytest

from src.backends import SampleJob, SamplingParams
from tests import vllm_fixtures
from tests.vllm_fixtures import requires_vllm

vllm_adapters, vllm_engine = vllm_fixtures.vllm_adapters, vllm_fixtures.vllm_engine  # session fixtures

pytestmark = [pytest.mark.vllm, requires_vllm]


def patched_scheduler(marked: set[str] = frozenset(), unmarked: set[str] = frozenset(), steps=None):
    """A scheduler with the two methods the patch wraps, patched: `add_request` keeps the request (vLLM's
    keeps its live ones in `requests`), `update_from_output` returns the next of `steps` or its argument."""
    from src import vllm_logprobs_at_end as at_end

    class Scheduler:
        def __init__(self):
            self.requests = {}

        def add_request(self, request):
            self.requests[request.request_id] = request

        def update_from_output(self, outputs=None):
            return next(steps) if steps is not None else outputs

    at_end.patch_scheduler(types.SimpleNamespace(Scheduler=Scheduler))
    scheduler = Scheduler()
    for rid in sorted(marked | unmarked):
        extra = {"tink_logprobs_at_end": True} if rid in marked else None
        scheduler.add_request(types.SimpleNamespace(request_id=rid,
                                                    sampling_params=types.SimpleNamespace(extra_args=extra)))
    return scheduler


def step_outputs(tokens: dict[str, int], finished: set[str] = frozenset()):
    """One step's EngineCoreOutputs as vLLM's scheduler builds them: every request's logprobs are a slice
    (`slice_request`) of the step's batch arrays. Token t has logprob -t / 10 and rank t % 3."""
    from vllm.v1.engine import EngineCoreOutput, EngineCoreOutputs, FinishReason
    from vllm.v1.outputs import LogprobsLists

    ids = np.array([[t] for t in tokens.values()], dtype=np.int32)
    batch = LogprobsLists(ids, -ids.astype(np.float32) / 10, (ids[:, 0] % 3).astype(np.int32))
    outs = [EngineCoreOutput(request_id=rid, new_token_ids=[t], new_logprobs=batch.slice_request(i, 1),
                             finish_reason=FinishReason.LENGTH if rid in finished else None)
            for i, (rid, t) in enumerate(tokens.items())]
    return {0: EngineCoreOutputs(outputs=outs)}


def test_steps_of_different_widths_join_at_the_requests_own_width():
    """A step's arrays are as wide as the largest top-k of its batch: a request asking for 1 top logprob beside
    one asking for 5 gets 6 columns, then 2 once that one has ended. Joined, every position keeps the
    sampled token and the request's own top-1, which is all the front end reads."""
    from vllm.v1.outputs import LogprobsLists

    from src import vllm_logprobs_at_end as at_end

    def step(width: int, token: int) -> LogprobsLists:
        ids = np.array([[token] + list(range(100, 100 + width - 1))], dtype=np.int32)
        return LogprobsLists(ids, -ids.astype(np.float32) / 10, np.array([1], dtype=np.int32))

    held = [step(6, 5), step(6, 7)]
    columns = tuple([getattr(s, name) for s in held] for name in ("logprob_token_ids", "logprobs", "sampled_token_ranks"))
    joined = at_end._joined(columns, step(2, 9))
    assert joined.logprob_token_ids.tolist() == [[5, 100], [7, 100], [9, 100]]
    assert joined.logprobs.shape == (3, 2) and joined.sampled_token_ranks.tolist() == [1, 1, 1]


def by_request(outputs) -> dict:
    return {out.request_id: out for out in outputs[0].outputs}


def test_marked_requests_get_every_position_with_their_last_output():
    from vllm.v1.engine import EngineCoreOutputs
    from vllm.v1.serial_utils import MsgpackDecoder, MsgpackEncoder

    from src import vllm_logprobs_at_end as at_end

    scheduler = patched_scheduler(marked={"a", "c"}, unmarked={"b"})
    first = scheduler.update_from_output(step_outputs({"a": 5, "b": 6, "c": 7}))
    out = by_request(first)
    assert out["a"].new_logprobs is None and out["c"].new_logprobs is None, "held back in the EngineCore"
    assert out["b"].new_logprobs.logprob_token_ids.tolist() == [[6]], "an unmarked request is left alone"

    del scheduler.requests["a"]  # vLLM frees a finished request before it returns the step's outputs
    second = scheduler.update_from_output(step_outputs({"a": 8, "b": 9, "c": 4}, finished={"a"}))
    last = by_request(second)["a"].new_logprobs
    assert last.logprob_token_ids.tolist() == [[5], [8]]
    assert last.logprobs[:, 0].tolist() == pytest.approx([-0.5, -0.8])
    assert last.sampled_token_ranks.tolist() == [2, 2] and last.logprob_token_ids.dtype == np.int32

    # The front end decodes what the EngineCore sends: the joined positions survive vLLM's wire format.
    encoded = MsgpackEncoder().encode(EngineCoreOutputs(outputs=second[0].outputs))
    decoded = by_request({0: MsgpackDecoder(EngineCoreOutputs).decode(encoded)})
    assert decoded["a"].new_logprobs.logprobs.shape == (2, 1) and decoded["c"].new_logprobs is None

    del scheduler.requests["c"]  # aborted: no last output will come
    scheduler.update_from_output(step_outputs({"b": 3}))
    assert not scheduler.__dict__[at_end._HELD], "an aborted request's rows are dropped"


def test_a_request_done_in_one_step_passes_through():
    scheduler = patched_scheduler(marked={"a"})
    del scheduler.requests["a"]  # already freed when the patch sees its output
    outputs = scheduler.update_from_output(step_outputs({"a": 5}, finished={"a"}))
    assert by_request(outputs)["a"].new_logprobs.logprob_token_ids.tolist() == [[5]]


def test_a_failure_stops_new_holds_and_finishes_the_held(caplog):
    """The patch never takes the engine down: after an error it holds nothing new, and the requests it holds
    still get every position with their last output."""
    from src import vllm_logprobs_at_end as at_end

    steps = iter([step_outputs({"a": 5}), {0: object()}, step_outputs({"a": 8, "d": 2}, finished={"a"}),
                  step_outputs({"d": 3})])
    scheduler = patched_scheduler(marked={"a"}, steps=steps)
    try:
        assert by_request(scheduler.update_from_output())["a"].new_logprobs is None
        scheduler.update_from_output()  # an output the patch cannot read
        assert at_end._disabled and "turned off" in caplog.text
        scheduler.add_request(types.SimpleNamespace(request_id="d", sampling_params=types.SimpleNamespace(
            extra_args={"tink_logprobs_at_end": True})))  # marked by Tink, but arriving after the error
        del scheduler.requests["a"]
        finished = by_request(scheduler.update_from_output())
        assert finished["a"].new_logprobs.logprob_token_ids.tolist() == [[5], [8]], "the held request completes"
        assert finished["d"].new_logprobs is not None, "nothing new is held"
        assert by_request(scheduler.update_from_output())["d"].new_logprobs is not None
    finally:
        at_end._disabled = False


def test_the_plugin_patches_the_scheduler(vllm_engine):
    """Once the plugin registered in a process (the engine's start did here), vLLM's scheduler carries the
    patch as soon as it is imported, as in the EngineCore process."""
    import vllm.v1.core.sched.scheduler as scheduler_module

    assert getattr(scheduler_module.Scheduler, "_tink_logprobs_at_end", False)


def front_end_processor(num_logprobs: int, flat: bool = True, cumulative: float = 0.25):
    """vLLM's LogprobsProcessor of one request that asked `num_logprobs` top logprobs, no detokenizing."""
    from vllm.logprobs import FlatLogprobs
    from vllm.v1.engine.logprobs import LogprobsProcessor

    return LogprobsProcessor(tokenizer=None, logprobs=FlatLogprobs() if flat else [], prompt_logprobs=None,
                             cumulative_logprob=cumulative, num_logprobs=num_logprobs, num_prompt_logprobs=None)


def joined_positions(positions: int, width: int, seed: int = 0):
    """A request's joined LogprobsLists: each position's sampled token first, then `width - 1` others."""
    from vllm.v1.outputs import LogprobsLists

    rng = np.random.default_rng(seed)
    return LogprobsLists(rng.integers(3, 50_000, (positions, width)).astype(np.int32),
                         -rng.random((positions, width), dtype=np.float32) * 9,
                         rng.integers(1, 40, positions).astype(np.int32), None)


def one_position_at_a_time(processor, lists) -> None:
    """vLLM's own path: a single position is never taken in bulk."""
    from vllm.v1.outputs import LogprobsLists

    for p in range(len(lists.logprobs)):
        processor._update_sample_logprobs(LogprobsLists(lists.logprob_token_ids[p:p + 1], lists.logprobs[p:p + 1],
                                                        lists.sampled_token_ranks[p:p + 1], None))


@pytest.mark.parametrize("positions,width,num_logprobs", [(256, 1, 0), (7, 4, 0), (33, 4, 3), (5, 6, 2), (2, 3, 5)])
def test_the_front_end_takes_joined_positions_in_bulk_as_vllm_does(vllm_engine, positions, width, num_logprobs):
    """The plugin's front-end patch (registered in this process when the engine started): a request's joined
    positions go into its FlatLogprobs in one go, with exactly the entries, ranks and running cumulative
    logprob that vLLM's per-position loop gives, for top-k of 0 and more, on arrays wider than it (a batch
    whose widest top-k was larger) and narrower (a cut join)."""
    from vllm.v1.engine.logprobs import LogprobsProcessor

    from src import vllm_logprobs_at_end as at_end

    assert getattr(LogprobsProcessor, "_tink_logprobs_at_end", False), "the plugin patched vLLM's front end"
    lists = joined_positions(positions, width)
    bulk, loop = front_end_processor(num_logprobs), front_end_processor(num_logprobs)
    assert at_end.bulk_append(front_end_processor(num_logprobs), lists), "taken in bulk"
    bulk._update_sample_logprobs(lists)
    one_position_at_a_time(loop, lists)
    assert bulk.logprobs == loop.logprobs and len(bulk.logprobs) == positions
    assert bulk.logprobs.start_indices == loop.logprobs.start_indices
    assert bulk.logprobs.end_indices == loop.logprobs.end_indices
    assert bulk.cumulative_logprob == loop.cumulative_logprob  # the same float, added in the same order


def test_the_front_end_leaves_what_it_does_not_expect_to_vllm(vllm_engine):
    """One position, a spec-decode layout (positions per request), dict-style logprobs, or all top logprobs
    (-1): no bulk path, nothing changed; the patched method then gives vLLM's own result."""
    from vllm.v1.outputs import LogprobsLists

    from src import vllm_logprobs_at_end as at_end

    lists = joined_positions(6, 2)
    spec_decode = LogprobsLists(*lists[:3], [0, 3, 6])
    for processor, given in ((front_end_processor(0), joined_positions(1, 1)), (front_end_processor(0), spec_decode),
                             (front_end_processor(-1), lists)):
        assert not at_end.bulk_append(processor, given) and len(processor.logprobs) == 0
    odd = front_end_processor(0)  # a layout bulk_append cannot read: vLLM's loop takes it, nothing is lost
    odd._update_sample_logprobs(LogprobsLists(lists.logprob_token_ids, lists.logprobs, list(lists.sampled_token_ranks)))
    assert len(odd.logprobs) == 6
    as_dicts, loop = front_end_processor(1, flat=False), front_end_processor(1, flat=False)
    as_dicts._update_sample_logprobs(lists)
    one_position_at_a_time(loop, lists)
    assert as_dicts.logprobs == loop.logprobs and len(as_dicts.logprobs) == 6


def test_logprobs_at_end_give_the_same_results(vllm_engine, vllm_adapters, monkeypatch):
    """The same seeded tokens and logprobs with the marker on and off: n = 4 sequences held at once per job,
    two adapters and the base model, top-k logprobs, and a stop-string job (never marked)."""
    params = SamplingParams(max_tokens=24, temperature=1.0, seed=7, stop_at_eos=False)
    jobs = [SampleJob([1, 40, 41, 97, 12], 4, params, vllm_adapters["a"]),
            SampleJob([1, 200, 7], 4, params, vllm_adapters["b"]),
            SampleJob([1, 33, 34, 35], 4, params, None, topk_sample_logprobs=3),
            SampleJob([1, 60, 61], 2, SamplingParams(max_tokens=24, temperature=1.0, seed=7, stop_at_eos=False,
                                                     stop_strings=("zz",)), None)]
    results = {}
    for at_end in (False, True):
        monkeypatch.setattr(vllm_engine, "logprobs_at_end", at_end)
        assert vllm_engine.health()["logprobs_at_end"] is at_end
        results[at_end] = [vllm_engine.sample(job) for job in jobs]
    for per_step, at_end in zip(results[False], results[True]):
        for a, b in zip(per_step.sequences, at_end.sequences):
            assert a.tokens == b.tokens and len(b.logprobs) == len(b.tokens) == 24
            assert a.logprobs == pytest.approx(b.logprobs, abs=1e-6)
            assert a.topk_logprobs == b.topk_logprobs
    assert results[True][2].sequences[0].topk_logprobs, "the top-k job returned its top-k logprobs"


def test_the_transport_benchmark_sends_every_position():
    """bench/bench_logprob_transport.py (in `make bench`) on a few requests: what it times is what the engine
    sends, every step's position at the end with the patch and one per step without."""
    import importlib.util

    from tests.conftest import REPO

    spec = importlib.util.spec_from_file_location("bench_logprob_transport", REPO / "bench/bench_logprob_transport.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    runs = {mode: bench.run(requests=8, steps=5, mode=mode) for mode in ("none", "per_step", "at_end_vllm", "at_end")}
    for timings in runs.values():
        assert timings["engine_s"] > 0 and timings["front_s"] > 0
    assert runs["at_end"]["first"] == runs["at_end_vllm"]["first"] == runs["per_step"]["first"]
    assert len(runs["at_end"]["first"]) == 5
