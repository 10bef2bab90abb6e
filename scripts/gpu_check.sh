#!/usr/bin/env bash
# The checks a session with a GPU runs, cut into calls that each fit one command of the GPU
# machine: a command runs for at most 10 minutes, the machine is lent for 15 minutes in all (its
# start-up of 1-2 minutes included) and kept only 30 s between commands, so every call may start
# on a bare machine: each builds first when nad_ext._C with CUDA kernels is not there.
#
# How to run it on the GPU machine (the repository's copy there may have no .git, so write the
# commit into GPU_COMMIT before each call; send no build outputs):
#
#   echo "$(git rev-parse HEAD)$(git diff --quiet HEAD || echo ' + uncommitted changes')" > GPU_COMMIT
#   bash scripts/gpu_check.sh call1   # build (MAX_JOBS=16), every cuda test
#   bash scripts/gpu_check.sh call2   # [build], step: ResNet50 then VGG16; overlap: T = 1,000 and 20,000
#   bash scripts/gpu_check.sh call3   # [build], data (input pipeline), scale (one NCCL process); only if time is left
#   bash scripts/gpu_check.sh call4   # [build], cpp: the LibTorch library with CUDA kernels, its C++ tests
#                                     # (cuda_matches_cpu runs there), the package and the .pt2 example
#   bash scripts/gpu_check.sh call5   # [build], paths: per-image paths of ResNet50 at 224, batched against
#                                     # one at a time (issue 26's 10^5 images in 30 minutes)
#
# Each call writes two files to $OUT (default gpu_logs/): summary-<call>.txt (commit, Python,
# PyTorch, CUDA, cuDNN, nvcc and GPU, then each stage's exit status, time and key numbers) and
# logs-<call>.tar.gz (every stage's full log and its benchmark JSON); both are rewritten after each
# stage, so a call killed at its limit still leaves them. A call whose benchmark stages wrote JSON
# also leaves bench-<call>.json: their results in one file (benchmarks/harness.py merge; read it with
# benchmarks/compare.py). At most 3 files per call. Caches stay under /tmp (zoo, benchmark data).
#
#   STAGES="tests ops" bash scripts/gpu_check.sh   # stages by hand (the call is named "stages";
#                                                  # with a call, STAGES replaces its stages)
#   bash scripts/gpu_check.sh all                  # every stage, no time budget (a GPU of your own)
#   GPU_CHECK_BUDGET=480    seconds one call may take (default 480; 0: no limit). Each stage has
#                           its own timeout, cut to what is left; a stage that no longer fits
#                           (under 30 s left) is skipped and reported.
#   GPU_CHECK_DRY_RUN=1     print each stage's command instead of running it
#                           (python_tests/test_gpu_check.py runs every call that way)
#   PYTHON                  the interpreter (default: .venv/bin/python if there, else python3):
#                           the build is against the PyTorch that interpreter has.
set -uo pipefail
cd "$(dirname "$0")/.."
root=$PWD

usage() { sed -n '2,/^set -uo/p' "$0" | sed '$d'; exit 2; }

call=${1:-}
if [ -z "$call" ]; then
  [ -n "${STAGES:-}" ] || usage
  call=stages
fi
case $call in
  call1) stages="build tests" ;;
  call2) stages="build step overlap" ;;
  call3) stages="build data scale" ;;
  call4) stages="build cpp" ;;
  call5) stages="build paths" ;;
  all) stages="build tests step overlap data scale ops cpp paths" ;;
  stages) stages=$STAGES ;;
  -h|--help) usage ;;
  *) echo "unknown call '$call': call1 to call5, all, or STAGES=\"...\" without a call" >&2; exit 2 ;;
esac
[ -n "${STAGES:-}" ] && stages=$STAGES

dry=${GPU_CHECK_DRY_RUN:-0}
[ "$call" = all ] && default_budget=0 || default_budget=480
budget=${GPU_CHECK_BUDGET:-$default_budget}
out=${OUT:-gpu_logs}
mkdir -p "$out"
out=$(cd "$out" && pwd)
logs=${GPU_CHECK_LOGS:-${TMPDIR:-/tmp}/nad_gpu_check}/$call
rm -rf "$logs" && mkdir -p "$logs"
summary=$out/summary-$call.txt
tarball=$out/logs-$call.tar.gz
zoo_cache=/tmp/nad_zoo_cache
bench_data=/tmp/nad_bench_data

if [ -n "${PYTHON:-}" ]; then py=$PYTHON
elif [ -x .venv/bin/python ]; then py=$root/.venv/bin/python
else py=python3
fi
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} NAD_EXT_BUILD=cuda MAX_JOBS=${MAX_JOBS:-16}
export PYTHONPATH=$root${PYTHONPATH:+:$PYTHONPATH}

