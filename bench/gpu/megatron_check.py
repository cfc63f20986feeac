"""GPU check of the Megatron trainer server against the in-process HF PEFT trainer.

For each tensor-parallel size, starts `torchrun -m src.trainer_server --engine megatron --tp N`
on a small random-weight Llama, talks to it through `MegatronTrainer` (what the worker uses with
USE_MEGATRON=true) and checks:

  1. per-token logprobs of a LoRA adapter (the same PEFT folder loaded into both engines)
     agree with HF PEFT: Megatron-bf16 vs HF-fp32 error must stay within 2x HF-bf16's own
     error vs HF-fp32 (+0.01), i.e. Megatron is as exact as bf16 allows;
  2. one forward_backward + optim_step gives the same loss, and the same logprobs after, as HF;
  3. the loss falls over 20 steps on a toy memorisation task (last < 0.5 x first);
  4. the adapter Megatron exports loads in the HF backend and gives Megatron's logprobs;
  5. step time (forward_backward + optim_step, median of steps 3-20) for TP=1 vs TP=2.

Prints a table, writes megatron_check.json under --out. Exit status 1 if a check fails.

    # on a machine with 2 GPUs (nvidia-h200-x2), from the repo root:
    python3 bench/gpu/megatron_check.py --tp 1,2 --out bench/results
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from src.backends import AdamParams, LoraSpec, TrainDatum  # noqa: E402
from src.megatron_backend import MegatronTrainer  # noqa: E402
from src.ports import free_port  # noqa: E402

LORA = LoraSpec(rank=16, alpha=32, seed=0)
ADAM = AdamParams(learning_rate=2e-3, beta1=0.9, beta2=0.95, eps=1e-8)


def build_model(path: Path, vocab: int, hidden: int, layers: int, heads: int, kv_heads: int) -> Path:
    """A random-init Llama (bf16 safetensors) with a tokenizer, as any HF folder."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from src.tiny_model import build_tokenizer

    if (path / "config.json").exists():
        return path
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=int(hidden * 2.75) // 64 * 64,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         head_dim=hidden // heads, max_position_embeddings=2048, rms_norm_eps=1e-5,
                         tie_word_embeddings=False, torch_dtype="bfloat16")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # wider than the default init: a less flat next-token distribution
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.04)
    model.to(torch.bfloat16).save_pretrained(path, safe_serialization=True)
    build_tokenizer().save_pretrained(path)
    return path


def random_adapter(model_path: Path, out: Path) -> Path:
    """A PEFT adapter with non-zero A and B (so the LoRA path matters), written by the HF engine."""
    from src.hf_trainer import HFTrainer

    hf = HFTrainer(str(model_path), device="cpu", dtype="float32")
    hf.create_adapter("random", LORA)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in hf.adapter_parameters("random"):
            if not p.any():  # B starts at zero
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    out.mkdir(parents=True, exist_ok=True)
    hf.export_adapter("random", out)
    return out


def batch(seed: int, n: int, length: int, vocab: int) -> list[TrainDatum]:
    rng = np.random.default_rng(seed)
    data = []
    for _ in range(n):
        seq = rng.integers(3, vocab, size=length + 1)
        data.append(TrainDatum(tokens=seq[:-1].tolist(), loss_fn_inputs={
            "target_tokens": seq[1:].astype(np.int64), "weights": np.ones(length, dtype=np.float32)}))
    return data


def toy_batch(n: int, length: int, vocab: int) -> list[TrainDatum]:
    """Repeating patterns: learnable in a few LoRA steps."""
    data = []
    for i in range(n):
        pattern = np.arange(5 + i, 5 + i + 7) % vocab
        seq = np.resize(pattern, length + 1)
        data.append(TrainDatum(tokens=seq[:-1].tolist(), loss_fn_inputs={
            "target_tokens": seq[1:].astype(np.int64), "weights": np.ones(length, dtype=np.float32)}))
    return data


def logprobs(result) -> np.ndarray:
    return np.concatenate([np.asarray(o["logprobs"], dtype=np.float64) for o in result.loss_fn_outputs])


