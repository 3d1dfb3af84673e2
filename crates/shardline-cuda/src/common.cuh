// What Shardline's kernel modules (kernels.cu for decode, prefill.cu) share: small types, warp and
// block reductions, programmatic-dependent-launch hooks, and the router. NVRTC compiles this text
// in front of each module's own source (see device.rs and prefill_ops.rs).

typedef unsigned short u16;
typedef unsigned int u32;

#define WARP 32
#define NEG_INF __int_as_float(0xff800000u)

// Programmatic dependent launch (Hopper on; ops.rs launches every kernel with it when the device
// allows): a kernel may be started while the kernel before it is still running. Each kernel lets
// its successor start at once (let_next_start; a matvec reading expert ids only after its wait)
// and waits (wait_for_previous) before it reads or writes anything an earlier kernel touches.
// Only what is complete whenever the kernel starts is read before the wait: weights, the
// attention's position and cached rows, and the expert ids the previous matvec read after its
// own wait (all through L2: an early start's L1 may still hold an earlier launch's lines).
// Without the launch attribute, both are no-ops.
__device__ __forceinline__ void let_next_start_() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
__device__ __forceinline__ void wait_for_previous_() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// Timeline probe, compiled in only with -DSHARDLINE_TIMELINE (through SHARDLINE_NVRTC_OPTIONS):
// lane 0 of every warp stores when it started, when its PDL wait returned and when it ended
// (%globaltimer, ns) in a slot fixed by its launch (%gridid) and its warp index: no atomics and
// no registers held, so kernels keep their register counts and (nearly) their timing. A graph's
// kernel nodes keep their grid ids from one replay to the next, so the slots end up holding the
// last replay of up to TIMELINE_LAUNCHES kernels. CudaDevice::timeline copies them out and
// scripts/gpu-timeline.py prints them per kernel (docs/architecture.md, "GPU kernel design
// notes", Timeline probe; a layer read this way is in docs/performance.md, "Where a layer's time
// goes"). Without the define, the hooks are the plain PDL calls.
#ifdef SHARDLINE_TIMELINE
#define TIMELINE_LAUNCHES 32
#define TIMELINE_WARPS 8192
__device__ unsigned long long shardline_timeline[TIMELINE_LAUNCHES * TIMELINE_WARPS * 4];
__device__ __forceinline__ unsigned long long* timeline_slot() {
    unsigned long long grid;
    asm volatile("mov.u64 %0, %%gridid;" : "=l"(grid));
    const unsigned warp = (blockIdx.y * gridDim.x + blockIdx.x) * (blockDim.x >> 5) + (threadIdx.x >> 5);
    return shardline_timeline +
           ((grid % TIMELINE_LAUNCHES) * TIMELINE_WARPS + warp % TIMELINE_WARPS) * 4;
}
// Field 1: start, 2: wait returned, 3: end.
__device__ __forceinline__ void timeline_mark(int field) {
    if ((threadIdx.x & 31) != 0) return;
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    timeline_slot()[field] = t;
}
// Marks the start when made, and the end (with field 0: the grid id, LINE, the SM) when the
// kernel returns.
template <int LINE>
struct TimelineScope {
    __device__ TimelineScope() { timeline_mark(1); }
    __device__ ~TimelineScope() {
        if ((threadIdx.x & 31) != 0) return;
        timeline_mark(3);
        unsigned long long grid;
        asm volatile("mov.u64 %0, %%gridid;" : "=l"(grid));
        unsigned sm;
        asm volatile("mov.u32 %0, %%smid;" : "=r"(sm));
        timeline_slot()[0] = (grid & 0xffffffffull) | ((unsigned long long)LINE << 32) |
                             ((unsigned long long)sm << 48);
    }
};
#define timeline_begin() TimelineScope<__LINE__> shardline_timeline_scope_
#define let_next_start() timeline_begin(); let_next_start_()
#define wait_for_previous() do { wait_for_previous_(); timeline_mark(2); } while (0)
#else
#define timeline_begin() do {} while (0)
#define let_next_start() let_next_start_()
#define wait_for_previous() wait_for_previous_()
#endif

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum over the whole block (blockDim.x a multiple of 32, at most 1024); every thread gets it.
__device__ float block_sum(float v) {
    __shared__ float partial[32];
    __shared__ float total;
    v = warp_sum(v);
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    if (warp == 0) {
        float s = lane < (blockDim.x >> 5) ? partial[lane] : 0.0f;
        s = warp_sum(s);
        if (lane == 0) total = s;
    }
    __syncthreads();
    float r = total;
    __syncthreads();
    return r;
}

