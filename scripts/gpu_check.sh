#!/usr/bin/env bash
# Everything a session with a GPU checks, in one call (device time is scarce): build with the
# CUDA kernels, run the CUDA tests, then the benchmarks of issues 4 and 5 with a profile of the
# fast step, the input pipeline's (issue 11) and the scale-out path with one NCCL process
# (issue 12). Logs go to $OUT (default gpu_logs/); a failing stage is reported and the rest run.
#
#   bash scripts/gpu_check.sh            # everything (about 10 minutes on an H100, +2 for data)
#   STAGES="build tests" bash scripts/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu_logs}
mkdir -p "$out"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} NAD_EXT_BUILD=cuda
export MAX_JOBS=${MAX_JOBS:-$(nproc)} PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
stages=${STAGES:-build tests step overlap ops data scale}
py=${PYTHON:-python3}

run() {  # run NAME COMMAND...: log to $out/NAME.log, print the tail and the time
  local name=$1; shift
  local start=$SECONDS
  "$@" > "$out/$name.log" 2>&1
  local rc=$?
  echo "== $name: rc=$rc, $((SECONDS - start)) s"
  tail -n 40 "$out/$name.log"
  return $rc
}

{ nvidia-smi; $py -c "import torch; print(torch.__version__, torch.version.cuda, torch.backends.cudnn.version())"; \
  git rev-parse HEAD; date -u; } > "$out/machine.txt" 2>&1
cat "$out/machine.txt"
for stage in $stages; do
  case $stage in
    build) run build $py setup.py build_ext --inplace || exit 1 ;;
    # Only the GPU cases: CI runs the CPU ones on every commit.
    tests) run tests $py -m pytest python_tests -ra -q -k cuda -p no:cacheprovider ;;
    step) run step $py benchmarks/bench_step.py --models vgg16 resnet50 --profile fused-bf16-graph ;;
    overlap) run overlap $py benchmarks/bench_overlap.py ;;
    ops) run ops $py -m pytest benchmarks/bench_fused_ops.py benchmarks/bench_overlap.py -k cuda -q \
           -p no:cacheprovider --benchmark-columns=min,median,max,rounds ;;
    # The input pipeline: JPEG files -> ready batches on the GPU (exact, fast, caches), ~1-2 min.
    data) run data $py benchmarks/bench_data.py --count 2000 --repeats 3 --dir "${TMPDIR:-/tmp}/nad_bench_data" \
            --disentangle vgg16 ;;
    # torchrun with one NCCL process against a plain process on the GPU (about a minute).
    scale) run scale $py benchmarks/bench_scale.py --device cuda --procs 1 --cache "$out/zoo_cache" ;;
    *) echo "unknown stage $stage"; exit 2 ;;
  esac
done
