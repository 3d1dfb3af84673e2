# Sourced by the GPU scripts: puts NCCL and NVRTC (both loaded by Shardline at run time) on the
# library path where the machine has them only inside PyTorch's wheels, and sets the PTX cache.
if ! ldconfig -p | grep -q 'libnccl\.so'; then
    # nvidia.nccl is a namespace package (no __file__): take its __path__.
    d=$(python3 -c 'import nvidia.nccl, os; print(os.path.join(nvidia.nccl.__path__[0], "lib"))' 2>/dev/null || true)
    [ -n "$d" ] && export LD_LIBRARY_PATH="$d:${LD_LIBRARY_PATH:-}"
fi
if ! ldconfig -p | grep -q 'libnvrtc\.so'; then
    for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib \
        $(python3 -c 'import nvidia, os; print(" ".join(os.path.join(p, "cu13/lib") + " " + os.path.join(p, "cuda_nvrtc/lib") for p in nvidia.__path__))' 2>/dev/null); do
        if ls "$d"/libnvrtc.so* >/dev/null 2>&1; then
            export LD_LIBRARY_PATH="$d:${LD_LIBRARY_PATH:-}"
            break
        fi
    done
fi
export SHARDLINE_CACHE_DIR=${SHARDLINE_CACHE_DIR:-/tmp/shardline-cache}
