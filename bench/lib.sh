# shellcheck shell=bash
# What bench/{kernels,comm,decode}.sh share: where results go, running Shardline's bench, the table.
# Sourced, not run. Results land in $OUT (default target/bench, ignored by git), one JSON-lines file
# per side, named <bench>-<side>.jsonl, so a rerun of one side replaces only its file.

set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-target/bench}
mkdir -p "$OUT"
PY=${PYTHON:-python3}

# run_shardline BENCH ARGS...: `shardline bench BENCH ARGS --json $OUT/BENCH-shardline.jsonl`.
# A failure is reported and the peers still run, so the script is useful before a bench exists.
run_shardline() {
    local bench=$1
    shift
    echo "== shardline bench $bench $*" >&2
    rm -f "$OUT/$bench-shardline.jsonl"
    if ! cargo run --release -q -p shardline -- bench "$bench" "$@" --json "$OUT/$bench-shardline.jsonl"; then
        echo "!! shardline bench $bench failed (see above); the table shows the peers only" >&2
    fi
}

# compare BENCH [compare.py options]: one table from every $OUT/BENCH-*.jsonl.
compare() {
    local bench=$1
    shift
    echo "== $bench: shardline vs peers (median us, GB/s in brackets; shardline/peer < 1 means Shardline is faster)"
    "$PY" bench/peers/compare.py "$@" "$OUT/$bench"-*.jsonl
}
