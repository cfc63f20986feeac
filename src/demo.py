"""The RL demo: a GRPO-style loop with the official `tinker` SDK against a Tink worker.

Task: whatever the prompt, answer with the word " yes". Reward = the fraction of the
completion's tokens that are " yes". A fresh random model almost never says it; the loop
samples a group of completions per prompt, scores them, centres rewards within each group
(the advantages), and trains with the `importance_sampling` loss on the sampler's logprobs.

    python -m src demo                                  # starts its own worker on the tiny model
    TINKER_BASE_URL=http://127.0.0.1:8000 python -m src.demo   # against a running worker
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from .ports import free_port

TARGET = " yes"
PROMPTS = ["Question: what do you say?", "Tell me one word.", "Hello there!", "Is the sky blue?",
           "Answer now:", "What is your reply?", "Say something.", "Are you ready?"]


def run_loop(base_url: str, api_key: str, steps: int, group_size: int = 8, max_tokens: int = 8,
             learning_rate: float = 3e-2, quiet: bool = False, seed: int = 0) -> list[float]:
    """Train for `steps` steps; returns the mean reward of each step. `seed` fixes the adapter's start and
    every sampling request, so a run repeats on the same worker and machine."""
    import tinker
    from tinker import types
    from tqdm import tqdm

    service = tinker.ServiceClient(base_url=base_url, api_key=api_key)
    capabilities = tinker.RestClient(base_url=base_url, api_key=api_key).get_server_capabilities().result()
    base_model = capabilities.supported_models[0].model_name
    trainer = service.create_lora_training_client(base_model=base_model, rank=16, seed=seed).result()
    tokenizer = trainer.get_tokenizer()
    (target_id,) = tokenizer.encode(TARGET)
    prompts = [[tokenizer.bos_token_id] + tokenizer.encode(p) for p in PROMPTS]

    rewards_per_step: list[float] = []
    bar = tqdm(range(steps), desc="RL steps", disable=quiet, unit="step")
    for step in bar:
        sampler = trainer.save_weights_and_get_sampling_client().result()
        futures = []
        for i, prompt in enumerate(prompts):
            request_seed = ((seed * steps + step) * len(prompts) + i) * group_size  # vLLM: sample k gets seed + k
            params = types.SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=request_seed)
            futures.append(sampler.sample(types.ModelInput.from_ints(prompt), group_size, params))
        data, step_rewards = [], []
        for prompt, fut in zip(prompts, futures):
            sequences = fut.result().sequences
            rewards = [sum(t == target_id for t in s.tokens) / max_tokens for s in sequences]
            mean = sum(rewards) / len(rewards)
            step_rewards.extend(rewards)
            for seq, reward in zip(sequences, rewards):
                if reward == mean:
                    continue  # zero advantage: nothing to learn from this sample
                full = prompt + list(seq.tokens)
                n = len(prompt) - 1
                data.append(types.Datum(
                    model_input=types.ModelInput.from_ints(full[:-1]),
                    loss_fn_inputs={
                        "target_tokens": full[1:],
                        "logprobs": [0.0] * n + list(seq.logprobs),
                        "advantages": [0.0] * n + [reward - mean] * len(seq.tokens),
                    },
                ))
        mean_reward = sum(step_rewards) / len(step_rewards)
        # Before the optimizer step: with no "step" given, the worker files it under the step in progress.
        report_metrics(base_url, api_key, trainer.model_id, {"reward/mean": mean_reward})
        if data:
            trainer.forward_backward(data, "importance_sampling")
            trainer.optim_step(types.AdamParams(learning_rate=learning_rate)).result()
        rewards_per_step.append(mean_reward)
        bar.set_postfix(mean_reward=f"{mean_reward:.3f}")
        if not quiet:
            tqdm.write(f"step {step:3d}  mean reward {mean_reward:.3f}  {'#' * int(mean_reward * 40)}")
    return rewards_per_step


def report_metrics(base_url: str, api_key: str, model_id: str, metrics: dict[str, float],
                   step: int | None = None) -> None:
    """Attach scalars to the run, plotted on the worker's dashboard (`/dashboard`) beside its loss."""
    import httpx

    body: dict = {"metrics": metrics} if step is None else {"step": step, "metrics": metrics}
    httpx.post(f"{base_url.rstrip('/')}/api/v1/training_runs/{model_id}/metrics", json=body,
               headers={"X-API-Key": api_key}, timeout=30).raise_for_status()


def start_worker(state_dir: Path, api_key: str) -> tuple[subprocess.Popen, str]:
    """Start `python -m src serve` on the embedded tiny model; return it with its URL once ready."""
    port = free_port()
    env = {**os.environ, "TINK_PORT": str(port), "TINK_STATE_DIR": str(state_dir), "TINK_API_KEYS": api_key,
           "TINK_BASE_MODEL": os.environ.get("TINK_BASE_MODEL", "tiny")}
    proc = subprocess.Popen([sys.executable, "-m", "src", "serve"], env=env,
                            cwd=Path(__file__).resolve().parents[1],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    log = open(state_dir / "worker.log", "w")
    for line in proc.stdout:
        log.write(line)
        if line.startswith("TINK_READY"):
            # Keep draining the worker's output into the log: a full pipe would block it.
            threading.Thread(target=lambda: log.writelines(proc.stdout), daemon=True).start()
            return proc, line.split()[1]
    log.flush()
    raise RuntimeError(f"the worker exited ({proc.wait()}) before it was ready; see {state_dir / 'worker.log'}")


def main(steps: int = 30, seed: int = 0) -> int:
    os.environ.setdefault("TINKER_TELEMETRY", "0")
    api_key = os.environ.get("TINKER_API_KEY", "tml-tink-demo")  # the SDK insists on the tml- prefix
    url = os.environ.get("TINKER_BASE_URL")
    proc = None
    if not url:
        import tempfile

        state = Path(tempfile.mkdtemp(prefix="tink-demo-"))
        print(f"Starting a Tink worker on the tiny local model (state in {state}) ...", flush=True)
        started = time.time()
        proc, url = start_worker(state, api_key)
        print(f"Worker ready at {url} after {time.time() - started:.0f}s", flush=True)
        print(f"Live plots: {url}/dashboard (with the demo's API key)", flush=True)
    try:
        rewards = run_loop(url, api_key, steps, seed=seed)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(60)
    first, last = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    print(f"mean reward: first 3 steps {first:.3f} -> last 3 steps {last:.3f}")
    return 0 if last > first else 1


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]) if len(sys.argv) > 1 else 30))
