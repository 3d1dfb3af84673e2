#!/usr/bin/env bash
# Shardline's whole GPU check on a machine with an NVIDIA GPU: the GPU tests, verify on every
# fixture, and the decode table of the engine path (`bench decode` beside `run` on the same model,
# and the PyTorch peer when torch is there). Builds with cargo when cargo is there; otherwise takes
# prebuilt binaries from $SHARDLINE_GPU_BIN: `shardline` built with `--features cuda`, and the
# integration-test binaries (`it`) of two crates, renamed: `shardline-model-it` (`cargo test -p
# shardline-model --features cuda --release --test it --no-run`; its `cuda_backend::` tests run
# here) and `shardline-cuda-it` (`cargo test -p shardline-cuda --release --test it --no-run`: NCCL
# and the kernels' NVRTC compile check).
# Results go to $OUT (default gpu-results/).
#
# STEPS picks the parts (default all): tests verify decode batch serve whole prefill profile.
# `profile` (not in the default) runs Nsight Compute (ncu) over two batched steps (B = 2 and 64)
# of each BATCH_MODELS model on 2 layers and prints each kernel's time, DRAM bytes and bandwidth
# (ncu_*.csv in $OUT): where a step's time goes. `batch` times
# batched steps (`bench decode --batch 1,2,...,64`, the floor beside each; B = 16 to 64 again
# with every product on the CUDA cores, SHARDLINE_GROUPED_MMA=0) and `serve` runs the
# server under `bench serve` at 1, 8 and 64 clients, on BATCH_MODELS (default Qwen3-30B-A3B's and
# Mixtral-8x7B's shapes, 8 and 4 layers). `whole` runs whole
# models, WHOLE="preset:layers ..." (default Qwen3-30B-A3B's 48 layers, about 61 GB in bf16, and
# Mixtral-8x7B's 32, about 93 GB, only on a GPU that holds it); adding `nopeer` or `nobench` to
# STEPS leaves out the PyTorch peer or Shardline's own runs there. NCCL (libnccl.so.2) and NVRTC come from PyTorch's wheels when they are not
# on the path (scripts/gpu-env.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-results}
mkdir -p "$out"
steps=${STEPS:-tests verify decode batch serve whole prefill}
# ncu's metrics of each kernel in a profiled step.
ncu_metrics=gpu__time_duration.sum,dram__bytes_read.sum,launch__grid_size,launch__registers_per_thread,sm__warps_active.avg.pct_of_peak_sustained_active
has() { [[ " $steps " == *" $1 "* ]]; }

if [ -n "${SHARDLINE_GPU_BIN:-}" ]; then
    bin=$SHARDLINE_GPU_BIN
    model_tests=$bin/shardline-model-it
    cuda_tests=$bin/shardline-cuda-it
else
    cargo build --release -p shardline --features cuda
    bin=target/release
    it_bin() { grep -o 'target/release/deps/it-[a-z0-9]*' | tail -1; }
    model_tests=$(cargo test -p shardline-model --features cuda --release --test it --no-run 2>&1 | it_bin)
    cuda_tests=$(cargo test -p shardline-cuda --release --test it --no-run 2>&1 | it_bin)
fi
# shellcheck source=scripts/gpu-env.sh
. scripts/gpu-env.sh
sl="$bin/shardline"

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
gpu_mib=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1 || echo 0)

if has tests; then
    echo "== GPU tests"
    # The model crate's other integration tests run on the CPU (scripts/test.sh); all of the CUDA
    # crate's need the GPU or NVRTC.
    {
        "$model_tests" --ignored --test-threads=1 cuda_backend::
        "$cuda_tests" --ignored --test-threads=1
    } 2>&1 | tee "$out/gpu_tests.log"
fi

