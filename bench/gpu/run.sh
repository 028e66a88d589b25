#!/usr/bin/env bash
# Measures the CUDA build on a GPU machine, from the pack that
# bench/gpu/build-cuda.sh writes (xz-compressed binaries, a SmolLM2-135M-shaped
# Q8_0 model, the HWU64 training file). Run from anywhere; needs no Rust, no
# network and no CUDA toolkit there, only the NVIDIA driver and the CUDA 13
# libraries that PyTorch's wheels install (cuBLAS, cuRAND, NVRTC, cudart).
#
#   bench/gpu/run.sh [STEPS=all] [PACK_DIR=var/gpu] [OUT_DIR=$OUT or var/gpu/out]
#
# STEPS: `all`, or any of `engine` (step 1), `engine-contiguous` (1b),
# `engine-stored` (1c), `engine-f32` (1d), `overhead` (1e), `server` (2), `server-bf16` (2b), `server-contiguous` (2c), `train` (3),
# `route-ft` (3b), `baseline` (4) joined with `+`, in the order they should run. The packed
# CUDA binaries are ~20 MB each compressed, so one 64 MiB transfer to a GPU
# machine cannot hold all three: `engine+server` needs flywheel-bench,
# flywheel-server and the model; `train+baseline` flywheel-trainer, the model
# and the data.
#
# Writes OUT_DIR/summary.md (the table, also printed) and OUT_DIR/report.tgz
# (every JSON report and log).
#
# Steps (each logged, a failed one does not stop the others):
#   1. engine in process: load, route decision p50/p99 (back to back and
#      idle), TTFT (58-token prompt), prefill, batch-1 decode tokens/s after a
#      short and a ~500-token prompt, the generation engine with paged
#      attention (the GPU default)                      (flywheel-bench engine)
#  1b. the same with the contiguous KV cache (paged_attention = "off"): TTFT,
#      prefill and decode, to compare in the same run
#  1c. the same with the file's Q8_0 weights in the router engine too
#      (weights = "stored"; the default gives routers an f32 copy)
#  1d. the same with f32 weights in the generation engine too (weights = "f32")
#  1e. per-step fixed cost: the same bench on two models made there with
#      tiny-model.py (the model's vocabulary and tokenizer, blocks of dim 64,
#      1 and 30 of them): decode and route latency apart from arithmetic,
#      and the cost per block (kernel launches)         (needs numpy)
#   2. the gRPC server on the GPU: route through gRPC, streaming chat at 1, 8,
#      32 and 64 concurrent streams                    (flywheel-bench)
#  2b. the same server with bf16 activations (f32 is the default): route,
#      chat at 1 and 8 streams, to compare in the same run
#  2c. the same server with the contiguous KV cache and mistral.rs's default
#      scheduler (paged_attention = "off"): route, chat at 1, 8, 32, 64 streams
#   3. LoRA SFT on 685 HWU64 examples, 3 epochs, r16, all linear layers: all
#      30 blocks (PEFT's setting) and the default top 8  (flywheel-trainer train)
#  3b. route decisions of fine-tuned routers, as served (their own short
#      prompt): the top-8 LoRA model of step 3 and one pruned to 12 blocks
#      (trained here when missing)                      (flywheel-trainer eval)
#   4. same-machine baseline: PyTorch + PEFT on the same model shape (bf16)
#      (FLYWHEEL_GPU_F32=1 adds a full-f32 LoRA run to step 3)
# Env: FLYWHEEL_DEVICE (cuda), FLYWHEEL_GPU_SECS (10 s per load phase),
#      FLYWHEEL_GPU_STREAMS (chat stream counts of steps 2 and 2b),
#      FLYWHEEL_GPU_EXAMPLES (685), FLYWHEEL_GPU_EPOCHS (3), FLYWHEEL_GPU_SAMPLES
#      (200 route decisions in process) - smaller values
#      smoke-test the script on a CPU.
set -uo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$root"
steps="${1:-all}"
[ "$steps" = all ] && steps="engine+server+train+route-ft+baseline"
pack="${2:-var/gpu}"
out="${3:-${OUT:-var/gpu/out}}"
for s in ${steps//+/ }; do
  case "$s" in engine|engine-contiguous|engine-stored|engine-f32|overhead|server|server-bf16|server-contiguous|train|route-ft|baseline) ;;
    *) echo "usage: $0 [all|engine+engine-contiguous+engine-stored+engine-f32+overhead+server+server-bf16+server-contiguous+train+route-ft+baseline] [PACK_DIR] [OUT_DIR]" >&2; exit 2 ;; esac
