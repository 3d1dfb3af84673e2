#!/usr/bin/env bash
# The project's test command (README): every crate's tests, on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --workspace
