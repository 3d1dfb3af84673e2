#!/usr/bin/env bash
# The project's test command (README): every crate's tests, on the CPU, built once with every
# feature this machine can build (the CUDA backend always: it needs no toolkit to build; UCX where
# libucx-dev is installed). Tests that need what is not here (a GPU, NVRTC, root for network
# namespaces) are reported as ignored, or say why they did not run.
set -euo pipefail
cd "$(dirname "$0")/.."
features=shardline/cuda
if pkg-config --exists ucx; then
    features+=,shardline/ucx
else
    echo "NOTE: libucx-dev is not installed (pkg-config ucx): the ucx transport's tests are not built"
fi
cargo test --workspace --features "$features" -- --skip network_namespaces --skip two_hosts \
    --skip launch_fails
# Ranks on two hosts made of network namespaces (needs root): verify over tcp, and `launch` over
# an ssh stand-in. They say why when they cannot run (and when the kernel has no netem delay).
# Each crate's integration tests are one binary (`it`), one module per area, so these pick the
# areas by module path; `--workspace` keeps the features of the first build, so nothing rebuilds.
cargo test --workspace --features "$features" --test it -- --nocapture netns:: launch::
# The CUDA kernels compile with NVRTC where libnvrtc is on the library path (.ci/run installs it).
if ldconfig -p | grep -q libnvrtc || [[ "${LD_LIBRARY_PATH:-}" == *nvrtc* ]]; then
    cargo test --workspace --features "$features" --test it -- --ignored kernels_compile::
else
    echo "NOTE: libnvrtc is not on the library path: the CUDA kernels' compile check did not run"
fi
# The peer benchmarks' own tests (statistics, table matching; the fixture check needs torch and
# says so when it is missing).
python3 -m unittest discover -s bench/peers -v
