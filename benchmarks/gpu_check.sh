#!/usr/bin/env bash
# The one script for a GPU machine (see GPU.md), most wanted first: install in place (building
# the CUDA extension for sm_90), the GPU tests, the quick benchmark, the launch-config sweep
# (benchmarks/tune.py: the cases with a decision pending, every case with GPU_CHECK_TUNE=1),
# compute-sanitizer on the CUDA embedding op (GPU_CHECK_SANITIZER=1), the kernel time per
# forward and per training step (benchmarks/kernel_profile.py), the host cost per op call
# (benchmarks/host.py) and the rest of the test suite on the GPU, each with whatever time is
# left.
#
#   OUT=/some/dir bash benchmarks/gpu_check.sh        # from the repository root
#
# Everything lands directly in $OUT (8 files, the most a device call brings back, so send the
# console elsewhere): summary.txt, install.log (the build and compute-sanitizer), tests.log,
# bench.log (with the host-cost and sweep logs), the benchmark's
# bench-<gpu>-<date>-<commit>.{json,md,png} and tune-<date>.json.
# The GPU tests come first, so that a kernel path no GPU has run yet is known right before its
# numbers are; the tests run under pytest-xdist where it is installed (a crashing test then costs one worker,
# not the run) with a per-test timeout, and end with one line per failure.
# Every step runs under `timeout`, within one overall budget (GPU_CHECK_SECONDS, default 460),
# so a hung step cannot eat the others' time. No network is needed.

set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
TOTAL=${GPU_CHECK_SECONDS:-460}
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} FASTBERT_CUDA_ARCHS=${FASTBERT_CUDA_ARCHS:-9.0}

say() { echo "$*" | tee -a "$SUMMARY"; }

