"""Many adapters, one pass: joined `forward_backward` of several models vs the same requests one by one.

The HF trainer on CPU (fp32), as a shared worker sees it: `--models` users, each with its own LoRA
and `--seqs` sequences, run either one request at a time (TINK_BATCH_ADAPTERS=false) or as one joined
pass (`HFTrainer.forward_backward_many`, what the scheduler runs when the requests wait together).
Two shapes in one run: the embedded tiny Llama and a larger CPU-feasible one. Each line also gives
the largest relative difference of any LoRA gradient and any logprob between the two ways.

`--noise-floor` says how much of that difference is mere rounding: the first model's request runs
again alone, but laid out as in the joined pass (its datums first, then every other model's datums
with loss weight 0), so its micro-batches have the joined pass's rows and lengths while the math and
the adapter path are those of the lone request. Its difference from the lone run is the noise floor;
joined vs alone (first model) well above it points at the routing, near it at the batch shape.

    .venv/bin/python bench/bench_multi_adapter.py                     # 8 models x 8 sequences, both shapes
    .venv/bin/python bench/bench_multi_adapter.py --models 4 --seqs 16 --repeats 5
    .venv/bin/python bench/bench_multi_adapter.py --device cuda --dtype bfloat16   # where a GPU is
    .venv/bin/python bench/bench_multi_adapter.py --dtype bfloat16 --checkpointing true --noise-floor
    python3 bench/bench_multi_adapter.py --device cuda --dtype bfloat16 --shapes /tmp/b-7b/model-7b \
        --seqs 8 --min-len 512 --max-len 512 --rank 32 --checkpointing auto   # the issue's 8 x 8 x 512 at 7B

"scheduled" is what the worker runs with TINK_BATCH_ADAPTERS=true: requests join only while the joined
pass fits one micro-batch, so at 7B (8 x 512 tokens already fill one) each runs alone, and at 0.5B they
join in passes of a micro-batch each.

"1 adapter" is the issue's reference: all the sequences as one request of one model.

Seen on a shared 2-core CPU (2026-12-02, noisy): the joined pass is exact (max relative difference
<= 7e-7) but not faster there: 0.65x-1.5x for forward_backward and 0.95x-1.3x for forward across
runs; larger micro-batches cost more per token on a CPU. Hence TINK_BATCH_ADAPTERS is off by default
until a GPU run shows the gain. With the grouped LoRA product (equal slices: two bmm per layer, not a
pair per adapter) the joined pass reached 0.84x-0.94x of 1 adapter on that CPU, from 0.24x-0.64x
(bench/results/THROUGHPUT_RESULTS.md).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from src.backends import ForwardBackwardResult, LoraSpec, TrainDatum  # noqa: E402
from src.hf_trainer import HFTrainer  # noqa: E402
from src.multi_adapter import AdapterPass, PassJoiner  # noqa: E402
from src.scheduling import joined_shape  # noqa: E402
from src.tiny_model import build_model, build_tokenizer, ensure_tiny_model  # noqa: E402

SHAPES = {"tiny": {"layers": 2, "hidden": 128}, "small": {"layers": 6, "hidden": 512}}


def model_folder(shape: str, root: Path) -> str:
    if Path(shape).is_dir():  # a model folder, e.g. the GPU bench's 0.5B- or 7B-shaped one
        return shape
    if shape == "tiny":
        return str(ensure_tiny_model(root / "tiny-llama"))
    tokenizer = build_tokenizer()
    build_model(tokenizer, **SHAPES[shape]).save_pretrained(root / shape)
    tokenizer.save_pretrained(root / shape)
    return str(root / shape)


def make_passes(trainer: HFTrainer, args, shape: str) -> list[AdapterPass]:
    rng = np.random.default_rng(0)
    passes = []
    for m in range(args.models):
        model_id = f"{shape}-user{m}"
        trainer.create_adapter(model_id, LoraSpec(rank=args.rank, seed=m))
        with torch.no_grad():  # B != 0, as after a few steps, so every factor gets a gradient
            for p in trainer.adapter_parameters(model_id):
                p.normal_(0, 0.02)
        data = []
        for _ in range(args.seqs):
            n = int(rng.integers(args.min_len, args.max_len + 1))
            data.append(TrainDatum(rng.integers(1, 500, n).tolist(),
                                   {"target_tokens": rng.integers(1, 500, n), "weights": np.ones(n, np.float32)}))
        passes.append(AdapterPass(model_id, data, "cross_entropy", None))
    return passes


def clear(trainer: HFTrainer, passes: list[AdapterPass]) -> None:
    for p in passes:
        for t in trainer.adapter_parameters(p.model_id):
            t.grad = None


def one_by_one(trainer: HFTrainer, passes: list[AdapterPass], forward_only: bool) -> list:
    return [trainer.forward_backward(p.model_id, p.data, p.loss_fn, p.loss_fn_config, forward_only) for p in passes]


def joined(trainer: HFTrainer, passes: list[AdapterPass], forward_only: bool) -> list:
    return trainer.forward_backward_many(passes, forward_only)


def scheduled_groups(trainer: HFTrainer, passes: list[AdapterPass]) -> list[list[int]]:
    """The passes the worker's scheduler forms when all the requests wait at once: each head takes the
    others in order while the joined pass fits one micro-batch (`PassJoiner.token_limit`)."""
    limit = PassJoiner(lambda: trainer, lambda _: None, len(passes), 1 << 40).token_limit
    shapes = [(len(p.data), max(len(d.tokens) for d in p.data)) for p in passes]  # (rows, longest)
    waiting, groups = list(range(len(passes))), []
    while waiting:
        group = [waiting.pop(0)]
        rows, longest = shapes[group[0]]
        for i in list(waiting):
            grown = joined_shape(rows, longest, *shapes[i], limit)
            if grown is not None:
                group.append(i)
                waiting.remove(i)
                rows, longest = grown
        groups.append(group)
    return groups


def scheduled(trainer: HFTrainer, passes: list[AdapterPass], forward_only: bool) -> list:
    """Each scheduled group in one pass (a group of one as a plain request), results in the passes' order."""
    results: list = [None] * len(passes)
    for group in scheduled_groups(trainer, passes):
        outputs = (trainer.forward_backward_many([passes[i] for i in group], forward_only) if len(group) > 1
                   else one_by_one(trainer, [passes[group[0]]], forward_only))
        for i, output in zip(group, outputs):
            results[i] = output
    return results


