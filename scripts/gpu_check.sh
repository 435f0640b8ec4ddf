#!/usr/bin/env bash
# GPU check, run ON the GPU machine in a copy of the repo with wheelhouse/ carried
# (make gpu-wheelhouse). Needs python3 with torch + cupy; no Rust, no network, no .venv.
# Installs the missing pure-python test deps into a private folder, puts the
# wheel's qdelta._core beside the sources, runs the GPU tests (JUnit XML) and
# every benches/gpu/*.py, and writes $OUT/summary.md. A failing step does not
# stop the next; the whole run stays inside QDELTA_GPU_BUDGET_S (default 420 s).
# Exit status: 0 only when every step exited 0 (a benchmark skipped for lack of
# time does not count as failed; the GPU tests skipped for it do). Otherwise 1,
# after all the logs and the summary have been written.
set -u
cd "$(dirname "$0")/.."
PY=${QDELTA_GPU_PYTHON:-python3}
OUT=${OUT:-$PWD/results/gpu-check}
BUDGET=${QDELTA_GPU_BUDGET_S:-420}
mkdir -p "$OUT"
START=$(date +%s)
SITE=$(mktemp -d /tmp/qdelta-gpu-site.XXXXXX)
SUMMARY="$OUT/summary.md"
STEPS="$OUT/steps.tsv"
: >"$STEPS"
export PYTHONPATH="$SITE:$PWD/python${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONDONTWRITEBYTECODE=1

left() { echo $((BUDGET - ($(date +%s) - START))); }

# step NAME MAX_SECONDS CMD...: run with a timeout bounded by the time left; log to $OUT/NAME.log.
step() {
    local name=$1 max=$2
    shift 2
    local limit
    limit=$(left)
    ((limit > max)) && limit=$max
    if ((limit < 5)); then
        printf '%s\tskipped\t0\n' "$name" >>"$STEPS"
        echo "== $name: skipped (time budget)"
        return
    fi
    echo "== $name (limit ${limit}s)"
    local t0=$(date +%s)
    timeout -k 5 "$limit" bash -c '"$@"' step "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    printf '%s\t%s\t%s\n' "$name" "$rc" "$(($(date +%s) - t0))" >>"$STEPS"
    tail -n 5 "$OUT/$name.log"
}