// Router softmax over E logits (in f32), top-k, optional renormalisation, by one block of at
// least E threads (thread e holds expert e): each expert's rank is the number of experts with a
// higher probability (or an equal one and a lower index, so ties go to the lower index), all
// ranks at once. Writes id[j] and wt[j] for j < k. With expert parallelism, expert_map[e] is
// expert e's index among this rank's experts, or -1 where another rank holds it (null: every
// expert is here). E <= 1024, k <= 32. Latency is what counts here (the experts wait for it):
// the maximum and the sum take one barrier each (every thread adds up the warps' partials
// itself, in warp order), and the ranks read the probabilities four at a time.
__device__ void top_k_block(const float* __restrict__ lg, int E, int k, int renormalize,
                            const int* __restrict__ expert_map, int* __restrict__ id,
                            float* __restrict__ wt) {
    __shared__ float4 probs4[256];
    __shared__ float part_max[32], part_sum[32];
    __shared__ float chosen[32];
    float* probs = (float*)probs4;
    const int e = threadIdx.x, lane = e & 31, warp = e >> 5;
    const int warps = (E + WARP - 1) / WARP;
    const float l = e < E ? lg[e] : NEG_INF;
    float mx = warp_max(l);
    if (lane == 0) part_max[warp] = mx;
    __syncthreads();
    mx = part_max[0];
    for (int w = 1; w < warps; ++w) mx = fmaxf(mx, part_max[w]);
    const float p = e < E ? expf(l - mx) : 0.0f;
    // Padding up to a multiple of 4 ranks below every real probability (-1 < 0 <= p).
    if (e < ((E + 3) & ~3)) probs[e] = e < E ? p : -1.0f;
    const float ws = warp_sum(p);
    if (lane == 0) part_sum[warp] = ws;
    __syncthreads();  // also publishes probs
    float sum = part_sum[0];
    for (int w = 1; w < warps; ++w) sum += part_sum[w];
    if (e < E) {
        int rank = 0;
        for (int o4 = 0; o4 < (E + 3) / 4; ++o4) {
            const float4 q = probs4[o4];
            const int o = o4 * 4;
            rank += (q.x > p || (q.x == p && o < e)) + (q.y > p || (q.y == p && o + 1 < e)) +
                    (q.z > p || (q.z == p && o + 2 < e)) + (q.w > p || (q.w == p && o + 3 < e));
        }
        if (rank < k) {
            id[rank] = expert_map ? expert_map[e] : e;
            chosen[rank] = p / sum;
        }
    }
    __syncthreads();
    if (threadIdx.x < k) {
        float w = chosen[threadIdx.x];
        if (renormalize) {
            float total = 0.0f;
            for (int j = 0; j < k; ++j) total += chosen[j];
            w /= total;
        }
        wt[threadIdx.x] = w;
    }
}

// top_k_block for each of `rows` rows of logits (grid.x rows): writes ids[r*k + j] and
// weights[r*k + j].
extern "C" __global__ void router_top_k(const float* __restrict__ logits, int E, int k,
                                       int renormalize, const int* __restrict__ expert_map,
                                       int* __restrict__ ids, float* __restrict__ weights) {
    let_next_start();
    wait_for_previous();
    const long r = blockIdx.x;
    top_k_block(logits + r * E, E, k, renormalize, expert_map, ids + r * k, weights + r * k);
}

