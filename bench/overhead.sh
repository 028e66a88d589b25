#!/usr/bin/env bash
# The server's own cost on the stub engine (no model), logging on vs off in
# the same run, closed and open loop, with JSON reports and PNG figures in
# var/bench/. Usage: bench/overhead.sh [seconds per phase, default 10]
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-10}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/flywheel/target}"
cargo build --locked -q -p flywheel-server -p flywheel-bench
bin="$CARGO_TARGET_DIR/debug"
mkdir -p var/bench
rm -f var/bench/requests.db* var/bench/requests-nolog.db*
"$bin/flywheel-server" --config server/config/overhead.toml 2>var/bench/server.log &
on=$!
"$bin/flywheel-server" --config server/config/overhead-nolog.toml 2>var/bench/server-nolog.log &
off=$!
trap 'kill $on $off 2>/dev/null || true' EXIT
for log in var/bench/server.log var/bench/server-nolog.log; do
  until grep -q "listening addr=" "$log"; do sleep 0.2; done
done
bench() { "$bin/flywheel-bench" --addr http://127.0.0.1:50061 --mode route --duration "$secs" "$@"; }
echo "== closed loop, 64 clients: logging off (baseline) vs on"
bench --baseline-addr http://127.0.0.1:50062 --concurrency 64 \
  --json var/bench/closed.json --plot var/bench/closed
# 1,000 req/s is a tenth of the target load: what the machine's own wake-up
# latency leaves as a floor for the tail, in the same run.
# Steady state: 5 s of the same arrivals first, not measured (the generator is
# a fresh process at each step; its first seconds carry start-up page faults).
for rate in 1000 5000 10000; do
  echo "== open loop, $rate req/s (logging on)"
  bench --rate "$rate" --warmup-s 5 --json "var/bench/open-$rate.json" --plot "var/bench/open-$rate"
done
echo "== streaming chat, 16 clients (stub answer, no per-token delay)"
"$bin/flywheel-bench" --addr http://127.0.0.1:50061 --mode chat --concurrency 16 --duration "$secs" \
  --json var/bench/chat.json --plot var/bench/chat
echo "== streaming chat, 16 clients: gRPC (baseline) vs the OpenAI-compatible HTTP API, same server"
"$bin/flywheel-bench" --addr http://127.0.0.1:50063 --protocol http --mode chat --concurrency 16 \
  --duration "$secs" --baseline-addr http://127.0.0.1:50061 --baseline-protocol grpc \
  --json var/bench/chat-http.json