done
device="${FLYWHEEL_DEVICE:-cuda}"
secs="${FLYWHEEL_GPU_SECS:-10}"
examples="${FLYWHEEL_GPU_EXAMPLES:-685}"
epochs="${FLYWHEEL_GPU_EPOCHS:-3}"
samples="${FLYWHEEL_GPU_SAMPLES:-200}"
work="${TMPDIR:-/tmp}/flywheel-gpu"
logs="$work/logs"
report="$work/report"
rm -rf "$logs" "$report"
mkdir -p "$work" "$logs" "$report" "$out"
step() { echo; echo "== $* ($(date +%T))"; }
# The table and the reports so far, rewritten after each step so that a run
# cut short still returns what it measured.
summarise() {
  python3 bench/gpu/summary.py "$report" > "$out/summary.md" 2>&1
  tar czf "$out/report.tgz" -C "$work" report logs
}

step "unpack"
# The binaries go to $work/bin; $work/flywheel-* are wrappers that run them
# with the CUDA library path (below), which is set for them only: a Python
# linked to a shared libpython picks another interpreter's library (and its
# packages) from a path that lists the system's library folder.
mkdir -p "$work/bin"
for f in flywheel-server flywheel-trainer flywheel-bench model.gguf; do
  dest="$work/$f"
  case "$f" in flywheel-*) dest="$work/bin/$f" ;; esac
  if [ -e "$pack/$f.xz" ] && [ ! "$dest" -nt "$pack/$f.xz" ]; then xz -dc "$pack/$f.xz" > "$dest"; elif [ -e "$pack/$f" ]; then cp "$pack/$f" "$dest"; fi
done
chmod +x "$work"/bin/flywheel-* 2>/dev/null

# cuBLAS, cuRAND, NVRTC and cudart: from the Python packages' nvidia/*/lib
# folders (PyTorch's CUDA 13 wheels), else a CUDA install; libcuda.so.1 comes
# from the driver (its usual folders are added too).
libdirs="$(python3 - <<'EOF' 2>/dev/null
import glob, os, site, sys
roots = set(site.getsitepackages() + [site.getusersitepackages()] + [p for p in sys.path if p.endswith("-packages")])
found = []
for r in sorted(roots):
    for d in sorted(glob.glob(os.path.join(r, "nvidia", "*", "lib"))):
        if glob.glob(os.path.join(d, "lib*.so*")):
            found.append(d)
print(":".join(dict.fromkeys(found)))
EOF
)"
for d in /usr/local/cuda/lib64 /usr/local/nvidia/lib64 /usr/local/nvidia/lib /usr/lib/x86_64-linux-gnu; do
  [ -d "$d" ] && libdirs="${libdirs:+$libdirs:}$d"
done
cuda_path="${libdirs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
echo "library path of the flywheel binaries: $cuda_path"
for b in "$work"/bin/flywheel-*; do
  [ -e "$b" ] || continue
  printf '#!/bin/sh\nLD_LIBRARY_PATH="%s" exec "%s" "$@"\n' "$cuda_path" "$b" > "$work/${b##*/}"
  chmod +x "$work/${b##*/}"
done
missing="$(LD_LIBRARY_PATH="$cuda_path" ldd "$work"/bin/flywheel-* 2>/dev/null | grep 'not found' | sort -u || true)"
[ -n "$missing" ] && echo "MISSING LIBRARIES:" && echo "$missing"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$report/gpu.txt"

# Each step is bounded (FLYWHEEL_GPU_STEP_S, default 180 s per command).
limit="${FLYWHEEL_GPU_STEP_S:-180}"

