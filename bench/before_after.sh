#!/usr/bin/env bash
# The helper's request round trip (Hello) and instance create/destroy, this
# checkout against an earlier commit, in one run: the two builds take turns
# round by round, each with its own helper (their protocol versions may
# differ), and the medians and per-round ratios are printed. The earlier
# build is made once and cached under /var/tmp. Needs root.
#   RUNS=5 N=5000 NI=50 bench/before_after.sh [COMMIT]   (default: tests/lab/previous-commit)
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-5} N=${N:-5000} NI=${NI:-50}
commit=$(git rev-parse "${1:-$(cat tests/lab/previous-commit)}")
old=/var/tmp/warren-bench-$commit
if [[ ! -f $old/ready ]]; then
  echo "building $commit once into $old" >&2
  rm -rf "$old"; mkdir -p "$old/src"
  git archive "$commit" | tar -x -C "$old/src"
  (cd "$old/src" && CARGO_TARGET_DIR=$old/target cargo build --quiet --release --locked --bins &&
    CARGO_TARGET_DIR=$old/target cargo build --quiet --release --locked -p warren-tests --example bench_instance) >&2
  mkdir -p "$old/bin"
  cp "$old/target/release/warren" "$old/target/release/warren-helper" \
     "$old/target/release/examples/bench_instance" "$old/bin/"
  rm -rf "$old/src" "$old/target"; touch "$old/ready"
fi
cargo build --quiet --release --locked --bins
cargo build --quiet --release --locked -p warren-tests --example bench_instance
new=$(mktemp -d /tmp/warren-bench-new.XXXXXX)
cp target/release/warren target/release/warren-helper target/release/examples/bench_instance "$new/"
dir=$(mktemp -d /run/warren-bench-ba.XXXXXX)
chmod 755 "$dir"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done; rm -rf "$dir" "$new"; }
trap cleanup EXIT
for side in before after; do
  bin=$old/bin; [[ $side == after ]] && bin=$new
  mkdir -m 755 "$dir/$side"
  "$bin/warren-helper" serve --socket "$dir/$side/h.sock" --group 0 --config /nonexistent 2>"$dir/$side.log" &
  pids+=($!)
  for _ in $(seq 100); do [[ -S $dir/$side/h.sock ]] && break; sleep 0.05; done
done
for r in $(seq "$RUNS"); do
  for side in before after; do
    bin=$old/bin; [[ $side == after ]] && bin=$new
    hello=$("$bin/warren" --helper-socket "$dir/$side/h.sock" helper ping -n "$N" --json)
    inst=$("$bin/bench_instance" "$dir/$side/h.sock" "$NI")
    printf '{"round":%d,"side":"%s","hello":%s,"instance":%s}\n' "$r" "$side" "$hello" "$inst"
  done
done | tee "$dir/runs.jsonl"
python3 - "$dir/runs.jsonl" "$commit" <<'PY'
import json, statistics, sys
runs = [json.loads(l) for l in open(sys.argv[1])]
def col(side, f): return [f(r) for r in runs if r["side"] == side]
rows = [("Hello p50 (us)", lambda r: r["hello"]["hello"]["p50_us"]),
        ("Hello p99 (us)", lambda r: r["hello"]["hello"]["p99_us"]),
        ("create instance p50 (ms)", lambda r: r["instance"]["create_p50_ms"]),
        ("destroy instance p50 (ms)", lambda r: r["instance"]["destroy_p50_ms"])]
print(f"before = {sys.argv[2][:10]}, after = this checkout; medians of {len(runs)//2} rounds")
for name, f in rows:
    b, a = col("before", f), col("after", f)
    ratios = [y / x for x, y in zip(b, a) if x]
    print(f"{name:28s} before {statistics.median(b):8.2f}  after {statistics.median(a):8.2f}  after/before per round: median {statistics.median(ratios):.2f} (min {min(ratios):.2f}, max {max(ratios):.2f})")
PY