# step NAME CAP_SECONDS LOG COMMAND...: run COMMAND under the smaller of CAP and the time left.
step() {
    local name=$1 cap=$2 log=$3; shift 3
    local left=$((TOTAL - SECONDS - 5))
    local limit=$((cap < left ? cap : left))
    if [ "$limit" -lt 15 ]; then
        say "[$name] skipped: out of time (${SECONDS}s of ${TOTAL}s used)"
        return 0
    fi
    echo "===== $name (limit ${limit}s): $*" >> "$log"
    local start=$SECONDS
    timeout -k 15 "$limit" "$@" >> "$log" 2>&1
    local rc=$?
    local note=""
    [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && note=" (timed out)"
    say "[$name] rc=$rc$note in $((SECONDS - start))s"
    return $rc
}

say "gpu_check at commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown) on $(date -u +%FT%TZ)"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | sed 's/^/gpu: /' | tee -a "$SUMMARY"
$PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" 2>&1 | tee -a "$SUMMARY"

# 1. Install in place; the build needs torch at build time, hence no build isolation.
step install 200 "$OUT/install.log" $PY -m pip install --no-build-isolation --no-deps -e .
# The extension must share torch's C++ runtime (see setup.py): no libstdc++ of its own.
for so in fastbert/_C*.so; do
    own=$(nm -D --defined-only "$so" 2>/dev/null | grep -c " __cxa_allocate_exception$")
    say "$so: $(readelf -d "$so" 2>/dev/null | grep -o 'libstdc++[^]]*' || echo 'no libstdc++ NEEDED'); own C++ runtime: ${own:-?}"
done
$PY - >> "$SUMMARY" 2>&1 <<'EOF'
import fastbert, fastbert.ops
print("ops:", {k: v[:60] for k, v in fastbert.ops.describe().items()})
try:
    from fastbert import _C
except Exception as exc:
    print("fastbert._C not importable:", type(exc).__name__, exc)
else:
    for name in ("cuda_built", "cuda_archs"):
        value = getattr(_C, name, None)
        try:
            print(f"fastbert._C.{name}:", value() if callable(value) else value)
        except Exception as exc:
            print(f"fastbert._C.{name}: {type(exc).__name__}: {exc}")
EOF

# 2. The GPU tests (BERT shapes, every dtype); the rest of the suite runs on the GPU machine
#    near the end (step 8: it runs the CPU suite's tests on CUDA tensors, which found
#    GPU-only failures before).
# -v under xdist prints each test's outcome as it finishes, so a suite cut by its time limit
# still names its failures.
XDIST=$($PY -c "import xdist, pytest_timeout" 2>/dev/null && echo "-v -n 8 --timeout 150" || echo "-q --maxfail=10")
# Each failure and its reason, as it happens (tests/conftest.py), for the summary.
export FASTBERT_FAILURE_LOG=$(mktemp /tmp/fastbert_failures_XXXX.txt)
PYTEST="$PY -m pytest tests -rfE --tb=short -p no:cacheprovider $XDIST"
step "tests -m gpu" 150 "$OUT/tests.log" $PYTEST -m gpu
grep -E "[0-9]+ (passed|failed)" "$OUT/tests.log" | tail -1 | sed 's/^/  /' | tee -a "$SUMMARY"

# 3. The quick benchmark; it stops starting new measurements before its limit and writes
#    its report as it goes, so a cut leaves every finished number.
LEFT=$((TOTAL - SECONDS - 220))
BENCH_CAP=$((LEFT < ${GPU_CHECK_BENCH_SECONDS:-270} ? LEFT : ${GPU_CHECK_BENCH_SECONDS:-270}))
MINUTES=$($PY -c "print(max(0.5, ($BENCH_CAP - 40) / 60))")
# The op suites in the order of what is still open: attention first (issue 4's last criterion).
step "bench --quick" "$BENCH_CAP" "$OUT/bench.log" $PY -m fastbert bench --quick --out "$OUT" --max-minutes "$MINUTES" \
    --ops attention,linear_gelu,layernorm,gelu,softmax,embedding

# 4. The launch-config sweep: by default the cases with a decision pending (the fused
#    GEMM's TMA candidates, at 4096 rows and at one sequence's 128, against its pointer
#    kernel and cuBLAS + bias_gelu); every case with GPU_CHECK_TUNE=1. Its log goes to bench.log and its table to the summary;
#    tune-<date>.json is the eighth file back. The other configs come from the H100 sweep
#    (benchmarks/PERF.md).
TUNE_LEFT=$((TOTAL - SECONDS - 30))
TUNE_CASES="linear_gelu" TUNE_MAX=140
[ "${GPU_CHECK_TUNE:-0}" = 1 ] && TUNE_CASES="" TUNE_MAX=180
if [ "$TUNE_LEFT" -ge 45 ]; then
    TUNE_CAP=$((TUNE_LEFT < TUNE_MAX ? TUNE_LEFT : TUNE_MAX))
    step "tune ${TUNE_CASES:-every case}" "$TUNE_CAP" "$OUT/bench.log" $PY -m fastbert.benchmarks.tune \
        ${TUNE_CASES:+--cases "$TUNE_CASES"} --out "$OUT" --max-seconds $((TUNE_CAP - 30))
    sed -n '/^# .*shipped config/,/^wrote /p' "$OUT/bench.log" | tee -a "$SUMMARY"
fi

# 5. compute-sanitizer memcheck on the CUDA embedding op: odd and BERT sizes, every dtype,
#    forward and backward, and ids out of range (must raise, never read out of bounds).
SAN=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
SNIPPET=$(mktemp /tmp/fastbert_sanitize_XXXX.py)
cat > "$SNIPPET" <<'EOF'
import torch
import fastbert
from fastbert import functional as fb
assert fastbert.ops.kernel_available("embedding"), fastbert.ops.describe()["embedding"]
torch.manual_seed(0)
for dtype in (torch.float32, torch.float16, torch.bfloat16):
    for (batch, seqlen, hidden, vocab) in ((3, 37, 100, 997), (2, 128, 768, 30522), (1, 512, 1024, 30522)):
        def p(*shape):
            return torch.randn(*shape, device="cuda", dtype=dtype, requires_grad=True)
        word, pos, tt, lnw, lnb = p(vocab, hidden), p(512, hidden), p(2, hidden), p(hidden), p(hidden)
        ids = torch.randint(0, vocab, (batch, seqlen), device="cuda")
        types = torch.randint(0, 2, (batch, seqlen), device="cuda")
        positions = torch.arange(seqlen, device="cuda").expand(batch, seqlen)
        out = fb.embedding(ids, types, positions, word, pos, tt, lnw, lnb, 1e-12, 0.0, 0)
        out.float().square().sum().backward()
        bad = ids.clone()
        bad[0, -1] = vocab
        try:
            fb.embedding(bad, types, positions, word, pos, tt, lnw, lnb, 1e-12)
            raise SystemExit(f"an out-of-range id did not raise ({dtype}, hidden {hidden})")
        except (ValueError, RuntimeError, IndexError):
            pass
torch.cuda.synchronize()
print("embedding op under memcheck: ok")
EOF
if [ "${GPU_CHECK_SANITIZER:-0}" != 1 ]; then
    say "[sanitizer] skipped (GPU_CHECK_SANITIZER=1 runs it; the CUDA embedding kernels are unchanged since their clean memcheck at bc7518d)"
elif [ -n "$SAN" ]; then
    step "sanitizer embedding op" 90 "$OUT/install.log" "$SAN" --tool memcheck --error-exitcode 1 --print-limit 20 $PY "$SNIPPET"
    if [ -f tests/test_embedding_cuda.py ] && grep -q "sanitizer" tests/test_embedding_cuda.py; then
        step "sanitizer test_embedding_cuda" 60 "$OUT/install.log" "$SAN" --tool memcheck --error-exitcode 1 \
            --print-limit 20 $PY -m pytest tests/test_embedding_cuda.py -q -x -k sanitizer -p no:cacheprovider
    fi
    grep -E "ERROR SUMMARY" "$OUT/install.log" | sed 's/^/  /' | tee -a "$SUMMARY"
else
    say "[sanitizer] compute-sanitizer not found"
fi
rm -f "$SNIPPET"

# 6. Where a BERT-base forward (B=32 S=128) spends its time, kernel by kernel, with the
#    kernels "auto" picks: captured in a CUDA graph (the gaps left are the graph's) and eager
#    (the gaps are the host's); B=1 S=128 captured only, since its eager forward is all host;
#    the ragged batch both ways (eager it runs packed yet slower than padded, 13.5 against
#    10.7 ms on the H200: its idle time says whether the host or a wait is why, and its GEMM
#    rows whether cuBLAS picks other kernels for its 9166 packed rows than for the graph's
#    9216); a row per GEMM kernel throughout. GPU_CHECK_PROFILE_BACKENDS="auto triton" adds the fused
#    feed-forward GEMM's profiles; the benchmark's fused-ffn rows time it end to end.
for backend in ${GPU_CHECK_PROFILE_BACKENDS:-auto}; do
    for graph in --graph ""; do
        step "kernel profile ($backend${graph:+, graph})" 70 "$OUT/bench.log" $PY -m fastbert.benchmarks.kernel_profile \
            $graph --gemms --backend "$backend" --workloads base-b32-s128,${graph:+base-b1-s128,}base-b32-s512-varlen
    done
done
# The bf16 training step (BERT-base B=32 S=128) kernel by kernel, eager; with
# GPU_CHECK_PROFILE_TRAIN=1 also compiled with reduce-overhead (a minute of compiling).
for graph in ${GPU_CHECK_PROFILE_TRAIN:+--graph} ""; do
    step "kernel profile (train${graph:+, compiled})" $([ -n "$graph" ] && echo 120 || echo 40) "$OUT/bench.log" \
        $PY -m fastbert.benchmarks.kernel_profile $graph --workloads train-base-b32-s128
done
sed -n '/^# \(train \)\?BERT-base B=\(32\|1\) S=\(128\|512 lengths 32..512\)\( (bf16 autocast)\)\?, \(CUDA graph\|eager\|compiled\)/,/^GPU idle/p' "$OUT/bench.log" \
    | tee -a "$SUMMARY"


# 7. Host cost per op call (benchmarks/host.py): what an uncaptured forward and backward pay
#    on this machine's CPU, next to eager PyTorch, with fastbert's direct launches and with
#    Triton's own (fastbert-triton-launch rows), and where the host time goes (cProfile, in
#    bench.log).
step "host cost" 50 "$OUT/bench.log" $PY -m fastbert.benchmarks.host --calls 100 --model --profile
sed -n '/^# host µs per call/,/^$/p;/^# host ms per call/,/^$/p' "$OUT/bench.log" | tee -a "$SUMMARY"

# 8. The rest of the suite, on the GPU machine.
step "tests (rest, on GPU)" 120 "$OUT/tests.log" ${PYTEST/-n 8/-n 16} -m "not gpu"
grep -E "[0-9]+ (passed|failed)" "$OUT/tests.log" | tail -1 | sed 's/^/  /' | tee -a "$SUMMARY"



say ""
say "== summary (${SECONDS}s) =="
MD=$(ls -t "$OUT"/bench-*.md 2>/dev/null | head -1)
if [ -n "$MD" ]; then
    grep -E "^\*\*Incomplete" "$MD" | tee -a "$SUMMARY"
    # Model rows: workload, impl, ms, speed-up, parity; op rows: op, case, impl, mode, ms, speed-up.
    awk -F'|' '/^## Model/{s="m"} /^## Ops/{s="o"} /^## Notes/{s=""}
        /^\|/ && !/^\|---/ { if (s=="m") print $2 "|" $4 "|" $5 "|" $8 "|" $11; else if (s=="o") print $2 "|" $3 "|" $4 "|" $5 "|" $6 "|" $9 }' \
        "$MD" | head -90 | tee -a "$SUMMARY"
    grep -E "^- " "$MD" | grep -iE "failed|skipped|not run|unavailable|interrupted" | grep -v "compile competitors run on a GPU" \
        | head -20 | tee -a "$SUMMARY"
else
    say "no benchmark report"
fi
grep -hoE "(FAILED|ERROR) tests/[^ ]+" "$OUT/tests.log" 2>/dev/null | sort -u | head -40 | tee -a "$SUMMARY"
if [ -s "$FASTBERT_FAILURE_LOG" ]; then
    say "== why each failed =="
    head -c 6000 "$FASTBERT_FAILURE_LOG" | tee -a "$SUMMARY"
fi
rm -f "$FASTBERT_FAILURE_LOG"
exit 0