# stage_command NAME: sets `cmd` (the command, an array) and `limit` (its own timeout, seconds).
stage_command() {
  case $1 in
    build) limit=420; cmd=("$py" setup.py build_ext --inplace) ;;
    # Every test with "cuda" in its name or its file's (the CUDA cases of DEVICES, the
    # cuda-marked ones): CI runs the CPU ones on every commit.
    tests) limit=360; cmd=("$py" -m pytest python_tests -ra -q -k cuda -p no:cacheprovider --durations=15) ;;
    # ResNet50 first: a stage cut by its timeout still has the more telling network.
    # Each benchmark writes its JSON next to its log (so into the tarball); pack merges them.
    # The step's JSON is rewritten after each model; --max-seconds bounds each model's rounds.
    step) limit=330; cmd=("$py" benchmarks/bench_step.py --models resnet50 vgg16 --max-seconds 45
                          --profile fused-bf16-graph --json "$logs/step.json") ;;
    # CPU T = 100, 1,000; CUDA T = 1,000, 20,000 (CUDA-event times)
    overlap) limit=150; cmd=("$py" benchmarks/bench_overlap.py --json "$logs/overlap.json") ;;
    # The input pipeline: JPEG files -> ready batches on the GPU (exact, fast, caches), ~1-2 min.
    data) limit=270; cmd=("$py" benchmarks/bench_data.py --count 2000 --repeats 3 --dir "$bench_data"
                          --disentangle vgg16 --json "$logs/data.json") ;;
    # torchrun with one NCCL process against a plain process on the GPU (about a minute).
    scale) limit=180; cmd=("$py" benchmarks/bench_scale.py --device cuda --procs 1 --cache "$zoo_cache"
                           --json "$logs/scale.json") ;;
    ops) limit=180; cmd=("$py" -m pytest benchmarks/bench_fused_ops.py benchmarks/bench_overlap.py -k cuda -q
                         -p no:cacheprovider --benchmark-columns=min,median,max,rounds
                         --benchmark-json "$logs/ops.json") ;;
    # scripts/test_cpp.sh with CUDA: CMake build (16 jobs) in /tmp, ctest (the GPU cases run
    # here only), the moved package and the examples; needs cmake and ninja on the machine.
    cpp) limit=420; cmd=(env PYTHON="$py" NAD_WITH_CUDA=ON JOBS="$MAX_JOBS" BUILD=/tmp/nad_build_cpp
                         CMAKE_CUDA_ARCHITECTURES="${TORCH_CUDA_ARCH_LIST//./}" bash scripts/test_cpp.sh) ;;
    # Per-image paths, ResNet50 at 224, 64 images (the one-at-a-time loop takes the time): the
    # batched paths' rate gives the 10^5-image estimate the script prints.
    paths) limit=360; cmd=("$py" benchmarks/bench_paths.py --cases cuda-resnet50 --images 64
                           --json "$logs/paths.json") ;;
    *) return 1 ;;
  esac
}

# key_lines NAME LOG: the lines of a stage's log that go into the summary.
key_lines() {
  case $1 in
    build) grep -E "^CUDA kernels:|error:|Error" "$2" | head -n 12 ;;
    tests) grep -E "^(FAILED|ERROR|SKIPPED) " "$2" | head -n 40; tail -n 1 "$2" ;;
    step) grep -E "^(device:|float32:|NAD step|\| [a-z])" "$2" | grep -v "^| path" ;;
    overlap) grep -E "^(device:|mask_overlap|\| [a-z])" "$2" | grep -v "^| path" ;;
    data) grep -E "^(data:|cache-|device:|input pipeline|crop|\| [a-z]|disentangle )" "$2" | grep -v "^| path" ;;
    scale) grep -E "^(device:|run |1 process|torchrun|commit of|zoo_)" "$2" ;;
    cpp) grep -E "tests passed|tests failed|Failed|FAIL|\*\*\*|error:|OK \(" "$2" | head -n 30 ;;
    paths) grep -E "^(device:|learn_paths|issue 26|\| [a-z])" "$2" | grep -v "^| path" ;;
    *) tail -n 15 "$2" ;;
  esac | cut -c1-200 | sed 's/^/    /'
}

built() {  # nad_ext._C for this interpreter, with the CUDA kernels
  timeout -k 5 120 "$py" -c "from nad_ext._extension import has_cuda_kernels
raise SystemExit(0 if has_cuda_kernels() else 1)" > /dev/null 2>&1
}