# engine TAG PAGED [WEIGHTS] [MODEL] [SAMPLES]: flywheel-bench engine with
# --paged-attention PAGED and --weights WEIGHTS (auto) on MODEL (the packed
# one), report engine$TAG.json.
engine() {
  local tag=$1 paged=$2 weights=${3:-auto} model=${4:-$work/model.gguf} n=${5:-$samples}
  (command -v nvidia-smi >/dev/null && exec nvidia-smi dmon -s um -d 1 >"$logs/dmon-engine$tag.log" 2>&1) &
  local dmon=$!
  timeout "$limit" "$work/flywheel-bench" engine --model "$model" --device "$device" --activations f32 \
    --paged-attention "$paged" --weights "$weights" \
    --route-requests "$n" --ttft-requests $((n / 4 + 1)) --decode-runs $((n / 40 + 1)) \
    --decode-long-prompt --json "$report/engine$tag.json" 2>"$logs/engine$tag.log"
  echo "exit $?"; grep -v '^ *[0-9]*: \|^ *at ' "$logs/engine$tag.log" | tail -5
  kill $dmon 2>/dev/null; pkill -f "nvidia-smi dmon" 2>/dev/null
  summarise
}

run_engine() {
  step "1. engine in process ($device)"
  engine "" auto
}

run_engine-contiguous() {
  step "1b. engine in process ($device), contiguous KV cache"
  engine "-contiguous" off
}

run_engine-stored() {
  step "1c. engine in process ($device), the file's weights in the router engine too"
  engine "-stored" auto stored
}

run_engine-f32() {
  step "1d. engine in process ($device), f32 weights in the generation engine too"
  engine "-f32" auto f32
}

run_overhead() {
  step "1e. per-step fixed cost ($device): models with 1 and 30 tiny blocks"
  for layers in 1 30; do
    if python3 bench/gpu/tiny-model.py "$work/model.gguf" "$work/tiny$layers.gguf" "$layers"; then
      engine "-tiny$layers" auto auto "$work/tiny$layers.gguf" $((samples < 60 ? samples : 60))
    else
      echo "skipped: could not write the tiny model (numpy missing?)"
    fi
  done
}

# serve CONFIG TAG STREAMS...: the server on CONFIG, route at 1 client and
# chat at each stream count, reports tagged TAG.
serve() {
  local config=$1 tag=$2; shift 2
  rm -f "$work"/requests.db*
  "$work/flywheel-server" --config "$config" --model "$work/model.gguf" --device "$device" \
    --log-path "$work/requests.db" 2>"$logs/server$tag.log" &
  local server=$!
  trap "kill $server 2>/dev/null || true" EXIT
  for _ in $(seq 600); do
    grep -q "listening" "$logs/server$tag.log" 2>/dev/null && break
    kill -0 $server 2>/dev/null || break
    sleep 0.2
  done
  grep -o 'load_ms=[0-9]*' "$logs/server$tag.log" | head -1 | tee "$report/server-load$tag.txt"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=memory.used --format=csv,noheader \
    | sed 's/^/GPU memory used with the server up: /' | tee "$report/gpu-memory$tag.txt"
  grep -q "listening" "$logs/server$tag.log" || { echo "server did not start:"; tail -20 "$logs/server$tag.log"; }
  local addr=http://127.0.0.1:50071
  bench() { timeout $((secs * 3 + 60)) "$work/flywheel-bench" --addr "$addr" --duration "$secs" --drain-s "$secs" --warmup 4 "$@"; echo "exit $?"; }
  bench --mode route --concurrency 1 --json "$report/route-c1$tag.json"
  for c in "$@"; do
    echo "-- chat, $c streams, up to 128 tokens"
    bench --mode chat --concurrency "$c" --max-tokens 128 --json "$report/chat-c$c$tag.json"
  done
  kill $server 2>/dev/null; wait $server 2>/dev/null
  # Route decision time of the route-only requests (the request log's route_latency_ms).
  python3 - "$work/requests.db" "$report/route-decisions$tag.json" <<'EOF'
import json, sqlite3, sys
rows = sorted(r[0] for r in sqlite3.connect(sys.argv[1]).execute(
    "SELECT route_latency_ms FROM requests WHERE kind = 'route' AND route_latency_ms IS NOT NULL"))
q = lambda p: rows[min(len(rows) - 1, int(p * len(rows)))] if rows else None
json.dump({"n": len(rows), "p50": q(0.5), "p90": q(0.9), "p99": q(0.99)}, open(sys.argv[2], "w"))
print(f"route decisions in the log: n={len(rows)} p50={q(0.5)} p99={q(0.99)} ms")
EOF
  summarise
}

run_server() {
  step "2. gRPC server ($device)"
  serve bench/gpu/server.toml "" ${FLYWHEEL_GPU_STREAMS:-1 8 32 64}
}

