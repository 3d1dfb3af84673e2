#!/usr/bin/env bash
# llama.cpp as a peer of `shardline bench decode|prefill` on the CPU: the same checkpoint converted
# to GGUF (bf16, then llama-quantize'd to q8_0 and q4_k_m), timed by llama-bench, its results
# written as JSON lines with the keys of Shardline's bench records.
#
#   bench/peers/llamacpp.sh MODEL_DIR OUT.jsonl [--threads N] [--formats bf16,q8_0,q4_k_m]
#                           [--gguf-dir DIR] [--cuda] [--converter auto|llama.cpp|numpy]
#   bench/peers/llamacpp.sh --build-only [--cuda]
#
# llama.cpp comes from the source distribution of the PyPI package llama-cpp-python (it vendors
# llama.cpp: vendor/llama.cpp), fetched once with pip into $SHARDLINE_PEER_DIR (default
# ~/.cache/shardline-peers) and built there with cmake (Release, GGML_NATIVE, static; only
# llama-bench, llama-quantize and llama-simple; CUDA only with --cuda and an nvcc). The build is
# kept and redone only when a binary is missing (delete the build folder to force it). Needs cmake
# and a C++ compiler (`apt-get install -y cmake g++`); LLAMA_CPP_PYTHON_VERSION picks the release.
# LLAMA_CMAKE_ARGS adds cmake arguments, built in a folder of their own: e.g. where llama.cpp's
# AMX kernels crash (GGML_NATIVE compiles them in on CPUs with AMX; seen as a segfault in
# ggml_backend_amx_mul_mat on a 2-core Sapphire Rapids VM), the native flags without AMX:
#   LLAMA_CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON
#                     -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON"
# (`llama-bench --repack 0` also avoids them, but turns off the repacked Q4_K kernels too).
#
# Conversion (MODEL_DIR: config.json, *.safetensors, tokenizer.json) to MODEL-bf16.gguf:
#   llama.cpp   the vendored convert_hf_to_gguf.py; it imports torch and transformers (the PyPI
#               torch wheel for x86-64 is ~530 MB plus CUDA libraries, so this script installs
#               neither: run it with a PYTHON that has them), and it names a BPE tokenizer's
#               pre-tokenizer by hashing its output, so made-up tokenizers (the repo's fixtures,
#               scripts/write_random_model.py's checkpoints) are refused.
#   numpy       bench/peers/hf_to_gguf.py: the same GGUF layout (scripts/make_gguf_fixture.py's
#               rules) with the vendored gguf-py and numpy only, for Llama/Mixtral/Qwen-MoE
#               checkpoints with a byte-level BPE tokenizer.json.
#   auto        (default) llama.cpp's when torch and transformers import, else numpy.
# The numpy side runs in a venv under the peer folder (numpy, pyyaml, tqdm, requests, from PyPI).
#
# Each format is run as `llama-bench -m FILE -t THREADS -p 128 -n 64 -r 5 -o json` (PROMPT, GEN,
# REPS override), and bench/peers/llamacpp.py turns its JSON into records (see its docstring for
# the keys): one "prefill" record (128 prompt tokens at once) and one "decode" record (64 tokens
# generated one at a time) per format. The GGUF files stay in --gguf-dir (default: next to OUT),
# so Shardline runs the very same files, e.g.
#   SHARDLINE_THREADS=N shardline bench decode --model DIR/MODEL-q4_k_m.gguf --kv-len 0 --json decode-shardline.jsonl
#   SHARDLINE_THREADS=N shardline bench prefill --model DIR/MODEL-q4_k_m.gguf --rows 128 --json prefill-shardline.jsonl
# (the script prints these with the real paths) and bench/peers/compare.py puts both in one table
# (--ignore dtype: Shardline names a file by its attention's type, q4_k, llama.cpp by its recipe,
# q4_k_m).

set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PEER_DIR=${SHARDLINE_PEER_DIR:-$HOME/.cache/shardline-peers}
VERSION=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
PY=${PYTHON:-python3}
PROMPT=${PROMPT:-128}
GEN=${GEN:-64}
REPS=${REPS:-5}
JOBS=${JOBS:-$(nproc)}

