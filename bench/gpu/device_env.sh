# Sourced by the device run scripts (run_h100.sh, run_one_gpu.sh), from the repo root, with $out set:
# the environment of every GPU run, and a one-time install into /tmp/site of vLLM 0.26.0 (its pieces in
# /tmp/vp, ../shared/gpu/prepare-vllm-parts.sh) and the wheels in .whl (Tink's own wheel included, so
# that vLLM loads src/vllm_plugin.py in every vLLM process; megatron-core is installed by megatron_check),
# and any wheels an earlier device call left in /tmp/extra-whl (large ones, e.g. pyarrow for the TRL row).
export PYTHONPATH=/tmp/site VLLM_NO_USAGE_STATS=1 TINKER_TELEMETRY=0 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
if [ ! -f /tmp/site/.tink-installed ]; then
  mkdir -p /tmp/vw && cat /tmp/vp/* | tar x -C /tmp/vw || return 1
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site /tmp/vw/*.whl \
      $(ls .whl/*.whl | grep -v megatron) $(ls /tmp/extra-whl/*.whl 2>/dev/null) > "$out/install.log" 2>&1 || { echo "install failed"; touch "$out/DONE"; return 1; }
  touch /tmp/site/.tink-installed
fi