// One value rounded to bf16 (bf16 != 0) or f16, and widened back.
__device__ __forceinline__ u16 f32_to_16(float v, int bf16) {
    u16 h;
    if (bf16) {
        asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(v));
    } else {
        asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(v));
    }
    return h;
}

__device__ __forceinline__ float f16_to_f32(u16 h, int bf16) {
    if (bf16) return __uint_as_float(((u32)h) << 16);
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

// KV caches hold f32, or bf16 (kv16 != 0: half the bytes, for the paged cache of batched steps).
__device__ __forceinline__ void kv_store(void* cache, long i, float v, int kv16) {
    if (kv16) {
        ((u16*)cache)[i] = f32_to_16(v, 1);
    } else {
        ((float*)cache)[i] = v;
    }
}

__device__ __forceinline__ float kv_load(const void* cache, long i, int kv16) {
    return kv16 ? f16_to_f32(((const u16*)cache)[i], 1) : ((const float*)cache)[i];
}

// The position of row r of a step: pos0 + r (consecutive positions of one sequence, a prompt),
// or positions[r] (a batch: each row at its own position of its own sequence).
__device__ __forceinline__ int kv_position(int pos0, const int* positions, int r) {
    return positions ? positions[r] : pos0 + r;
}

// The cache row that holds position pos of row r's sequence: pos itself in a contiguous cache,
// or in a paged one (tables non-null) row r's block table ([rows][table_stride] block ids of
// `block` positions each) says which block holds it.
__device__ __forceinline__ long kv_slot(const int* tables, int table_stride, int block, int r,
                                        int pos) {
    if (!tables) return pos;
    return (long)tables[(long)r * table_stride + pos / block] * block + pos % block;
}

// For each of `rows` rows of qkv ([q (H*D) | k (KVH*D) | v (KVH*D)] each): the qkv bias (Qwen2;
// may be null), optional per-head q/k RMSNorm (Qwen3), rotary embedding (half rotation,
// frequencies inv_freq[D/2] as the model computes them: theta, scaling, rounding) and the
// KV-cache append (prefill and batched decode; decode of one token fuses all this into its
// attention kernel). Row r sits at kv_position(...) and its keys and values go to kv_slot(...)
// (see there: consecutive positions of one sequence, or each row at its own position of its own
// sequence in a paged cache). q is rotated in place; caches are [KVH][capacity][D] of f32, or of
// bf16 with kv16. Grid
// (H + 2*KVH heads, rows), D rounded up to 32 threads; D <= 1024.
extern "C" __global__ void rope_kv_append(float* __restrict__ qkv, const float* __restrict__ bias,
                                          int pos0, const int* __restrict__ positions,
                                          const int* __restrict__ tables, int table_stride,
                                          int block, int kv16, void* __restrict__ k_cache,
                                          void* __restrict__ v_cache,
                                          const float* __restrict__ q_norm,
                                          const float* __restrict__ k_norm, float eps, int H,
                                          int KVH, int D, int capacity,
                                          const float* __restrict__ inv_freq) {
    __shared__ float head[1024];
    let_next_start();
    wait_for_previous();
    const int b = blockIdx.x, r = blockIdx.y, i = threadIdx.x;
    const bool active = i < D;
    const int pos = kv_position(pos0, positions, r);
    const long slot = kv_slot(tables, table_stride, block, r, pos);
    float* src = qkv + r * (long)(H + 2 * KVH) * D + (long)b * D;
    const float v = active ? src[i] + (bias ? bias[(long)b * D + i] : 0.0f) : 0.0f;
    if (b >= H + KVH) {  // a value head: append as is
        const int kvh = b - H - KVH;
        if (active) kv_store(v_cache, ((long)kvh * capacity + slot) * D + i, v, kv16);
        return;
    }
    const float* norm = b < H ? q_norm : k_norm;
    float val = v;
    if (norm) {
        const float ss = block_sum(v * v);
        val = active ? v * rsqrtf(ss / (float)D + eps) * norm[i] : 0.0f;
    }
    head[i] = val;
    __syncthreads();
    if (!active) return;
    const int half = D / 2;
    const int j = i < half ? i : i - half;
    float s, c;
    sincosf((float)pos * inv_freq[j], &s, &c);
    const float out = i < half ? head[i] * c - head[i + half] * s : head[i] * c + head[i - half] * s;
    if (b < H) {
        src[i] = out;
    } else {
        const int kvh = b - H;
        kv_store(k_cache, ((long)kvh * capacity + slot) * D + i, out, kv16);
    }
}

// ---- weight element types: 8 consecutive weights as one 16-byte load ----

struct Bf16 {
    typedef uint4 Pack;  // 8 x bf16
    static const int PACK_BYTES = 16;
    __device__ static float one(const void* w, long i) {
        return __uint_as_float(((u32)((const u16*)w)[i]) << 16);
    }
    __device__ static float dot8(uint4 p, float4 a, float4 b) {
        float s = __uint_as_float(p.x << 16) * a.x;
        s = fmaf(__uint_as_float(p.x & 0xffff0000u), a.y, s);
        s = fmaf(__uint_as_float(p.y << 16), a.z, s);
        s = fmaf(__uint_as_float(p.y & 0xffff0000u), a.w, s);
        s = fmaf(__uint_as_float(p.z << 16), b.x, s);
        s = fmaf(__uint_as_float(p.z & 0xffff0000u), b.y, s);
        s = fmaf(__uint_as_float(p.w << 16), b.z, s);
        s = fmaf(__uint_as_float(p.w & 0xffff0000u), b.w, s);
        return s;
    }
};

__device__ __forceinline__ float half_bits_to_f32(u32 h) {
    float f;
    unsigned short s = (unsigned short)h;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(s));
    return f;
}

