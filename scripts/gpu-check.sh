#!/usr/bin/env bash
# trainmon on one CUDA GPU, in one call of at most ~8 minutes (BUDGET seconds, default 460).
#
# Sections, each with its own timeout, log and line in the summary:
#   env        Python, torch with CUDA, the small dependencies (a venv only if some are missing)
#   a  nvidia-smi
#   b  train-fp16, train-bf16: the reference trainer, monitored, preset small, STEPS optimizer steps
#   c  ddp-gloo: `monitor train --nproc 2 --ddp-backend gloo`: two ranks sharing the one GPU
#   d  sync-fp32, sync-bf16: the monitor under torch.cuda.set_sync_debug_mode("error")
#      (scripts/sync_check.py): no host-device sync, no internal error, a record per step
#   e  overhead: benchmarks/overhead.py --device cuda --preset small --steps STEPS
#   e2 overhead-gpt2: the same on the GPT-2 124M-shaped preset in bf16 (device-bound; CUDA only)
#   e3 gradnorm: benchmarks/gradnorm.py, the grad-norm pass against one read of the gradients (<= 1.2x)
#   f  attention: benchmarks/attention.py --device cuda --preset small --steps STEPS (the probe's cost)
#   g  compile: scripts/compile_check.py, a model compiled after attach with mode="reduce-overhead"
#      (CUDA graphs): the same dynamo/inductor counters with and without the monitor, identical losses
#      (hooks only), and with mon.observe_attention its statistics (cudagraph counters reported)
#   h  hang: scripts/hang_check.py, a kernel (torch.cuda._sleep) far past the stall limit: run.stalled and
#      its stack dump come from the watchdog while the publisher waits on that step's event
# Results: benchmarks/results/gpu-check.md (pass/fail and numbers per section),
#          benchmarks/results/gpu-check/*.log and run directories, overhead-small-cuda.{json,md},
#          attention-small-cuda.{json,md}.
#
# Usage: scripts/gpu-check.sh [--device cuda] [--preset small] [--steps 200] [--results DIR] [--copy-to DIR]
#   --device cpu runs the same sections on CPU (nvidia-smi and sync debug mode skipped): to try the
#   script without a GPU, e.g. scripts/gpu-check.sh --device cpu --preset tiny --steps 20 --results /tmp/x
#   --copy-to DIR copies the summary, the overhead results and a tarball of the logs to DIR at the end.
# Environment:
#   PYTHON         interpreter with a CUDA build of torch (default: python3)
#   TRAINMON_DEPS  a directory holding pydantic, typer, ... (prepended to PYTHONPATH), for machines
#                  without network
#   WHEELS         a wheelhouse for an offline `pip install --no-index --find-links $WHEELS`
#   BUDGET         seconds for the whole script (default 460); sections are cut short to fit it
# The repository itself is used from its checkout (PYTHONPATH): nothing is built or installed from it.
# Exit code: 0 when every section passed, 1 otherwise, 2 when the environment is unusable.

set -u -o pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 2

DEVICE=cuda
PRESET=small
STEPS=${STEPS:-200}
RESULTS=$ROOT/benchmarks/results
COPY_TO=""
BUDGET=${BUDGET:-460}
while [ $# -gt 0 ]; do
    case "$1" in
        --device) DEVICE=$2; shift 2 ;;
        --preset) PRESET=$2; shift 2 ;;
        --steps) STEPS=$2; shift 2 ;;
        --results) RESULTS=$2; shift 2 ;;
        --copy-to) COPY_TO=$2; shift 2 ;;
        -h|--help) sed -n '2,28p' "$0"; exit 0 ;;
        *) echo "gpu-check: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
mkdir -p "$RESULTS" || exit 2
RESULTS=$(cd "$RESULTS" && pwd)
LOGS=$RESULTS/gpu-check
SUMMARY=$RESULTS/gpu-check.md
rm -rf "$LOGS"
mkdir -p "$LOGS/runs"
ROWS=$LOGS/rows.tsv
: >"$ROWS"
T_START=$(date +%s)
CUDA=0
case "$DEVICE" in cuda*) CUDA=1 ;; esac