def start_server(model: Path, tp: int, log_path: Path, device: str, dtype: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1",
           "CUDA_DEVICE_MAX_CONNECTIONS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(tp), "--master-port", str(free_port()),
           "-m", "src.trainer_server", "--engine", "megatron", "--tp", str(tp), "--model", str(model),
           "--port", str(port), "--device", device, "--dtype", dtype]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=open(log_path, "w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    client = MegatronTrainer(url, str(model))
    deadline = time.time() + 600
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"trainer server exited {proc.returncode}; log:\n{log_path.read_text()[-4000:]}")
        if client.health().get("live"):
            return proc, url
        time.sleep(1)
    raise TimeoutError("trainer server not ready in 600 s")


def stats(diff: np.ndarray) -> dict[str, float]:
    diff = np.abs(diff)
    return {"mean": float(diff.mean()), "max": float(diff.max())}


def run(args) -> dict:
    from src.hf_trainer import HFTrainer

    work = Path(args.work or tempfile.mkdtemp(prefix="megatron-check-"))
    model = build_model(work / "model", args.vocab, args.hidden, args.layers, args.heads, args.kv_heads)
    adapter_dir = random_adapter(model, work / "adapter") if not (work / "adapter").exists() else work / "adapter"
    eval_data = batch(0, args.batch, args.seq, min(args.vocab, 512))
    train_data = batch(1, args.batch, args.seq, min(args.vocab, 512))
    toy = toy_batch(args.batch, args.seq, args.vocab)

    hf32 = HFTrainer(str(model), device=args.device, dtype="float32")
    hf16 = HFTrainer(str(model), device=args.device, dtype=args.dtype)
    ref = {}
    for name, hf in (("hf32", hf32), ("hf16", hf16)):
        hf.create_adapter("ref", LORA)
        hf.load_state("ref", adapter_dir, False)
        ref[name] = logprobs(hf.forward_backward("ref", eval_data, "cross_entropy", None, True))
    hf_bf16_err = stats(ref["hf16"] - ref["hf32"])
    # One HF step, for the step-parity check below.
    hf_step = hf16.forward_backward("ref", train_data, "cross_entropy", None, False)
    hf16.optim_step("ref", ADAM)
    hf_after = logprobs(hf16.forward_backward("ref", eval_data, "cross_entropy", None, True))

    report = {"model": {"hidden": args.hidden, "layers": args.layers, "heads": args.heads, "kv_heads": args.kv_heads,
                        "vocab": args.vocab, "params_M": round(param_count(model) / 1e6, 1)},
              "batch": {"sequences": args.batch, "tokens_each": args.seq}, "hf_bf16_vs_fp32": hf_bf16_err, "tp": {}}
    ok = True
    for tp in args.tp:
        proc, url = start_server(model, tp, work / f"server-tp{tp}.log", args.device, args.dtype)
        try:
            mt = MegatronTrainer(url, str(model))
            row: dict = {}
            mt.create_adapter("ref", LORA)
            mt.load_state("ref", adapter_dir, False)
            mg = logprobs(mt.forward_backward("ref", eval_data, "cross_entropy", None, True))
            row["logprob_vs_hf32"] = stats(mg - ref["hf32"])
            row["logprob_vs_hf16"] = stats(mg - ref["hf16"])
            row["logprob_ok"] = row["logprob_vs_hf32"]["mean"] <= 2 * hf_bf16_err["mean"] + 0.01

            step = mt.forward_backward("ref", train_data, "cross_entropy", None, False)
            mt.optim_step("ref", ADAM)
            after = logprobs(mt.forward_backward("ref", eval_data, "cross_entropy", None, True))
            row["step_loss"] = {"megatron": step.metrics["loss:sum"], "hf": hf_step.metrics["loss:sum"]}
            row["after_step_vs_hf16"] = stats(after - hf_after)
            rel = abs(step.metrics["loss:sum"] - hf_step.metrics["loss:sum"]) / abs(hf_step.metrics["loss:sum"])
            row["step_ok"] = rel < 0.01 and row["after_step_vs_hf16"]["mean"] <= 2 * hf_bf16_err["mean"] + 0.01

            mt.create_adapter("toy", LoraSpec(rank=LORA.rank, alpha=LORA.alpha, seed=0))
            losses, times = [], []
            tokens = sum(len(d.tokens) for d in toy)
            for _ in range(args.steps):
                t0 = time.perf_counter()
                out = mt.forward_backward("toy", toy, "cross_entropy", None, False)
                mt.optim_step("toy", ADAM)
                times.append(time.perf_counter() - t0)
                losses.append(out.metrics["loss:sum"] / tokens)
            row["loss_curve"] = [round(x, 4) for x in losses]
            row["loss_ok"] = losses[-1] < 0.5 * losses[0]
            row["step_time_s"] = statistics.median(times[2:])

            export = work / f"export-tp{tp}"
            export.mkdir(exist_ok=True)
            mt.export_adapter("toy", export)
            hf16.create_adapter(f"exp{tp}", LoraSpec(rank=LORA.rank, alpha=LORA.alpha, seed=0))
            hf16.load_state(f"exp{tp}", export, False)
            mine = logprobs(mt.forward_backward("toy", eval_data, "cross_entropy", None, True))
            theirs = logprobs(hf16.forward_backward(f"exp{tp}", eval_data, "cross_entropy", None, True))
            row["export_vs_hf16"] = stats(mine - theirs)
            row["export_ok"] = row["export_vs_hf16"]["mean"] <= 2 * hf_bf16_err["mean"] + 0.01
            ok &= all(row[k] for k in ("logprob_ok", "step_ok", "loss_ok", "export_ok"))
            report["tp"][str(tp)] = row
        finally:
            proc.terminate()
            proc.wait(60)
    report["ok"] = bool(ok)
    return report