if has verify; then
    echo "== verify on the GPU: every repo fixture (and those in an extra fixtures directory,"
    echo "   \$SHARED_FIXTURES, when present), one rank, through a one-rank NCCL communicator, and"
    echo "   split over ranks sharing the GPU (host sums)"
    for d in fixtures/*/ ${SHARED_FIXTURES:-../shared/fixtures}/*/; do
        [ -f "$d/reference.json" ] || continue
        # `--reduce-dtype model`: a bf16 or f16 model's sums through NCCL in its own type.
        for plan in "" "--gpu-comm nccl" "--gpu-comm nccl --reduce-dtype model" "--tp 2" "--tp 4" \
            "--ep 2" "--tp 4 --ep 2"; do
            case "$plan" in *ep*) grep -q -e num_local_experts -e num_experts "$d/config.json" || continue ;; esac
            # shellcheck disable=SC2086  # the plan is a word list
            "$sl" verify --model "$d" --device cuda $plan >/dev/null 2>&1 ||
                "$sl" verify --model "$d" --device cuda $plan --rope-freqs model-dtype ||
                echo "verify FAILED on the GPU: $d $plan"
        done
    done 2>&1 | tee "$out/gpu_verify.log"
    # The GGUF fixtures (llama.cpp's layout) against their Hugging Face originals' references.
    for g in fixtures/*-gguf/; do
        f=$(ls "$g"*.gguf | head -1)
        ref=${g%-gguf/}/reference.json
        [ -f "$ref" ] || continue
        "$sl" verify --model "$f" --reference "$ref" --device cuda >/dev/null 2>&1 ||
            echo "verify FAILED on the GPU: $f"
    done 2>&1 | tee -a "$out/gpu_verify.log"
    echo "verify failures: $(grep -c FAILED "$out/gpu_verify.log" || true)"
fi

# `bench decode` and `run` on one model: the step the bench times and the token `run` makes.
decode_pair() { # preset layers tag [extra bench args]
    local p=$1 layers=$2 tag=$3
    shift 3
    "$sl" bench decode --device cuda --preset "$p" --layers "$layers" --dtype bf16 "$@" \
        --json "$out/decode_$tag.jsonl" || echo "bench decode $p $layers FAILED"
    "$sl" run --device cuda --preset "$p" --layers "$layers" --dtype bf16 --max-tokens 128 \
        --prompt "The quick brown fox jumps over the lazy dog" --json "$out/run_$tag.json" \
        >/dev/null || echo "run $p $layers FAILED"
}
peer() { # preset layers tag
    python3 -c 'import torch' 2>/dev/null || return 0
    python3 bench/peers/torch_step.py --device cuda --preset "$1" --layers "$2" --dtype bf16 \
        --mode compile --json "$out/torch_$3.jsonl" || echo "torch_step $1 $2 FAILED"
}

if has decode; then
    echo "== decode through the engine: bench decode and run, same model, beside PyTorch"
    for case in qwen3-30b-a3b:8 mixtral-8x7b:4 mixtral-mini:8; do
        p=${case%%:*} n=${case##*:}
        decode_pair "$p" "$n" "${p}_$n"
        "$sl" bench decode --device cuda --preset "$p" --layers "$n" --dtype bf16 --exec per-op \
            --json "$out/decode_${p}_${n}_perop.jsonl" || echo "bench decode per-op $p FAILED"
        "$sl" bench decode --device cuda --preset "$p" --layers "$n" --dtype bf16 --gpu-comm nccl \
            --json "$out/decode_${p}_${n}_nccl.jsonl" || echo "bench decode nccl $p FAILED"
        peer "$p" "$n" "${p}_$n"
    done
fi

batch_models=${BATCH_MODELS:-qwen3-30b-a3b:8 mixtral-8x7b:4}

if has batch; then
    echo "== batched decode steps through the engine, the floor beside each; then with every"
    echo "   product on the CUDA cores (SHARDLINE_GROUPED_MMA=0), to check where the tensor cores"
    echo "   take over"
    for case in $batch_models; do
        p=${case%%:*} n=${case##*:}
        "$sl" bench decode --device cuda --preset "$p" --layers "$n" --dtype bf16 \
            --batch 1,2,4,8,16,32,64 --iters 50 --json "$out/batch_${p}_$n.jsonl" ||
            echo "bench decode --batch $p FAILED"
        SHARDLINE_GROUPED_MMA=0 "$sl" bench decode --device cuda --preset "$p" --layers "$n" \
            --dtype bf16 --batch 16,32,64 --iters 50 --json "$out/batch_cuda_cores_${p}_$n.jsonl" ||
            echo "bench decode --batch $p (CUDA cores) FAILED"
    done
fi

if has serve; then
    echo "== serving: shardline serve under bench serve, 1, 8 and 64 clients"
    port=8123
    for case in $batch_models; do
        p=${case%%:*} n=${case##*:}
        "$sl" serve --device cuda --preset "$p" --layers "$n" --dtype bf16 --port "$port" \
            --kv-positions 32768 --max-running 64 >"$out/serve_${p}.log" 2>&1 &
        server=$!
        for _ in $(seq 300); do
            python3 -c "import urllib.request as u; u.urlopen('http://127.0.0.1:$port/health', timeout=2)" 2>/dev/null && break
            kill -0 "$server" 2>/dev/null || break
            sleep 1
        done
        for c in 1 8 64; do
            "$sl" bench serve --url "http://127.0.0.1:$port" --concurrency "$c" \
                --requests $((c < 8 ? 8 : 2 * c)) --prompt-len 128 --output-len 128 \
                --json "$out/serve_${p}_${n}_c$c.jsonl" || echo "bench serve $p $c clients FAILED"
        done
        kill -TERM "$server" 2>/dev/null || true
        wait "$server" || echo "serve $p exited with $?"
    done
fi

if has whole; then
    echo "== whole models"
    for case in ${WHOLE:-qwen3-30b-a3b:48 mixtral-8x7b:32}; do
        p=${case%%:*} n=${case##*:}
        if [ "$p" = mixtral-8x7b ] && [ "${gpu_mib:-0}" -lt 120000 ]; then
            echo "Mixtral-8x7B's 32 layers (about 93 GB in bf16) need a larger GPU than this one"
            continue
        fi
        has nobench || decode_pair "$p" "$n" "${p}_$n"
        has nopeer || peer "$p" "$n" "${p}_$n"
    done
fi

if has prefill; then
    echo "== prefill through the engine (all rows at once against token by token)"
    for p in mixtral-8x7b qwen3-30b-a3b mixtral-mini; do
        "$sl" bench prefill --device cuda --preset "$p" --dtype bf16 --rows 512 --iters 5 \
            --json "$out/prefill_$p.jsonl" || echo "bench prefill $p FAILED"
    done
fi

if has profile; then
    echo "== per-kernel profile of batched steps (ncu)"
    for case in $batch_models; do
        p=${case%%:*}
        for b in 2 64; do
            # The skipped launches cover start-up and the warm-up steps; ncu replays each kernel
            # of a graph on its own (--graph-profiling node, its default).
            timeout 300 ncu --clock-control none --launch-skip 150 --launch-count 120 --csv --print-units base \
                --metrics "$ncu_metrics" "$sl" bench decode --device cuda --preset "$p" \
                --layers 2 --dtype bf16 --batch "$b" --iters 3 >"$out/ncu_${p}_$b.csv" ||
                echo "ncu $p B=$b FAILED"
        done
    done
fi

echo "== summary"
python3 - "$out" <<'PY'
import glob, json, os, sys
out = sys.argv[1]
def rows(pattern):
    for path in sorted(glob.glob(os.path.join(out, pattern))):
        with open(path) as f:
            for line in f:
                if line.strip():
                    yield os.path.basename(path), json.loads(line)
for name, r in rows("decode_*.jsonl"):
    tag = name[len("decode_"):-len(".jsonl")]
    run = os.path.join(out, f"run_{tag}.json")
    extra = ""
    if os.path.exists(run):
        with open(run) as f:
            ms = json.load(f)["decode_ms_per_token"]
        extra = f" | run {ms * 1000:.1f} us/token ({ms * 1000 / r['step_us']:.3f}x the step)"
    print(f"{tag}: step {r['step_us']:.1f} us, head {r['head_us']:.1f} us, "
          f"per layer {r['median_us']:.1f} us ({r['gbps']:.0f} GB/s){extra}")
for name, r in rows("torch_*.jsonl"):
    print(f"{name}: torch {r.get('peer_mode')} step {r.get('step_us')} us, per layer {r.get('median_us')} us")
for name, r in rows("batch_*.jsonl"):
    print(f"{name}: B={r['batch']} step {r['step_us']:.1f} us, {r['tokens_per_s']:.0f} tokens/s, "
          f"floor {r['floor_us']:.1f} us ({r['step_us'] / r['floor_us']:.2f}x)")
for name, r in rows("serve_*.jsonl"):
    print(f"{name}: {json.dumps(r)}")
for name, r in rows("prefill_*.jsonl"):
    print(f"{name}: {r['path']} {r['us_per_token']} us/token")
# ncu's CSV: one row per (kernel launch, metric); the program's own output lines are not quoted.
import csv, collections
for path in sorted(glob.glob(os.path.join(out, "ncu_*.csv"))):
    per = collections.defaultdict(lambda: collections.defaultdict(float))
    count = collections.Counter()
    with open(path) as f:
        rows_ = [r for r in csv.reader(line for line in f if line.startswith('"'))]
    if not rows_:
        continue
    head, body = rows_[0], rows_[1:]
    col = {k: i for i, k in enumerate(head)}
    for r in body:
        name, metric = r[col["Kernel Name"]], r[col["Metric Name"]]
        value = float(r[col["Metric Value"]].replace(",", "") or 0)
        per[name][metric] += value
        if metric == "gpu__time_duration.sum":
            count[name] += 1
    print(f"{os.path.basename(path)}: kernel, launches, total us, GB read, GB/s")
    for name, m in sorted(per.items(), key=lambda kv: -kv[1]["gpu__time_duration.sum"]):
        ns, by = m["gpu__time_duration.sum"], m["dram__bytes_read.sum"]
        print(f"  {name[:40]:40} {count[name]:4} {ns / 1e3:9.1f} {by / 1e9:7.3f} {by / max(ns, 1):7.0f}")
PY