export PYTHONUNBUFFERED=1
export PYTHONPATH="$ROOT${TRAINMON_DEPS:+:$TRAINMON_DEPS}${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}

now() { date +%s; }
elapsed() { echo $(( $(now) - T_START )); }
row() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >>"$ROWS"; }  # section, result, seconds, numbers

# run_section NAME LIMIT_S COMMAND...: runs COMMAND under a timeout (cut to the time budget left),
# its output to the terminal and LOGS/NAME.log; sets RC and SECS.
run_section() {
    local name=$1 limit=$2
    shift 2
    local left=$(( BUDGET - $(elapsed) - 10 ))
    if [ "$left" -lt 15 ]; then
        echo "=== [$name] skipped: time budget of ${BUDGET}s spent"
        RC=125; SECS=0
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo
    echo "=== [$name] $* (timeout ${limit}s, at $(elapsed)s of ${BUDGET}s)"
    local t0
    t0=$(now)
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$LOGS/$name.log"
    RC=${PIPESTATUS[0]}
    SECS=$(( $(now) - t0 ))
    echo "=== [$name] exit $RC after ${SECS}s"
}

verdict() {  # RC -> PASS / FAIL / TIMEOUT / SKIPPED
    case "$1" in
        0) echo PASS ;;
        124|137) echo TIMEOUT ;;
        125) echo SKIPPED ;;
        *) echo FAIL ;;
    esac
}

write_summary() {
    local total=$(( $(now) - T_START ))
    {
        echo "# trainmon GPU check"
        echo
        echo "$(date -u '+%Y-%m-%d %H:%M:%S UTC') on $(hostname); device \`$DEVICE\`, preset \`$PRESET\`, $STEPS steps;" \
             "commit \`$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)\`" \
             "$(git -C "$ROOT" diff --quiet HEAD 2>/dev/null || echo '(with local changes)'); ${total}s in all" \
             "(budget ${BUDGET}s)."
        [ -n "${ENV_LINE:-}" ] && { echo; echo "$ENV_LINE"; }
        echo
        echo "| section | result | time | numbers |"
        echo "|---|---|---|---|"
        while IFS=$'\t' read -r name result secs numbers; do
            echo "| $name | $result | ${secs}s | $numbers |"
        done <"$ROWS"
        echo
        echo "Logs: \`$(basename "$LOGS")/<section>.log\`; run directories: \`$(basename "$LOGS")/runs/\`."
    } >"$SUMMARY"
    echo
    cat "$SUMMARY"
    if [ -n "$COPY_TO" ]; then
        mkdir -p "$COPY_TO"
        cp "$SUMMARY" "$COPY_TO/"
        cp "$RESULTS"/{overhead,attention}-"$PRESET"-"${DEVICE%%:*}".{json,md} "$COPY_TO/" 2>/dev/null
        tar -czf "$COPY_TO/gpu-check-logs.tar.gz" -C "$RESULTS" "$(basename "$LOGS")" 2>/dev/null
    fi
}
trap write_summary EXIT

# --- env: python, torch, CUDA, the small dependencies -------------------------------------------
echo "=== [env] $PY, torch, dependencies"
T0=$(now)
if ! command -v "$PY" >/dev/null 2>&1; then
    echo "gpu-check: no Python interpreter '$PY' (set PYTHON=/path/to/python)" >&2
    row env FAIL 0 "no interpreter \`$PY\`"
    exit 2
fi
if ! TORCH_LINE=$("$PY" -c 'import sys, torch; print(f"python {sys.version.split()[0]}, torch {torch.__version__}, CUDA {torch.version.cuda}, cuda available {torch.cuda.is_available()}, devices {torch.cuda.device_count()}, distributed {torch.distributed.is_available()}")' 2>"$LOGS/env.log"); then
    cat "$LOGS/env.log" >&2
    echo "gpu-check: $PY cannot import torch; install a CUDA build of torch (>= 2.6) for it, or set PYTHON" >&2
    row env FAIL $(( $(now) - T0 )) "torch not importable by \`$PY\`"
    exit 2