machine() {  # what the summary says about the machine
  local commit
  if [ -s GPU_COMMIT ]; then commit="$(head -n 1 GPU_COMMIT) (GPU_COMMIT)"
  elif git rev-parse HEAD > /dev/null 2>&1; then commit="$(git rev-parse HEAD) (git)"
  else commit="unknown: no GPU_COMMIT file and no .git"
  fi
  echo "nad-ext gpu_check $call: stages $stages; budget ${budget} s (0: none)"
  echo "commit: $commit"
  echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC'); host: $(hostname); $(nproc) cores"
  if [ "$dry" = 1 ]; then echo "dry run: nothing was run"; return; fi
  if command -v nvidia-smi > /dev/null; then
    echo "GPU: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | paste -sd ';')"
  else
    echo "GPU: none found (no nvidia-smi)"
  fi
  timeout -k 5 120 "$py" - <<'EOF' 2>&1
import platform, sys
print(f"python: {platform.python_version()} ({sys.executable})")
try:
    import torch
    print(f"torch: {torch.__version__}; CUDA {torch.version.cuda}; cuDNN {torch.backends.cudnn.version()}; "
          f"GPU visible: {torch.cuda.is_available()}")
except Exception as err:  # reported, not fatal: the stages say the rest
    print(f"torch: not importable ({err})")
for name in ("torchvision", "pytest", "pytest_benchmark", "ninja", "setuptools"):
    try:
        module = __import__(name)
        print(f"{name}: {getattr(module, '__version__', 'present')}")
    except Exception as err:
        print(f"{name}: missing ({type(err).__name__})")
EOF
  local nvcc
  nvcc=$( (nvcc --version || /usr/local/cuda/bin/nvcc --version) 2> /dev/null | grep -m1 release)
  echo "nvcc: ${nvcc:-missing}"
  echo "TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS"
}

pack() {  # the summary, the tarball of the logs and the benchmarks' JSON in one file, as they are now
  cp "$summary" "$logs/"
  local jsons=()
  for f in "$logs"/*.json; do [ -s "$f" ] && jsons+=("$f"); done
  if [ "${#jsons[@]}" -gt 0 ]; then
    timeout -k 5 60 "$py" benchmarks/harness.py merge "$out/bench-$call.json" "${jsons[@]}" > /dev/null 2>&1 \
      || echo "could not merge the benchmark JSON (${jsons[*]})" >> "$summary"
  fi
  tar -czf "$tarball" -C "$(dirname "$logs")" "$(basename "$logs")"
}

start=$SECONDS  # the budget counts from here: the machine's description and the build check too
machine > "$summary"
cat "$summary"
pack
failed=0
no_build=0
for stage in $stages; do
  if ! stage_command "$stage"; then
    echo "unknown stage $stage (build tests step overlap data scale ops cpp paths)" | tee -a "$summary" >&2
    failed=1
    continue
  fi
  log=$logs/$stage.log
  if [ "$dry" = 1 ]; then
    note=""
    [ "$stage" = build ] && note="  # only when nad_ext._C with CUDA kernels is missing"
    echo "stage $stage: timeout $limit ${cmd[*]}$note" | tee -a "$summary"
    continue
  fi
  if [ "$no_build" = 1 ]; then
    echo "== $stage: skipped, the build failed" | tee -a "$summary"
    continue
  fi
  if [ "$stage" = build ] && built; then
    echo "== build: already built (nad_ext._C with CUDA kernels)" | tee -a "$summary"
    continue
  fi
  left=$limit
  if [ "$budget" -gt 0 ]; then
    left=$((budget - (SECONDS - start) - 15))  # 15 s for the summary and the tarball
    if [ "$left" -lt 30 ]; then
      echo "== $stage: skipped, $((budget - (SECONDS - start))) s left of the ${budget} s budget: too little" \
        | tee -a "$summary"
      failed=1
      continue
    fi
    [ "$left" -gt "$limit" ] && left=$limit
  fi
  echo "-- $stage: timeout $left ${cmd[*]}"
  t0=$SECONDS
  timeout -k 10 "$left" "${cmd[@]}" > "$log" 2>&1
  rc=$?
  if [ "$stage" = build ]; then
    if built; then
      echo "CUDA kernels: True" >> "$log"
    else
      echo "CUDA kernels: False (not built, or built without them)" >> "$log"
      [ "$rc" -eq 0 ] && rc=1
    fi
    [ "$rc" -eq 0 ] || no_build=1
  fi
  status="rc=$rc"
  [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && status="rc=$rc (timed out after $left s)"
  { echo "== $stage: $status, $((SECONDS - t0)) s"; key_lines "$stage" "$log"; } | tee -a "$summary"
  [ "$rc" -eq 0 ] || failed=1
  pack
done
if [ "$dry" = 1 ]; then verdict="dry run"
elif [ "$failed" = 0 ]; then verdict="every stage passed"
else verdict="a stage failed or was skipped"
fi
echo "total: $((SECONDS - start)) s; $verdict" | tee -a "$summary"
pack
[ -f "$out/bench-$call.json" ] && echo "benchmark results: $out/bench-$call.json"
echo "wrote $summary and $tarball"
exit "$failed"
