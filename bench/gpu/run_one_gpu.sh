#!/usr/bin/env bash
# The one-GPU benchmark (bench_one_gpu.py) on a device machine, from the repo root, once vLLM 0.26.0's
# pieces are in /tmp/vp (../shared/gpu/prepare-vllm-parts.sh) and .whl holds the packages the GPU image
# lacks (tinker, flask, waitress, ...; bench/gpu/README.md lists them).
#
#   setsid nohup bash bench/gpu/run_one_gpu.sh /tmp/one_gpu "7b 0.5b" > /tmp/one_gpu.log 2>&1 < /dev/null &
#
# Detached because the whole run is longer than one device call; later calls wait for <out>/DONE.
set -u
out=${1:-/tmp/one_gpu}
shapes=${2:-7b 0.5b}
mkdir -p "$out"
source bench/gpu/device_env.sh || exit 1
python3 -c "import vllm, tinker, flask, waitress; from importlib.metadata import entry_points as e; \
print('vllm', vllm.__version__, 'plugins', [p.value for p in e(group='vllm.general_plugins')])" > "$out/imports.log" 2>&1
for shape in $shapes; do
  python3 bench/gpu/bench_one_gpu.py --shape "$shape" --out "/tmp/b-$shape" ${BENCH_ARGS:-} > "$out/bench-$shape.log" 2>&1
  cp "/tmp/b-$shape/bench_one_gpu_$shape.json" "$out/" 2>/dev/null
  cp "/tmp/b-$shape/serve.log" "$out/serve-$shape.log" 2>/dev/null
done
case " ${CHECKS:-lm_head} " in *" lm_head "*)
  PYTHONPATH=.:/tmp/site timeout 900 python3 bench/gpu/lm_head_check.py /tmp/lmh > "$out/lm_head_check.log" 2>&1 ;; esac
touch "$out/DONE"