fi
echo "$TORCH_LINE" | tee -a "$LOGS/env.log"
if [ "$CUDA" = 1 ] && ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu-check: torch sees no CUDA device ($TORCH_LINE); use a CUDA build of torch on a GPU machine" >&2
    row env FAIL $(( $(now) - T0 )) "no CUDA: $TORCH_LINE"
    exit 2
fi

missing_modules() {  # prints pip names of the required modules that "$1" cannot import
    "$1" - <<'EOF'
import importlib.util
need = {"pydantic": "pydantic>=2.6", "typer": "typer>=0.12", "prometheus_client": "prometheus-client>=0.19",
        "tensorboard": "tensorboard>=2.14", "rich": "rich>=13", "yaml": "pyyaml>=6"}
print(" ".join(pkg for mod, pkg in need.items() if importlib.util.find_spec(mod) is None))
EOF
}
MISSING=$(missing_modules "$PY")
if [ -n "$MISSING" ]; then
    echo "missing for $PY: $MISSING; installing them into .venv-gpu (system site-packages kept, so torch is shared)"
    if [ ! -x .venv-gpu/bin/python ] && ! "$PY" -m venv --system-site-packages .venv-gpu >>"$LOGS/env.log" 2>&1; then
        echo "gpu-check: cannot create a venv with $PY -m venv (on Debian/Ubuntu: apt-get install python3-venv)" >&2
        row env FAIL $(( $(now) - T0 )) "no venv; missing: $MISSING"
        exit 2
    fi
    VPY=$ROOT/.venv-gpu/bin/python
    # shellcheck disable=SC2086  # word splitting of the package list is intended
    if [ -n "${WHEELS:-}" ]; then
        timeout 240 "$VPY" -m pip install -q --no-index --find-links "$WHEELS" $MISSING google-crc32c 2>&1 | tee -a "$LOGS/env.log" \
            || timeout 240 "$VPY" -m pip install -q --no-index --find-links "$WHEELS" $MISSING 2>&1 | tee -a "$LOGS/env.log"
    else
        timeout 240 "$VPY" -m pip install -q --retries 1 --timeout 15 $MISSING google-crc32c 2>&1 | tee -a "$LOGS/env.log"
    fi
    STILL=$(missing_modules "$VPY")
    if [ -n "$STILL" ]; then
        echo "gpu-check: still missing: $STILL. Without network, bring them: build a wheelhouse on a machine with" >&2
        echo "  the same Python version (pip download -d wheels $STILL google-crc32c) and run with WHEELS=wheels," >&2
        echo "  or point TRAINMON_DEPS at a site-packages directory that holds them." >&2
        row env FAIL $(( $(now) - T0 )) "missing: $STILL"
        exit 2
    fi
    PY=$VPY
fi
"$PY" -c 'import google_crc32c' 2>/dev/null || echo "note: google-crc32c missing: event files use the slower pure-Python CRC"
if ! "$PY" -c 'import monitor.cli.app' >>"$LOGS/env.log" 2>&1; then
    cat "$LOGS/env.log" >&2
    echo "gpu-check: the repository's monitor package does not import with $PY (see above)" >&2
    row env FAIL $(( $(now) - T0 )) "monitor does not import"
    exit 2
fi
ENV_LINE="Environment: $TORCH_LINE; interpreter \`$PY\`."
row env PASS $(( $(now) - T0 )) "$TORCH_LINE"

# A run directory in a few numbers: records per rank, skipped steps, loss, alerts (from the run dir itself).
run_numbers() {
    "$PY" - "$1" <<'EOF' 2>/dev/null || echo "run dir unreadable"
import json, sys
from collections import Counter
from pathlib import Path
from monitor.runlog.reader import read_alerts, read_run
d = Path(sys.argv[1])
data = read_run(d)
info = json.loads((d / "run.json").read_text())
recs = data.records.get(0, [])
parts = [f"world size {info.get('world_size')}",
         "records " + "/".join(str(len(data.records[r])) for r in sorted(data.records))]
if recs:
    first, last = recs[0].loss, recs[-1].loss
    parts.append(f"loss {first:.3f} -> {last:.3f}")
    parts.append(f"skipped {sum(bool(r.skipped) for r in recs)}")
    times = sorted(r.step_time for r in recs[5:] if getattr(r, "step_time", None))
    if times:
        parts.append(f"median step {times[len(times) // 2] * 1e3:.1f} ms")
alerts = Counter(f"{a.rule} ({a.severity.value})" for a in read_alerts(d) if getattr(a, "status", "firing") == "firing")
parts.append("alerts: " + (", ".join(f"{k} x{v}" for k, v in sorted(alerts.items())) or "none"))
print("; ".join(parts))
EOF
}