usage() { sed -n '2,/^$/{s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"; }
die() { echo "llamacpp.sh: $*" >&2; exit 1; }

MODEL_DIR='' OUT_FILE='' THREADS=$(nproc) FORMATS=bf16,q8_0,q4_k_m GGUF_DIR='' CUDA=0 CONVERTER=auto BUILD_ONLY=0
positional=()
while (($#)); do
    case $1 in
        -h | --help) usage; exit 0 ;;
        --threads) THREADS=${2:?--threads N}; shift ;;
        --formats) FORMATS=${2:?--formats LIST}; shift ;;
        --gguf-dir) GGUF_DIR=${2:?--gguf-dir DIR}; shift ;;
        --converter) CONVERTER=${2:?--converter auto|llama.cpp|numpy}; shift ;;
        --cuda) CUDA=1 ;;
        --build-only) BUILD_ONLY=1 ;;
        -*) die "unknown option $1 (see --help)" ;;
        *) positional+=("$1") ;;
    esac
    shift
done
if ((!BUILD_ONLY)); then
    ((${#positional[@]} == 2)) || { usage >&2; exit 2; }
    MODEL_DIR=${positional[0]} OUT_FILE=${positional[1]}
    [[ -f $MODEL_DIR/config.json ]] || die "$MODEL_DIR has no config.json"
fi
case $CONVERTER in auto | llama.cpp | numpy) ;; *) die "--converter: auto, llama.cpp or numpy" ;; esac

SRC=$PEER_DIR/llama_cpp_python-$VERSION/vendor/llama.cpp
if ((CUDA)); then
    command -v nvcc >/dev/null || die "--cuda needs nvcc on PATH"
    BUILD=$PEER_DIR/llama.cpp-$VERSION-cuda
else
    BUILD=$PEER_DIR/llama.cpp-$VERSION-cpu
fi
read -r -a extra_cmake <<<"${LLAMA_CMAKE_ARGS:-}"
if ((${#extra_cmake[@]})); then
    BUILD=$BUILD-$(printf '%s\n' "${extra_cmake[@]}" | md5sum | cut -c1-8)
fi
BIN=$BUILD/bin

fetch_source() {
    [[ -f $SRC/CMakeLists.txt ]] && return
    mkdir -p "$PEER_DIR"
    local sdist=$PEER_DIR/llama_cpp_python-$VERSION.tar.gz
    if [[ ! -f $sdist ]]; then
        echo "== pip download llama-cpp-python==$VERSION (source distribution)" >&2
        # --no-binary for this package only: with :all: pip would also build the sdist's own
        # build requirements (cmake, ninja) from source just to read its metadata.
        "$PY" -m pip download -q --no-deps --no-binary llama-cpp-python -d "$PEER_DIR" "llama-cpp-python==$VERSION"
    fi
    tar -xzf "$sdist" -C "$PEER_DIR"
    [[ -f $SRC/CMakeLists.txt ]] || die "$sdist has no vendor/llama.cpp"
}

build() {
    local targets=(llama-bench llama-quantize llama-simple) t missing=0
    for t in "${targets[@]}"; do [[ -x $BIN/$t ]] || missing=1; done
    if ((!missing)); then
        echo "== llama.cpp $VERSION: using the build in $BUILD (built in $(cat "$BUILD/build-seconds" 2>/dev/null || echo "?") s)" >&2
        return
    fi
    command -v cmake >/dev/null || die "needs cmake and a C++ compiler: apt-get install -y cmake g++"
    fetch_source
    local cuda_flags=(-DGGML_CUDA=OFF)
    ((CUDA)) && cuda_flags=(-DGGML_CUDA=ON)
    echo "== building llama.cpp ($SRC -> $BUILD, -j$JOBS)" >&2
    local t0=$SECONDS
    cmake -S "$SRC" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DBUILD_SHARED_LIBS=OFF \
        -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF \
        -DLLAMA_BUILD_EXAMPLES=ON -DLLAMA_BUILD_APP=OFF "${cuda_flags[@]}" "${extra_cmake[@]}" \
        >"$PEER_DIR/cmake-configure.log" 2>&1 ||
        { tail -30 "$PEER_DIR/cmake-configure.log" >&2; die "cmake configure failed (log: $PEER_DIR/cmake-configure.log)"; }
    cmake --build "$BUILD" --config Release --target "${targets[@]}" -j"$JOBS" >"$PEER_DIR/cmake-build.log" 2>&1 ||
        { tail -30 "$PEER_DIR/cmake-build.log" >&2; die "build failed (log: $PEER_DIR/cmake-build.log)"; }
    echo "$((SECONDS - t0))" >"$BUILD/build-seconds"
    echo "== llama.cpp built in $((SECONDS - t0)) s" >&2
}

# The venv of the numpy converter and of gguf-py (imported from the vendored tree).
numpy_python() {
    local venv=$PEER_DIR/venv
    if [[ ! -x $venv/bin/python ]] || ! "$venv/bin/python" -c 'import numpy, yaml, tqdm, requests' 2>/dev/null; then
        echo "== venv $venv: numpy pyyaml tqdm requests" >&2
        "$PY" -m venv "$venv" >&2
        "$venv/bin/python" -m pip install -q numpy pyyaml tqdm requests >&2
    fi
    echo "$venv/bin/python"
}

build
if ((BUILD_ONLY)); then exit 0; fi

name=$(basename "$(cd "$MODEL_DIR" && pwd)")
GGUF_DIR=${GGUF_DIR:-$(dirname "$OUT_FILE")}
mkdir -p "$GGUF_DIR" "$(dirname "$OUT_FILE")"
bf16=$GGUF_DIR/$name-bf16.gguf

# Converted again when the checkpoint is newer than the GGUF.
if [[ ! -f $bf16 ]] || find "$MODEL_DIR" -maxdepth 1 -newer "$bf16" \( -name '*.safetensors' -o -name '*.json' \) | grep -q .; then
    conv=$CONVERTER
    if [[ $conv == auto ]]; then
        if "$PY" -c 'import torch, transformers' 2>/dev/null; then conv=llama.cpp; else conv=numpy; fi
    fi
    t0=$SECONDS
    if [[ $conv == llama.cpp ]]; then
        echo "== convert_hf_to_gguf.py $MODEL_DIR -> $bf16" >&2
        PYTHONPATH=$SRC/gguf-py${PYTHONPATH:+:$PYTHONPATH} \
            "$PY" "$SRC/convert_hf_to_gguf.py" "$MODEL_DIR" --outtype bf16 --outfile "$bf16.part"
    else
        echo "== bench/peers/hf_to_gguf.py $MODEL_DIR -> $bf16 (no torch)" >&2
        PYTHONPATH=$SRC/gguf-py "$(numpy_python)" "$HERE/hf_to_gguf.py" "$MODEL_DIR" "$bf16.part" --outtype bf16
    fi
    mv "$bf16.part" "$bf16"
    echo "== converted in $((SECONDS - t0)) s ($conv)" >&2
    echo "$conv" >"$bf16.converter"
fi
converter=$(cat "$bf16.converter" 2>/dev/null || echo unknown)

: >"$OUT_FILE"
IFS=, read -r -a formats <<<"$FORMATS"
for fmt in "${formats[@]}"; do
    file=$GGUF_DIR/$name-$fmt.gguf
    case $fmt in
        bf16) ;;
        *)
            if [[ ! -f $file || $bf16 -nt $file ]]; then
                echo "== llama-quantize $fmt -> $file" >&2
                t0=$SECONDS
                "$BIN/llama-quantize" "$bf16" "$file.part" "${fmt^^}" "$THREADS" >"$file.log" 2>&1 ||
                    { tail -20 "$file.log" >&2; die "llama-quantize $fmt failed"; }
                mv "$file.part" "$file"
                echo "== quantized in $((SECONDS - t0)) s" >&2
            fi
            ;;
    esac
    echo "== llama-bench -m $file -t $THREADS -p $PROMPT -n $GEN -r $REPS" >&2
    raw=$GGUF_DIR/$name-$fmt.llama-bench.json
    "$BIN/llama-bench" -m "$file" -t "$THREADS" -p "$PROMPT" -n "$GEN" -r "$REPS" -o json >"$raw"
    "$PY" "$HERE/llamacpp.py" "$raw" --model "$file" --dtype "$fmt" --model-dir "$MODEL_DIR" \
        --tag converter="$converter" --tag llama_cpp_python="$VERSION" --device "$( ((CUDA)) && echo cuda || echo cpu)" >>"$OUT_FILE"
done

echo "== $OUT_FILE:" >&2
"$PY" "$HERE/llamacpp.py" --summary "$OUT_FILE" >&2
echo "== the same files in Shardline (not run here):" >&2
for fmt in "${formats[@]}"; do
    echo "   SHARDLINE_THREADS=$THREADS shardline bench decode --model $GGUF_DIR/$name-$fmt.gguf --kv-len 0 --json decode-shardline.jsonl" >&2
    echo "   SHARDLINE_THREADS=$THREADS shardline bench prefill --model $GGUF_DIR/$name-$fmt.gguf --rows $PROMPT --json prefill-shardline.jsonl" >&2
done
echo "   python3 bench/peers/compare.py --ignore dtype decode-shardline.jsonl $OUT_FILE" >&2