struct F16 {
    typedef uint4 Pack;
    static const int PACK_BYTES = 16;
    __device__ static float one(const void* w, long i) {
        return half_bits_to_f32(((const u16*)w)[i]);
    }
    __device__ static float dot8(uint4 p, float4 a, float4 b) {
        float s = half_bits_to_f32(p.x & 0xffffu) * a.x;
        s = fmaf(half_bits_to_f32(p.x >> 16), a.y, s);
        s = fmaf(half_bits_to_f32(p.y & 0xffffu), a.z, s);
        s = fmaf(half_bits_to_f32(p.y >> 16), a.w, s);
        s = fmaf(half_bits_to_f32(p.z & 0xffffu), b.x, s);
        s = fmaf(half_bits_to_f32(p.z >> 16), b.y, s);
        s = fmaf(half_bits_to_f32(p.w & 0xffffu), b.z, s);
        s = fmaf(half_bits_to_f32(p.w >> 16), b.w, s);
        return s;
    }
};

// f32 weights: a "pack" is two float4 loads (8 elements, 32 bytes).
struct F32 {
    struct Pack { float4 lo, hi; };
    static const int PACK_BYTES = 32;
    __device__ static float one(const void* w, long i) { return ((const float*)w)[i]; }
    __device__ static float dot8(Pack p, float4 a, float4 b) {
        float s = p.lo.x * a.x;
        s = fmaf(p.lo.y, a.y, s); s = fmaf(p.lo.z, a.z, s); s = fmaf(p.lo.w, a.w, s);
        s = fmaf(p.hi.x, b.x, s); s = fmaf(p.hi.y, b.y, s); s = fmaf(p.hi.z, b.z, s);
        s = fmaf(p.hi.w, b.w, s);
        return s;
    }
};
