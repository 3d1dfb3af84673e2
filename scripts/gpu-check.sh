#!/usr/bin/env bash
# Runs Shardline's GPU tests and GPU benchmarks (with the PyTorch peer, when present) on a machine
# with an NVIDIA GPU. Builds with cargo when cargo is there; otherwise takes prebuilt binaries from
# $SHARDLINE_GPU_BIN: `shardline` built with `--features cuda` and the `layer_gpu`, `prefill_gpu`
# and `nccl_gpu` test binaries (`cargo test -p shardline-cuda --release --no-run`). Results go to
# $OUT (default gpu-results/). NCCL (libnccl.so.2) is taken from PyTorch's wheel when it is not on
# the path.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-results}
mkdir -p "$out"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

if [ -n "${SHARDLINE_GPU_BIN:-}" ]; then
    bin=$SHARDLINE_GPU_BIN
    test_bins=("$bin/layer_gpu" "$bin/prefill_gpu" "$bin/nccl_gpu")
else
    cargo build --release -p shardline --features cuda
    bin=target/release
    mapfile -t test_bins < <(cargo test -p shardline-cuda --release --no-run 2>&1 |
        grep -o 'target/release/deps/\(layer\|prefill\|nccl\)_gpu-[a-z0-9]*')
fi
# shellcheck source=scripts/gpu-env.sh
. scripts/gpu-env.sh

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

echo "== GPU tests"
for t in "${test_bins[@]}"; do "$t" --test-threads=1 --nocapture; done 2>&1 | tee "$out/gpu_tests.log"

echo "== verify on the GPU: every repo fixture (and ../shared/fixtures when present)"
for d in fixtures/*/ ${SHARED_FIXTURES:-../shared/fixtures}/*/; do
    [ -f "$d/reference.json" ] || continue
    "$bin/shardline" verify --model "$d" --device cuda ||
        "$bin/shardline" verify --model "$d" --device cuda --rope-freqs model-dtype ||
        echo "verify FAILED on the GPU: $d"
done 2>&1 | tee "$out/gpu_verify.log"

echo "== verify on the GPU summing through a one-rank NCCL communicator"
for d in fixtures/*/; do
    "$bin/shardline" verify --model "$d" --device cuda --gpu-comm nccl ||
        "$bin/shardline" verify --model "$d" --device cuda --gpu-comm nccl --rope-freqs model-dtype ||
        echo "verify --gpu-comm nccl FAILED on the GPU: $d"
done 2>&1 | tee "$out/gpu_verify_nccl.log"

echo "== verify split over ranks on the GPU (one GPU per rank: NCCL; ranks sharing one: the host)"
for d in fixtures/*/; do
    plans=("--tp 2" "--tp 4")
    grep -q -e num_local_experts -e num_experts "$d/config.json" && plans+=("--ep 2" "--tp 4 --ep 2")
    for p in "${plans[@]}"; do
        # shellcheck disable=SC2086  # the plan is a word list
        "$bin/shardline" verify --model "$d" --device cuda $p || echo "verify $p FAILED on the GPU: $d"
    done
done 2>&1 | tee "$out/gpu_verify_split.log"

echo "== Shardline decode bench on the GPU"
presets=${PRESETS:-mixtral-8x7b,qwen3-30b-a3b,mixtral-mini}
: > "$out/shardline_decode_gpu.jsonl"
for p in ${presets//,/ }; do
    for exec in split per-op; do
        "$bin/shardline" bench decode --device cuda --preset "$p" --dtype bf16 --exec "$exec" \
            --json "$work/decode.jsonl"
        cat "$work/decode.jsonl" >> "$out/shardline_decode_gpu.jsonl"
        # Split over the GPUs with NCCL (a one-rank communicator on a one-GPU machine).
        gpus=$(nvidia-smi -L 2>/dev/null | wc -l)
        for plan in "--gpu-comm nccl" "--tp 2" "--ep 2"; do
            [ "$plan" = "--gpu-comm nccl" ] || [ "$gpus" -ge 2 ] || continue
            # shellcheck disable=SC2086  # the plan is a word list
            "$bin/shardline" bench decode --device cuda --preset "$p" --dtype bf16 --exec "$exec" \
                $plan --json "$work/decode.jsonl" &&
                cat "$work/decode.jsonl" >> "$out/shardline_decode_gpu.jsonl"
        done
    done
done

echo "== Shardline prefill bench on the GPU (GEMM prefill against token by token)"
: > "$out/shardline_prefill_gpu.jsonl"
for p in ${presets//,/ }; do
    "$bin/shardline" bench prefill --preset "$p" --dtype bf16 --rows 512 --json "$work/prefill.jsonl"
    cat "$work/prefill.jsonl" >> "$out/shardline_prefill_gpu.jsonl"
done

if [ -f bench/peers/torch_decode.py ] && python3 -c 'import torch' 2>/dev/null; then
    echo "== PyTorch peer on the GPU"
    : > "$out/torch_decode_gpu.jsonl"
    for p in ${presets//,/ }; do
        for mode in eager compile; do
            if python3 bench/peers/torch_decode.py --device cuda --preset "$p" --dtype bf16 \
                --mode "$mode" --json "$work/torch.jsonl"; then
                cat "$work/torch.jsonl" >> "$out/torch_decode_gpu.jsonl"
            else
                echo "torch $p $mode failed"
            fi
        done
    done
    gpus=$(nvidia-smi -L 2>/dev/null | wc -l)
    for tp in 1 2; do
        [ "$tp" -le "$gpus" ] || continue
        torchrun --nproc-per-node "$tp" bench/peers/torch_nccl_decode.py --preset mixtral-8x7b \
            --json "$work/torch.jsonl" && cat "$work/torch.jsonl" >> "$out/torch_decode_gpu.jsonl"
    done
    if [ -f bench/peers/compare.py ]; then
        python3 bench/peers/compare.py "$out/shardline_decode_gpu.jsonl" "$out/torch_decode_gpu.jsonl"
    fi
else
    echo "PyTorch peer not run: bench/peers/torch_decode.py or torch is missing"
fi