# --- a: nvidia-smi -------------------------------------------------------------------------------
if [ "$CUDA" = 1 ]; then
    run_section nvidia-smi 30 nvidia-smi
    NUMS=$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -1)
    row "a nvidia-smi" "$(verdict $RC)" "$SECS" "${NUMS:-nvidia-smi failed}"
else
    row "a nvidia-smi" SKIPPED 0 "device $DEVICE"
fi

# --- b: the reference trainer, fp16 (GradScaler) and bf16 --------------------------------------
for prec in fp16 bf16; do
    RUN=$LOGS/runs/train-$prec
    run_section "train-$prec" 110 "$PY" -m monitor.cli.app train --preset "$PRESET" --steps "$STEPS" \
        --device "$DEVICE" --precision "$prec" --run-dir "$RUN" --set log_every=50
    NUMS=$(grep -o 'done: .*' "$LOGS/train-$prec.log" | tail -1)
    row "b train $prec" "$(verdict $RC)" "$SECS" "${NUMS:-no summary line}; $(run_numbers "$RUN")"
done

# --- c: DDP, 2 ranks on one GPU over gloo --------------------------------------------------------
RUN=$LOGS/runs/ddp-gloo
DDP_STEPS=$(( STEPS / 2 > 10 ? STEPS / 2 : 10 ))
run_section ddp-gloo 150 "$PY" -m monitor.cli.app train --nproc 2 --ddp-backend gloo --preset "$PRESET" \
    --steps "$DDP_STEPS" --device "$DEVICE" --run-dir "$RUN" --set log_every=25
NUMS=$(run_numbers "$RUN")
if [ "$RC" = 0 ] && ! grep -q "world size 2; records $DDP_STEPS/$DDP_STEPS" <<<"$NUMS"; then
    RC=1  # both ranks must have written a record per step into the one run dir
fi
row "c ddp 2 ranks (gloo)" "$(verdict $RC)" "$SECS" "$(grep -o 'done: .*' "$LOGS/ddp-gloo.log" | tail -1); $NUMS"

# --- d: no host-device sync under set_sync_debug_mode("error") -----------------------------------
for prec in fp32 bf16; do
    run_section "sync-$prec" 90 "$PY" scripts/sync_check.py --device "$DEVICE" --preset "$PRESET" \
        --precision "$prec" --steps 40 --warmup 5 --run-dir "$LOGS/runs/sync-$prec" --out "$LOGS/sync-$prec.json"
    NUMS=$(grep -E '^(PASS|FAIL) sync-check' "$LOGS/sync-$prec.log" | tail -1)
    row "d sync debug $prec" "$(verdict $RC)" "$SECS" "${NUMS:-no result line}"
done

# --- e: the monitor's overhead per step ----------------------------------------------------------
# overhead SECTION PRESET STEPS LIMIT LABEL: benchmarks/overhead.py on PRESET, its results in a row.
overhead() {
    touch "$MARK"
    run_section "$1" "$4" "$PY" benchmarks/overhead.py --device "$DEVICE" --preset "$2" --steps "$3"
    OVH=$ROOT/benchmarks/results/overhead-$2-${DEVICE%%:*}.json
    [ "$OVH" -nt "$MARK" ] || OVH=/nonexistent  # never report an older run's numbers
    NUMS=$("$PY" - "$OVH" <<'EOF' 2>/dev/null || echo "no new results file"
import json, sys
rows = json.load(open(sys.argv[1]))["rows"]
print("; ".join(f"{r['config']}: {r['median_step_ms']:.2f} ms/step, {(r['median_paired_ratio'] - 1) * 100:+.2f}%"
                for r in rows))
EOF
)
    if [ "$RESULTS" != "$ROOT/benchmarks/results" ] && [ -f "$OVH" ]; then
        cp "$OVH" "${OVH%.json}.md" "$RESULTS/" 2>/dev/null
    fi
    row "$5" "$(verdict $RC)" "$SECS" "$NUMS"
}
MARK=$LOGS/.overhead-start
overhead overhead "$PRESET" "$STEPS" 200 "e overhead"
# e2: a device-bound workload, GPT-2 124M-shaped in bf16 (target <= 0.5%)
if [ "${DEVICE%%:*}" = cuda ]; then
    overhead overhead-gpt2 gpt2 40 150 "e2 overhead (gpt2, bf16)"
