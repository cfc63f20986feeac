#!/usr/bin/env bash
# Issue 14's GPU evidence on a device machine, from the repo root, once vLLM 0.26.0 and the wheels are in
# place as for run_one_gpu.sh (device_env.sh installs them into /tmp/site on first use) and the models exist
# (bench_one_gpu.py's build_model: /tmp/b-7b/model-7b, and /tmp/b-0.5b/model-0.5b when present):
#
#   setsid nohup bash bench/gpu/run_steering.sh /tmp/steer > /tmp/steer.log 2>&1 < /dev/null &
#
# Per model: bench_steering.py (eager with the look-inside patch unused, the same with TINK_LOOK_INSIDE=0,
# steered + capturing, mixed, CUDA graphs) into <out>/steer-<shape>.json and its engine logs; then
# tests/test_steering_vllm.py on the GPU (bf16: vLLM's GPU LoRA kernels want it; eager: the default hooks need
# it), then its static-hook tests on engines with CUDA graphs.
# Detached because it can outlast one device call; later calls wait for <out>/DONE.
set -u
out=${1:-/tmp/steer}
mkdir -p "$out"
source bench/gpu/device_env.sh || exit 1
export PATH="/tmp/site/bin:$PATH"
python3 -c "import vllm; from importlib.metadata import entry_points as e; \
print('vllm', vllm.__version__, 'plugins', [p.value for p in e(group='vllm.general_plugins')])" > "$out/imports.log" 2>&1
nvidia-smi > "$out/nvidia-smi.log" 2>&1
for shape in ${STEER_SHAPES:-7b 0.5b}; do  # STEER_SHAPES="0.5b": bench only that one
  model=/tmp/b-$shape/model-$shape
  [ -f "$model/config.json" ] || { echo "no $model: skipped" >> "$out/skipped.log"; continue; }
  timeout 1500 python3 bench/gpu/bench_steering.py --model "$model" --out "$out/$shape/steer-$shape.json" \
      ${BENCH_ARGS:-} > "$out/bench-$shape.log" 2>&1
  echo "bench $shape exit $?" >> "$out/exit.log"
done
if [ "${STEER_EAGER_TESTS:-1}" = 1 ]; then  # STEER_EAGER_TESTS=0 skips them (they passed in an earlier run)
  PYTHONPATH=.:/tmp/site TINK_TEST_VLLM_DTYPE=bfloat16 VLLM_ENFORCE_EAGER=true timeout 900 python3 -m pytest tests/test_steering_vllm.py \
      -v -p no:cacheprovider > "$out/pytest-steering-vllm.log" 2>&1
  echo "pytest exit $?" >> "$out/exit.log"
fi
# TINK_LOOK_INSIDE=static under CUDA graphs (src/steering_static.py): the static-hook tests on compiled engines
# on vLLM's V1 model runner, asked for explicitly (static mode runs on the runner vLLM picks: V2 on a GPU)
if [ "${STEER_STATIC_V1_TESTS:-1}" = 1 ]; then  # STEER_STATIC_V1_TESTS=0 skips them (10/10 in the fifth run)
  VLLM_USE_V2_MODEL_RUNNER=0 PYTHONPATH=.:/tmp/site TINK_TEST_VLLM_DTYPE=bfloat16 VLLM_ENFORCE_EAGER=false timeout 900 \
      python3 -m pytest tests/test_steering_vllm.py -k static -v -p no:cacheprovider > "$out/pytest-steering-static-graphs.log" 2>&1
  echo "pytest static graphs exit $?" >> "$out/exit.log"
fi
# the same on vLLM's Model Runner V2 (src/steering_vllm.py's V2 patch)
VLLM_USE_V2_MODEL_RUNNER=1 PYTHONPATH=.:/tmp/site TINK_TEST_VLLM_DTYPE=bfloat16 VLLM_ENFORCE_EAGER=false timeout 900 \
    python3 -m pytest tests/test_steering_vllm.py -k static -v -p no:cacheprovider > "$out/pytest-steering-static-v2.log" 2>&1
echo "pytest static v2 exit $?" >> "$out/exit.log"
touch "$out/DONE"