def one_adapter(trainer: HFTrainer, passes: list[AdapterPass], forward_only: bool) -> list:
    """The issue's reference: every sequence in one request of the first model (one adapter, one pass)."""
    first = passes[0]
    everything = AdapterPass(first.model_id, [d for p in passes for d in p.data], first.loss_fn, first.loss_fn_config)
    return [trainer.forward_backward(first.model_id, everything.data, first.loss_fn, first.loss_fn_config,
                                     forward_only)]


def zero_weighted(datum: TrainDatum) -> TrainDatum:
    """`datum` with loss weight 0 on every token: it fills its row of a micro-batch and adds nothing to the loss."""
    return TrainDatum(datum.tokens, {**datum.loss_fn_inputs, "weights": np.zeros_like(datum.loss_fn_inputs["weights"])})


def first_in_joined_layout(trainer: HFTrainer, passes: list[AdapterPass], forward_only: bool) -> list:
    """The first model's request alone, in the joined pass's layout: its datums, then the other models' at
    weight 0 (same rows, lengths and micro-batch cuts as joined; PEFT's own LoRA path, no routing). Its
    result keeps only its own datums' outputs, as its lone run's."""
    first = passes[0]
    data = first.data + [zero_weighted(d) for p in passes[1:] for d in p.data]
    result = trainer.forward_backward(first.model_id, data, first.loss_fn, first.loss_fn_config, forward_only)
    return [ForwardBackwardResult(result.loss_fn_outputs[: len(first.data)], result.metrics)]


class Run(NamedTuple):
    """One way's results, the gradients it left on each model that has a result (none for a forward pass),
    and the padded tokens of its micro-batches."""

    results: list
    grads: list[list[torch.Tensor]]
    microbatches: list[int]

    def first(self) -> Run:
        """The first model's part alone."""
        return Run(self.results[:1], self.grads[:1], self.microbatches)


def collected(trainer: HFTrainer, passes: list[AdapterPass], results: list, forward_only: bool) -> Run:
    """`results` (of the first len(results) models) with copies of the gradients the way just left on those
    models, and the micro-batches of the trainer's last call."""
    grads = [] if forward_only else [[t.grad.clone() for t in trainer.adapter_parameters(p.model_id)]
                                     for p in passes[: len(results)]]
    return Run(results, grads, list(trainer.memory_report()["last_microbatch_tokens"]))


def timed(trainer: HFTrainer, passes: list[AdapterPass], forward_only: bool, repeats: int) -> dict[str, tuple]:
    """Per way: median seconds of `repeats` runs (after one warm-up), and the last run (`Run`, none for
    one_adapter). The ways alternate, so a change in the machine's load hits them alike."""
    seconds: dict[str, list[float]] = {"alone": [], "joined": [], "scheduled": [], "one_adapter": []}
    last: dict[str, Run] = {}
    for _ in range(repeats + 1):
        for way, run in (("alone", one_by_one), ("joined", joined), ("scheduled", scheduled),
                         ("one_adapter", one_adapter)):
            clear(trainer, passes)
            start = time.perf_counter()
            results = run(trainer, passes, forward_only)
            if trainer.device.type == "cuda":
                torch.cuda.synchronize()
            seconds[way].append(time.perf_counter() - start)
            if way != "one_adapter":
                last[way] = collected(trainer, passes, results, forward_only)
    return {way: (statistics.median(s[1:]), last.get(way)) for way, s in seconds.items()}


