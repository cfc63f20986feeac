#!/usr/bin/env bash
# The one-GPU benchmark on a device machine, from the repo root, once vLLM 0.26.0's pieces are in /tmp/vp
# (../shared/gpu/prepare-vllm-parts.sh) and .whl holds the packages the GPU image lacks (tinker, flask,
# waitress, ...; for the TRL row trl, datasets, multiprocess, pyarrow; bench/gpu/README.md lists them).
#
#   setsid nohup bash bench/gpu/run_one_gpu.sh /tmp/one_gpu "7b 0.5b" > /tmp/one_gpu.log 2>&1 < /dev/null &
#
# Per shape: Tink through the SDK against direct vLLM and bare PEFT (bench_one_gpu.py), then TRL's
# GRPOTrainer on the same model and batch (bench_trl_grpo.py; CHECKS without "trl" skips it); the lm_head
# LoRA check runs after the first shape. Detached because the whole run is longer than one device call;
# later calls wait for <out>/DONE.
set -u
out=${1:-/tmp/one_gpu}
shapes=${2:-7b 0.5b}
checks=" ${CHECKS:-trl lm_head} "
mkdir -p "$out"
source bench/gpu/device_env.sh || exit 1
export PATH="/tmp/site/bin:$PATH"
python3 -c "import vllm, tinker, flask, waitress; from importlib.metadata import entry_points as e; \
print('vllm', vllm.__version__, 'plugins', [p.value for p in e(group='vllm.general_plugins')])" > "$out/imports.log" 2>&1
first=1
for shape in $shapes; do
  python3 bench/gpu/bench_one_gpu.py --shape "$shape" --out "/tmp/b-$shape" ${BENCH_ARGS:-} > "$out/bench-$shape.log" 2>&1
  cp /tmp/b-$shape/bench_one_gpu_$shape.json /tmp/b-$shape/pyspy* "$out/" 2>/dev/null
  cp "/tmp/b-$shape/serve.log" "$out/serve-$shape.log" 2>/dev/null
  case $checks in *" trl "*)
    timeout 900 python3 bench/gpu/bench_trl_grpo.py --shape "$shape" --model "/tmp/b-$shape/model-$shape" \
        --out "/tmp/trl-$shape" > "$out/trl-$shape.log" 2>&1
    cp "/tmp/trl-$shape/bench_trl_grpo_$shape.json" "$out/" 2>/dev/null ;; esac
  if [ $first = 1 ]; then
    first=0
    case $checks in *" lm_head "*)
      PYTHONPATH=.:/tmp/site timeout 900 python3 bench/gpu/lm_head_check.py /tmp/lmh > "$out/lm_head_check.log" 2>&1 ;; esac
  fi
done
touch "$out/DONE"
