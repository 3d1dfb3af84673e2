#!/usr/bin/env bash
# The project's test command (README): every crate's tests, on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --workspace --exclude shardline-cuda -- --skip network_namespaces --skip two_hosts \
    --skip launch_fails
# Ranks on two hosts made of network namespaces (needs root): verify over tcp, and `launch` over
# an ssh stand-in. They say why when they cannot run (and when the kernel has no netem delay).
cargo test -p shardline --test netns --test launch -- --nocapture
# The UCX transport (cargo feature `ucx`) needs libucx-dev, which .ci/run installs.
if pkg-config --exists ucx; then
    cargo test -p shardline-comm --features ucx
    cargo test -p shardline --features ucx --test distributed -- ucx --nocapture
else
    echo "SKIPPED the ucx transport tests: libucx-dev is not installed (pkg-config ucx)"
fi
# The GPU tests print why they did not run when there is no GPU or NVRTC.
cargo test -p shardline-cuda -- --nocapture
# The peer benchmarks' own tests (statistics, table matching; the fixture check needs torch and
# says so when it is missing).
python3 -m unittest discover -s bench/peers -v
