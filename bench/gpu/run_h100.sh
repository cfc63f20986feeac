#!/usr/bin/env bash
# The whole GPU benchmark on a device machine (nvidia-h100-x1), from the repo root, once vLLM 0.26.0's
# pieces are in /tmp/vp (../shared/gpu/prepare-vllm-parts.sh) and the extra wheels in .whl
# (bench/gpu/README.md). Writes <out>/gpu_bench.json, gpu_bench.png, table.md, the logs, then DONE.
#
#   setsid nohup bash bench/gpu/run_h100.sh /tmp/bench_out > /tmp/bench_run.log 2>&1 < /dev/null &
#
# Started detached because the whole run (~20 min) is longer than one device call (10 min): later
# calls only wait for DONE and copy the files back.
set -u
out=${1:-/tmp/bench_out}
mkdir -p "$out"
source bench/gpu/device_env.sh || exit 1
python3 -c "import vllm, tinker, flask, waitress, trl; print('vllm', vllm.__version__, 'trl', trl.__version__)" \
    > "$out/imports.log" 2>&1
# PHASES="trl" on a second machine continues a JSON copied back to $out (the model is rebuilt, same seed).
phases=${PHASES:-main trl}
case " $phases " in *" main "*)
  python3 bench/gpu/bench_h100.py --out "$out" --phases main --fresh ${BENCH_ARGS:-} > "$out/main.log" 2>&1 ;; esac
case " $phases " in *" trl "*)
  python3 bench/gpu/bench_h100.py --out "$out" --phases trl ${BENCH_ARGS:-} > "$out/trl.log" 2>&1 ;; esac
python3 bench/gpu/plot_gpu_bench.py "$out/gpu_bench.json" --png "$out/gpu_bench.png" --md "$out/table.md" \
    > "$out/plot.log" 2>&1
touch "$out/DONE"