run_server-bf16() {
  step "2b. gRPC server ($device), bf16 activations"
  sed 's/^device = "cuda"$/device = "cuda"\nactivations = "bf16"/' bench/gpu/server.toml > "$work/server-bf16.toml"
  grep -q '^activations = "bf16"' "$work/server-bf16.toml" || echo "could not set bf16 activations in the config"
  serve "$work/server-bf16.toml" "-bf16" ${FLYWHEEL_GPU_STREAMS:-1 8}
}

run_server-contiguous() {
  step "2c. gRPC server ($device), contiguous KV cache (paged_attention = off)"
  sed 's/^device = "cuda"$/device = "cuda"\npaged_attention = "off"/' bench/gpu/server.toml > "$work/server-contiguous.toml"
  grep -q '^paged_attention = "off"' "$work/server-contiguous.toml" || echo "could not turn paged attention off in the config"
  serve "$work/server-contiguous.toml" "-contiguous" ${FLYWHEEL_GPU_STREAMS:-1 8 32 64}
}

train() {
  local name=$1; shift
  echo "-- r16, all linear layers: $*"
  rm -rf "$work/ft-$name"
  timeout "$limit" "$work/flywheel-trainer" train --data "$pack/hwu64_train.csv" --label-column scenario \
    --max-examples "$examples" --epochs "$epochs" --base "$work/model.gguf" --out "$work/ft-$name" \
    --device "$device" "$@" 2>"$logs/train-$name.log" </dev/null
  echo "exit $?"; grep -v '^ *[0-9]*: \|^ *at ' "$logs/train-$name.log" | tail -2
  [ -e "$work/ft-$name/manifest.json" ] && cp "$work/ft-$name/manifest.json" "$report/train-$name.json"
  summarise
}

run_train() {
  step "3. LoRA SFT ($device): $examples HWU64 examples x $epochs epochs"
  train 8 --trained-blocks 8
  train 30 --trained-blocks 30
  [ -n "${FLYWHEEL_GPU_F32:-}" ] && train 30-f32 --trained-blocks 30 --tf32 false
}

# Fine-tuned routers answer from their own short prompt (no expert list), and a
# pruned one runs fewer blocks: their decisions as the server makes them, from
# `flywheel-trainer eval` on $samples rows drawn from the training file (the
# models' accuracy means nothing here: the packed model's weights are not the
# real ones).
run_route-ft() {
  step "3b. fine-tuned routers' route decisions ($device): LoRA top 8 of 30 blocks, pruned to 12 blocks"
  [ -e "$work/ft-8/model.gguf" ] || train 8 --trained-blocks 8
  [ -e "$work/ft-k12/model.gguf" ] || train k12 --keep-layers 12 --trained-blocks 12
  python3 - "$pack/hwu64_train.csv" "$work/route-test.csv" "$samples" <<'EOF'
import csv, random, sys
with open(sys.argv[1], newline="") as f:
    rows = list(csv.DictReader(f))
rows = random.Random(0).sample(rows, min(int(sys.argv[3]), len(rows)))
with open(sys.argv[2], "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=["text", "scenario"], extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
EOF
  for m in 8 k12; do
    [ -e "$work/ft-$m/model.gguf" ] || { echo "skipped ft-$m: no model"; continue; }
    echo "-- ft-$m"
    timeout "$limit" "$work/flywheel-trainer" eval --model "$work/ft-$m/model.gguf" --data "$work/route-test.csv" \
      --label-column scenario --device "$device" --report "$report/route-ft-$m.json" >"$logs/route-ft-$m.out" 2>"$logs/route-ft-$m.log"
    echo "exit $?"; head -3 "$logs/route-ft-$m.out"; grep -v '^ *[0-9]*: \|^ *at ' "$logs/route-ft-$m.log" | tail -2
  done
  summarise
}

run_baseline() {
  step "4. baseline: PyTorch + PEFT, same model shape"
  if python3 -c "import torch, peft, transformers; assert torch.cuda.is_available()" 2>/dev/null; then
    timeout "$limit" python3 bench/gpu/peft_baseline.py "$report/peft.json" 1 >"$logs/peft.log" 2>&1
    echo "exit $?"; tail -12 "$logs/peft.log"
  else
    echo "skipped: no CUDA PyTorch with peft here"
  fi
  summarise
}

for s in ${steps//+/ }; do "run_$s"; done

step "summary"
summarise
cat "$out/summary.md"