def max_relative(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((float((x - y).abs().max()) / max(float(y.abs().max()), 1e-12) for x, y in zip(a, b)), default=0.0)


def compare(alone: Run, other: Run) -> float:
    """The largest relative difference of any logprob or LoRA gradient of `other` from `alone`, model by model."""
    worst = 0.0
    for ra, ro in zip(alone.results, other.results, strict=True):
        worst = max(worst, max_relative([torch.as_tensor(o["logprobs"]) for o in ro.loss_fn_outputs],
                                        [torch.as_tensor(o["logprobs"]) for o in ra.loss_fn_outputs]))
    for ga, go in zip(alone.grads, other.grads, strict=True):
        worst = max(worst, max_relative(go, ga))
    return worst


def noise_floor_line(trainer: HFTrainer, passes: list[AdapterPass], forward_only: bool, alone: Run,
                     together: Run) -> str:
    """Joined vs alone for the first model, next to the same model alone in the joined layout vs alone."""
    clear(trainer, passes)
    floor = collected(trainer, passes, first_in_joined_layout(trainer, passes, forward_only), forward_only)
    joined_diff, floor_diff = compare(alone.first(), together.first()), compare(alone.first(), floor)
    ratio = f"{joined_diff / floor_diff:.2f}" if floor_diff else ("n/a, both 0" if not joined_diff else "inf")
    return (f"    {'forward_backward' if not forward_only else 'forward'}, first model: joined vs alone: "
            f"{joined_diff:.1e}; noise floor (same adapter, other layout): {floor_diff:.1e}; ratio X/Y {ratio} "
            f"[padded tokens per micro-batch: joined {together.microbatches}, other layout {floor.microbatches}]")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=8)
    parser.add_argument("--seqs", type=int, default=8, help="sequences per model")
    parser.add_argument("--min-len", type=int, default=48)
    parser.add_argument("--max-len", type=int, default=128)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--shapes", default="tiny,small")
    parser.add_argument("--microbatch-tokens", type=int, default=16384, help="TINK_TRAIN_MICROBATCH_TOKENS")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--device", default="cpu", help="TINK_DEVICE, e.g. cuda (then also --dtype bfloat16)")
    parser.add_argument("--dtype", default="float32", help="TINK_DTYPE")
    parser.add_argument("--checkpointing", default="false", help="TINK_GRADIENT_CHECKPOINTING: false, true, auto")
    parser.add_argument("--noise-floor", action="store_true",
                        help="also run the first model alone in the joined pass's layout (other rows weight 0) and "
                             "print its difference from alone next to joined vs alone")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"{args.models} models x {args.seqs} sequences of {args.min_len}-{args.max_len} tokens, LoRA rank "
          f"{args.rank} on every projection and lm_head, {args.device} {args.dtype}, {torch.get_num_threads()} CPU threads")
    print(f"{'shape':<28} {'op':<17} {'one by one tok/s':>17} {'joined tok/s':>13} {'speed-up':>9} "
          f"{'1 adapter tok/s':>16} {'joined/1 adapter':>17} {'max rel diff':>13} {'scheduled tok/s':>16} "
          f"{'sched/one by one':>17}")
    with tempfile.TemporaryDirectory() as root:
        for shape in args.shapes.split(","):
            trainer = HFTrainer(model_folder(shape, Path(root)), device=args.device, dtype=args.dtype,
                                microbatch_tokens=args.microbatch_tokens, gradient_checkpointing=args.checkpointing)
            passes = make_passes(trainer, args, shape)
            tokens = sum(len(d.tokens) for p in passes for d in p.data)
            config = trainer._hf.config
            label = (f"{shape} ({SHAPES[shape]['layers']} layers, h={SHAPES[shape]['hidden']})" if shape in SHAPES
                     else f"{Path(shape).name} ({getattr(config, 'num_hidden_layers', '?')} layers)")
            for forward_only in (False, True):
                ways = timed(trainer, passes, forward_only, args.repeats)
                (alone_s, alone), (joined_s, together) = ways["alone"], ways["joined"]
                single_s, scheduled_s = ways["one_adapter"][0], ways["scheduled"][0]
                op = "forward" if forward_only else "forward_backward"
                print(f"{label:<28} {op:<17} {tokens / alone_s:>17,.0f} {tokens / joined_s:>13,.0f} "
                      f"{alone_s / joined_s:>8.2f}x {tokens / single_s:>16,.0f} {single_s / joined_s:>16.2f}x "
                      f"{compare(alone, together):>13.1e} {tokens / scheduled_s:>16,.0f} "
                      f"{alone_s / scheduled_s:>16.2f}x", flush=True)
                print(f"    scheduled passes (models per pass, as TINK_BATCH_ADAPTERS joins them): "
                      f"{[len(g) for g in scheduled_groups(trainer, passes)]}; max rel diff "
                      f"{compare(alone, ways['scheduled'][1]):.1e}", flush=True)
                if args.noise_floor:
                    print(noise_floor_line(trainer, passes, forward_only, alone, together), flush=True)
            del trainer
            if args.device.startswith("cuda"):
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
