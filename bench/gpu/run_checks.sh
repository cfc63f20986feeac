#!/usr/bin/env bash
# One device session's GPU checks, in priority order, detached (the whole run is longer than one call):
#
#   setsid nohup bash bench/gpu/run_checks.sh /tmp/checks "steering one_gpu lm_head multi" > /tmp/checks.log 2>&1 < /dev/null &
#
# steering : run_steering.sh: bench_steering.py on the models built so far (first: the 0.5B shape), then
#            tests/test_steering_vllm.py on vLLM 0.26 in bf16, eager (STEER_EAGER_TESTS=0 skips them), then its
#            static-hook tests under CUDA graphs on Model Runner V1 and on V2
# one_gpu  : bench_one_gpu.py at 7B (sampling with 1 adapter and 8 mixed, compute_logprobs, training, through the
#            SDK, against direct vLLM and bare PEFT); ONE_GPU_SHAPES="0.5b 7b" runs each shape in turn;
#            ONE_GPU_ENV="VAR=value ..." is passed to its worker, ONE_GPU_ARGS to the bench (e.g. --skip peft);
#            BENCH_PYSPY=0 skips its profiled pass
# lm_head  : lm_head_check.py (sampled and native prompt logprobs through lm_head LoRA, per family, vs HF+PEFT),
#            on vLLM's Model Runner V2 (lm_head_v1: the same on V1)
# sampling : bench_sampling.py at the 0.5B shape, 64 prompts x 8 x 256 (the batch), 1 adapter then 8 mixed,
#            Tink's sampler vs LLM.generate (with and without logprobs), best of 2, logprobs at the end A/B, py-spy of
#            Tink's; bench_http_sampling.py (the HTTP path alone, on this host's CPUs); then Tink with VLLM_PLUGINS=
#            (plugin off; SAMPLING_PLUGIN_OFF=0 skips it)
# multi    : bench_multi_adapter.py, 8 adapters x 8 x 512 joined vs one by one vs 1 adapter x 64, at 0.5B and 7B
#            (MULTI_MODELS: the model folders instead)
# Each step writes into <out>/<step>; <out>/DONE marks the end. vLLM's pieces must be in /tmp/vp and the
# wheels in .whl (see bench/gpu/README.md).
set -u
out=${1:-/tmp/checks}
steps=" ${2:-steering one_gpu lm_head multi lm_head_v1} "
mkdir -p "$out"
source bench/gpu/device_env.sh || exit 1
export PATH="/tmp/site/bin:$PATH"
nvidia-smi > "$out/nvidia-smi.txt" 2>&1
python3 -c "import vllm; print('vllm', vllm.__version__)" > "$out/imports.log" 2>&1
small=/tmp/b-0.5b/model-0.5b big=/tmp/b-7b/model-7b  # where bench_one_gpu.py puts them
python3 -c "
import sys; sys.path.insert(0, 'bench/gpu'); from pathlib import Path
from bench_one_gpu import SHAPES, build_model
build_model(Path('$small'), SHAPES['0.5b'])" > "$out/build.log" 2>&1
for step in $steps; do
  echo "$(date +%T) $step" >> "$out/steps.log"
  mkdir -p "$out/$step"
  case $step in
    steering) timeout 1200 bash bench/gpu/run_steering.sh "$out/steering" > "$out/steering/run.log" 2>&1 ;;
    one_gpu)
      for shape in ${ONE_GPU_SHAPES:-7b}; do
        mkdir -p "$out/one_gpu/$shape"
        env BENCH_PYSPY=${BENCH_PYSPY:-1} ${ONE_GPU_ENV:-} timeout 1500 python3 bench/gpu/bench_one_gpu.py --shape $shape --out /tmp/b-$shape \
          ${ONE_GPU_ARGS:-} > "$out/one_gpu/$shape/bench.log" 2>&1
        cp /tmp/b-$shape/bench_one_gpu_$shape.json /tmp/b-$shape/serve.log /tmp/b-$shape/pyspy* "$out/one_gpu/$shape/" 2>/dev/null
      done ;;
    lm_head)  # on Model Runner V2, vLLM 0.26's GPU default (an eager engine gets V1 from Tink: lm_head_v1)
      VLLM_USE_V2_MODEL_RUNNER=1 PYTHONPATH=.:/tmp/site timeout 900 python3 bench/gpu/lm_head_check.py /tmp/lmh \
        > "$out/lm_head/check.log" 2>&1 ;;
    lm_head_v1) PYTHONPATH=.:/tmp/site timeout 900 python3 bench/gpu/lm_head_check.py /tmp/lmh > "$out/lm_head_v1/check.log" 2>&1 ;;
    sampling)
      # the engine settings a worker's bench_one_gpu.py run has (max_model_len 4096, 8 adapter slots), so that the
      # in-process figures and the SDK's compare directly (runs 5 and 6 used max_model_len 512 and adapters + 1)
      common="--model $small --prompts 64 --n 8 --max-tokens 256 --prompt-len 32 --rank 32 --skip-hf --gpu-mem 0.4 --reps 2"
      common="$common --max-model-len 4096 --max-loras 8"
      PYTHONPATH=.:/tmp/site timeout 600 python3 bench/bench_sampling.py $common --adapters 1 --at-end-ab 2 \
        --pyspy "$out/sampling/pyspy_tink.txt" > "$out/sampling/one_adapter.log" 2>&1
      PYTHONPATH=.:/tmp/site timeout 600 python3 bench/bench_sampling.py ${common/--prompts 64/--prompts 8} --adapters 8 --at-end-ab 2 \
        > "$out/sampling/eight_adapters.log" 2>&1
      PYTHONPATH=.:/tmp/site timeout 300 python3 bench/bench_http_sampling.py > "$out/sampling/http.log" 2>&1
      [ "${SAMPLING_PLUGIN_OFF:-1}" = 1 ] && VLLM_PLUGINS= PYTHONPATH=.:/tmp/site timeout 600 python3 bench/bench_sampling.py \
        $common --adapters 1 --skip-direct > "$out/sampling/plugin_off.log" 2>&1 ;;  # SAMPLING_PLUGIN_OFF=0 skips it
    multi)
      for model in ${MULTI_MODELS:-$small $big}; do
        [ -d "$model" ] || continue
        timeout 900 python3 bench/bench_multi_adapter.py --device cuda --dtype bfloat16 --shapes "$model" --models 8 \
          --seqs 8 --min-len 512 --max-len 512 --rank 32 --repeats 2 --checkpointing auto --noise-floor >> "$out/multi/bench.log" 2>&1
      done ;;
  esac
done
echo "$(date +%T) end" >> "$out/steps.log"
touch "$out/DONE"