environment() {
    echo "python: $($PY --version 2>&1) ($PY)"
    command -v nvidia-smi >/dev/null && nvidia-smi -L
    $PY - <<'PYEOF'
import importlib
for mod in ("torch", "cupy", "numpy", "pytest", "hypothesis"):
    try:
        m = importlib.import_module(mod)
        print(f"{mod}: {getattr(m, '__version__', '?')}")
    except Exception as exc:
        print(f"{mod}: missing ({type(exc).__name__}: {exc})")
import torch
print("cuda device:", torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device")
PYEOF
}

install_deps() {
    # dist-name:import-name; only what is not importable already.
    local missing=()
    for pair in pytest:pytest pluggy:pluggy iniconfig:iniconfig packaging:packaging \
        hypothesis:hypothesis sortedcontainers:sortedcontainers attrs:attrs \
        pytest_timeout:pytest_timeout tqdm:tqdm safetensors:safetensors; do
        local dist=${pair%%:*} mod=${pair##*:}
        if ! $PY -c "import $mod" 2>/dev/null; then
            local whl
            whl=$(ls wheelhouse/"$dist"-*.whl 2>/dev/null | head -n 1)
            if [[ -n $whl ]]; then missing+=("$whl"); else echo "no wheel for missing $dist"; fi
        fi
    done
    if ((${#missing[@]})); then
        echo "installing into $SITE: ${missing[*]}"
        $PY -m pip install --quiet --no-deps --no-index --target "$SITE" "${missing[@]}" || return 1
    else
        echo "all test deps importable"
    fi
    # The abi3 extension from the carried wheel, beside the sources pytest imports.
    local wheel
    wheel=$(ls wheelhouse/qdelta-*.whl 2>/dev/null | head -n 1)
    [[ -n $wheel ]] || { echo "no qdelta wheel in wheelhouse/"; return 1; }
    $PY - "$wheel" <<'PYEOF'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as whl:
    names = [n for n in whl.namelist() if n.startswith("qdelta/_core")]
    for name in names:
        with open("python/" + name, "wb") as f:
            f.write(whl.read(name))
    print("extracted", names)
PYEOF
    $PY -c "import qdelta, qdelta._core; print('qdelta', qdelta.__version__, qdelta.__file__)"
}

# failed_steps: the names of the steps that failed, one a line (see the header).
failed_steps() {
    awk -F'\t' '$2 != "0" && !($2 == "skipped" && $1 != "gpu-tests") {print $1}' "$STEPS"
}

summary() {
    local failed
    failed=$(failed_steps | paste -sd ' ' -)
    {
        echo "# qdelta gpu-check"
        echo
        echo '```'
        cat "$OUT/environment.log" 2>/dev/null
        echo '```'
        echo
        echo "| step | exit | seconds |"
        echo "|---|---|---|"
        awk -F'\t' '{printf "| %s | %s | %s |\n", $1, $2, $3}' "$STEPS"
        echo
        echo "Total: $(($(date +%s) - START)) s of a ${BUDGET} s budget."
        echo
        if [[ -n $failed ]]; then
            echo "Result: FAILED (steps: $failed); gpu_check.sh exits 1."
        else
            echo "Result: every step passed; gpu_check.sh exits 0."
        fi
        echo
        $PY - "$OUT/junit-gpu.xml" <<'PYEOF' 2>/dev/null || echo "(no JUnit report)"
import sys, xml.etree.ElementTree as ET
root = ET.parse(sys.argv[1]).getroot()
suites = [root] if root.tag == "testsuite" else list(root)
count = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
print("## GPU tests\n")
print(", ".join(f"{k}: {v}" for k, v in count.items()) + "\n")
for case in root.iter("testcase"):
    for bad in list(case.findall("failure")) + list(case.findall("error")):
        msg = (bad.get("message") or "").splitlines()[0][:300] if bad.get("message") else ""
        print(f"- {case.get('classname')}::{case.get('name')}: {msg}")
PYEOF
        for md in "$OUT"/*.md; do
            [[ $md == "$SUMMARY" ]] && continue
            echo
            cat "$md"
        done
    } >"$SUMMARY"
    echo "== summary: $SUMMARY"
    cat "$SUMMARY"
}
trap summary EXIT
export -f environment install_deps
export PY SITE OUT

step environment 60 environment
step install 60 install_deps
step gpu-tests 240 $PY -m pytest -m gpu tests -q -p no:cacheprovider --continue-on-collection-errors \
    --junitxml="$OUT/junit-gpu.xml" -o junit_family=xunit1 --timeout 120
for bench in benches/gpu/*.py; do
    name=$(basename "$bench" .py)
    budget=$(($(left) - 40))
    step "$name" $((budget > 0 ? budget + 30 : 0)) $PY "$bench" --out "$OUT" --budget-s "$budget"
done
# Nsight Compute, where the machine has it: why a kernel misses its target (memory
# latency, DRAM efficiency, shared memory, issue). Never fails the check: a machine
# without counter permissions (ERR_NVGPUCTRPERM) still passes.
profile() {
    local ncu
    ncu=$(command -v ncu || ls /usr/local/cuda*/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -n 1)
    if [[ -z $ncu ]]; then
        echo "no Nsight Compute (ncu) on this machine: no profile"
        return 0
    fi
    "$ncu" --version | tail -n 1
    "$ncu" --target-processes all --kernel-name regex:'qd_delta_lut|qd_delta_gemm|qd_delta_mm|attention_block' \
        --launch-count 12 --section SpeedOfLight --section MemoryWorkloadAnalysis \
        --section Occupancy --section WarpStateStats --section LaunchStats \
        --csv --page details --log-file "$OUT/ncu.csv" \
        $PY scripts/profile_kernels.py || echo "ncu exited with $? (see $OUT/ncu.csv)"
    return 0
}
export -f profile
step profile 120 profile
# The EXIT trap writes the summary; the status given to exit is kept.
failed=$(failed_steps | paste -sd ' ' -)
if [[ -n $failed ]]; then
    echo "== failed steps: $failed"
    exit 1
fi
exit 0
