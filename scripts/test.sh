#!/usr/bin/env bash
# The project's test command (README): every crate's tests, on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --workspace --exclude shardline-cuda -- --skip network_namespaces
# Ranks in two network namespaces (needs root); says why when it cannot run, or runs without delay.
cargo test -p shardline --test netns -- --nocapture
# The UCX transport (cargo feature `ucx`) needs libucx-dev, which .ci/run installs.
if pkg-config --exists ucx; then
    cargo test -p shardline-comm --features ucx
else
    echo "SKIPPED the ucx transport tests: libucx-dev is not installed (pkg-config ucx)"
fi
# The GPU tests print why they did not run when there is no GPU or NVRTC.
cargo test -p shardline-cuda -- --nocapture
# The peer benchmarks' own tests (statistics, table matching; the fixture check needs torch and
# says so when it is missing).
python3 -m unittest discover -s bench/peers -v
