#!/usr/bin/env bash
# Measures the CUDA build on a GPU machine, from the pack that
# bench/gpu/build-cuda.sh writes (xz-compressed binaries, a SmolLM2-135M-shaped
# Q8_0 model, the HWU64 training file). Run from anywhere; needs no Rust, no
# network and no CUDA toolkit there, only the NVIDIA driver and the CUDA 13
# libraries that PyTorch's wheels install (cuBLAS, cuRAND, NVRTC, cudart).
#
#   bench/gpu/run.sh [PACK_DIR=var/gpu] [OUT_DIR=$OUT or var/gpu/out]
#
# Writes OUT_DIR/summary.md (the table, also printed) and OUT_DIR/report.tgz
# (every JSON report and log).
#
# Steps (each logged, a failed one does not stop the others):
#   1. engine in process: load, route decision p50/p99, TTFT (58-token
#      prompt), prefill and batch-1 decode tokens/s   (flywheel-bench engine)
#   2. the gRPC server on the GPU: route through gRPC, streaming chat at 1, 8,
#      32 and 64 concurrent streams                    (flywheel-bench)
#   3. LoRA SFT on 685 HWU64 examples, 3 epochs, r16, all linear layers: all
#      30 blocks (PEFT's setting) and the default top 8  (flywheel-trainer train)
#   4. same-machine baseline: PyTorch + PEFT on the same model shape (bf16)
# Env: FLYWHEEL_DEVICE (cuda), FLYWHEEL_GPU_SECS (10 s per load phase),
#      FLYWHEEL_GPU_EXAMPLES (685), FLYWHEEL_GPU_EPOCHS (3), FLYWHEEL_GPU_SAMPLES
#      (200 route decisions in process) - smaller values
#      smoke-test the script on a CPU.
set -uo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$root"
pack="${1:-var/gpu}"
out="${2:-${OUT:-var/gpu/out}}"
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

step "unpack"
for f in flywheel-server flywheel-trainer flywheel-bench model.gguf; do
  if [ -e "$pack/$f.xz" ]; then xz -dc "$pack/$f.xz" > "$work/$f"; elif [ -e "$pack/$f" ]; then cp "$pack/$f" "$work/$f"; fi
done
chmod +x "$work"/flywheel-*

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
export LD_LIBRARY_PATH="${libdirs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
missing="$(ldd "$work/flywheel-server" | grep 'not found' || true)"
[ -n "$missing" ] && echo "MISSING LIBRARIES:" && echo "$missing"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$report/gpu.txt"

step "1. engine in process ($device)"
timeout 240 "$work/flywheel-bench" engine --model "$work/model.gguf" --device "$device" \
  --route-requests "$samples" --ttft-requests $((samples / 4 + 1)) --decode-runs $((samples / 40 + 1)) --json "$report/engine.json" 2>"$logs/engine.log"
echo "exit $?"; tail -3 "$logs/engine.log"

step "2. gRPC server ($device)"
rm -f "$work"/requests.db*
"$work/flywheel-server" --config bench/gpu/server.toml --model "$work/model.gguf" --device "$device" \
  --log-path "$work/requests.db" 2>"$logs/server.log" &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
for _ in $(seq 600); do
  grep -q "listening" "$logs/server.log" 2>/dev/null && break
  kill -0 $server 2>/dev/null || break
  sleep 0.2
done
grep -o 'load_ms=[0-9]*' "$logs/server.log" | head -3
grep -q "listening" "$logs/server.log" || { echo "server did not start:"; tail -20 "$logs/server.log"; }
addr=http://127.0.0.1:50071
bench() { timeout $((secs * 3 + 60)) "$work/flywheel-bench" --addr "$addr" --duration "$secs" --warmup 4 "$@"; echo "exit $?"; }
bench --mode route --concurrency 1 --json "$report/route-c1.json"
for c in 1 8 32 64; do
  echo "-- chat, $c streams, up to 128 tokens"
  bench --mode chat --concurrency "$c" --max-tokens 128 --json "$report/chat-c$c.json"
done
kill $server 2>/dev/null; wait $server 2>/dev/null

step "3. LoRA SFT ($device): $examples HWU64 examples x $epochs epochs"
for blocks in 30 8; do
  echo "-- r16, all linear layers, trained blocks: $blocks"
  rm -rf "$work/ft-$blocks"
  timeout 300 "$work/flywheel-trainer" train --data "$pack/hwu64_train.csv" --label-column scenario \
    --max-examples "$examples" --epochs "$epochs" --base "$work/model.gguf" --out "$work/ft-$blocks" \
    --device "$device" --trained-blocks "$blocks" 2>"$logs/train-$blocks.log" </dev/null
  echo "exit $?"; tail -2 "$logs/train-$blocks.log"
  [ -e "$work/ft-$blocks/manifest.json" ] && cp "$work/ft-$blocks/manifest.json" "$report/train-$blocks.json"
done

step "4. baseline: PyTorch + PEFT, same model shape"
if python3 -c "import torch, peft, transformers; assert torch.cuda.is_available()" 2>/dev/null; then
  timeout 240 python3 bench/gpu/peft_baseline.py "$report/peft.json" 1 >"$logs/peft.log" 2>&1
  echo "exit $?"; tail -12 "$logs/peft.log"
else
  echo "skipped: no CUDA PyTorch with peft here"
fi

step "summary"
python3 bench/gpu/summary.py "$report" | tee "$out/summary.md"
tar czf "$out/report.tgz" -C "$work" report logs