fi
# e3: the gradient-norm pass against one read of the gradients (target <= 1.2x)
touch "$MARK"
run_section gradnorm 120 "$PY" benchmarks/gradnorm.py --device "$DEVICE"
GN=$ROOT/benchmarks/results/gradnorm.json
[ "$GN" -nt "$MARK" ] || GN=/nonexistent  # never report an older run's numbers
NUMS=$("$PY" - "$GN" "${DEVICE%%:*}" <<'EOF' 2>/dev/null || echo "no new results file"
import json, sys
e = json.load(open(sys.argv[1]))["devices"][sys.argv[2]]
print("; ".join(f"{r['preset']}: {r['monitor_floor']:.2f}x one read, {r['monitor_bare']:.2f}x bare" for r in e["rows"]))
EOF
)
if [ "$RESULTS" != "$ROOT/benchmarks/results" ] && [ -f "$GN" ]; then
    cp "$GN" "${GN%.json}.md" "$RESULTS/" 2>/dev/null
fi
row "e3 grad-norm pass (<= 1.2x)" "$(verdict $RC)" "$SECS" "$NUMS"

# --- f: the attention probe's cost -----------------------------------------------------------------
touch "$MARK"
run_section attention 150 "$PY" benchmarks/attention.py --device "$DEVICE" --preset "$PRESET" --steps "$STEPS"
ATT=$ROOT/benchmarks/results/attention-$PRESET-${DEVICE%%:*}.json
[ "$ATT" -nt "$MARK" ] || ATT=/nonexistent
NUMS=$("$PY" - "$ATT" <<'EOF' 2>/dev/null || echo "no new results file"
import json, sys
r = json.load(open(sys.argv[1]))
print(f"sampled step +{r['sampled_step_cost_ms']:.2f} ms ({r['sampled_step_share'] * 100:.1f}%), "
      f"interval {r['defaults_interval']}, amortised {r['amortised_share'] * 100:.2f}%")
EOF
)
if [ "$RESULTS" != "$ROOT/benchmarks/results" ] && [ -f "$ATT" ]; then
    cp "$ATT" "${ATT%.json}.md" "$RESULTS/" 2>/dev/null
fi
row "f attention probe" "$(verdict $RC)" "$SECS" "$NUMS"

# --- g: torch.compile (CUDA graphs on a GPU) -----------------------------------------------------
for what in hooks observe; do
    run_section "compile-$what" 150 "$PY" scripts/compile_check.py --device "$DEVICE" --steps 30 \
        $([ "$what" = observe ] && echo --observe)
    NUMS=$(grep -E '^(PASS|FAIL) compile-check' "$LOGS/compile-$what.log" | tail -1)
    row "g compile ($what)" "$(verdict $RC)" "$SECS" "${NUMS:-no result line}"
done

# --- h: a hung kernel -------------------------------------------------------------------------------
run_section hang 60 "$PY" scripts/hang_check.py --device "$DEVICE" --hang-seconds 20
NUMS=$(grep -E '^(PASS|FAIL|SKIPPED) hang-check' "$LOGS/hang.log" | tail -1)
row "h hang" "$(verdict $RC)" "$SECS" "${NUMS:-no result line}"

FAILED=$(cut -f2 "$ROWS" | grep -cv -E '^(PASS|SKIPPED)$')
echo
echo "gpu-check: $(grep -c . "$ROWS") sections, $FAILED not passed, $(elapsed)s"
[ "$FAILED" = 0 ]