def param_count(model: Path) -> int:
    from safetensors import safe_open

    total = 0
    for f in model.glob("*.safetensors"):
        with safe_open(f, framework="pt") as handle:
            total += sum(int(np.prod(handle.get_slice(k).get_shape())) for k in handle.keys())
    return total


def print_table(report: dict) -> None:
    print(f"\nmodel {report['model']}, batch {report['batch']}")
    e = report["hf_bf16_vs_fp32"]
    print(f"HF bf16 vs HF fp32 logprob |diff|: mean {e['mean']:.4f} max {e['max']:.4f}  (the bf16 noise floor)\n")
    print("| TP | logprob vs HF fp32 (mean/max) | vs HF bf16 | 1-step loss Megatron / HF | after step vs HF | "
          "loss step 1 -> 20 | export in HF (mean/max) | step time s | ok |")
    print("|---|---|---|---|---|---|---|---|---|")
    for tp, r in report["tp"].items():
        ok = all(r[k] for k in ("logprob_ok", "step_ok", "loss_ok", "export_ok"))
        print(f"| {tp} | {r['logprob_vs_hf32']['mean']:.4f} / {r['logprob_vs_hf32']['max']:.4f} "
              f"| {r['logprob_vs_hf16']['mean']:.4f} / {r['logprob_vs_hf16']['max']:.4f} "
              f"| {r['step_loss']['megatron']:.2f} / {r['step_loss']['hf']:.2f} "
              f"| {r['after_step_vs_hf16']['mean']:.4f} / {r['after_step_vs_hf16']['max']:.4f} "
              f"| {r['loss_curve'][0]:.3f} -> {r['loss_curve'][-1]:.3f} "
              f"| {r['export_vs_hf16']['mean']:.4f} / {r['export_vs_hf16']['max']:.4f} "
              f"| {r['step_time_s']:.3f} | {'yes' if ok else 'NO'} |")
    for tp, r in report["tp"].items():
        print(f"TP={tp} loss curve (per token): {r['loss_curve']}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tp", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--device", default="cuda", help="cpu: a smoke test of this script, not a measurement")
    p.add_argument("--dtype", default="bfloat16", help="Megatron's and the second HF engine's dtype")
    p.add_argument("--work", default=None, help="folder for the model, adapters and server logs")
    p.add_argument("--out", default=str(REPO / "bench" / "results"))
    args = p.parse_args()
    if args.device == "cuda" and max(args.tp) > torch.cuda.device_count():
        raise SystemExit(f"--tp {max(args.tp)} needs that many GPUs; this machine has {torch.cuda.device_count()}")
    report = run(args)
    print_table(report)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "megatron_check.json").write_text(json.dumps(report, indent=2))
    print(f"\nwrote {out / 'megatron_check.json'}; all checks {'passed' if report['ok'] else 'FAILED'}")
    sys.exit(0 if report["ok"] else 1)


if __name__ == "__main__":
    main()
