// Shardline's CUDA kernels for batch-1 decode, compiled at run time with NVRTC.
//
// Activations are f32 everywhere (so results match the CPU path); weights are bf16, f16 or f32.
// Anything that changes from one decode step to the next (the position, the chosen experts) is
// read from device memory, so a captured graph can be replayed unchanged.

// Most warps a matvec block may have (ops.rs launches MATVEC_WARPS: blockDim.x / 32); the entry
// points' launch bound (see MATVEC_ENTRY) is in blocks of this size.
#define MATVEC_MAX_WARPS 8

// Packs (of 8 weights) loaded per lane before the first is used: enough bytes in flight per warp
// to cover DRAM latency with few warps per SM.
#ifndef UNROLL
#define UNROLL 6
#endif

// Weights are read exactly once per step: stream them past L1 (which keeps x) and ask L2 to
// fetch 256-byte sectors, which keeps more DRAM requests in flight.
__device__ __forceinline__ uint4 load_stream16(const void* p) {
    uint4 r;
    asm volatile("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
                 : "l"(p));
    return r;
}

template <typename T>
__device__ __forceinline__ typename T::Pack load_pack(const char* row, long pack) {
    return load_stream16(row + pack * T::PACK_BYTES);
}

template <>
__device__ __forceinline__ F32::Pack load_pack<F32>(const char* row, long pack) {
    const char* p = row + pack * 32;
    const uint4 lo = load_stream16(p), hi = load_stream16(p + 16);
    F32::Pack r;
    r.lo = make_float4(__uint_as_float(lo.x), __uint_as_float(lo.y), __uint_as_float(lo.z), __uint_as_float(lo.w));
    r.hi = make_float4(__uint_as_float(hi.x), __uint_as_float(hi.y), __uint_as_float(hi.z), __uint_as_float(hi.w));
    return r;
}

// Loads a lane's share of one group: packs p + u * 32 (u < G) of each of R rows, row_r = row +
// r * row_stride bytes, those from `packs` on skipped.
template <typename T, int R, int G>
__device__ __forceinline__ void load_group(typename T::Pack (&w)[G][R], const char* row,
                                           long row_stride, long p, long packs) {
#pragma unroll
    for (int u = 0; u < G; ++u) {
        if (p + u * WARP < packs) {
#pragma unroll
            for (int r = 0; r < R; ++r) w[u][r] = load_pack<T>(row + r * row_stride, p + u * WARP);
        }
    }
}

// Packs per row the 16-byte path takes: all of them when the rows and x are 16-byte aligned (K a
// multiple of 8), none otherwise (the scalar path).
__device__ __forceinline__ long aligned_packs(const char* row, long row_stride,
                                              const float* x, int K) {
    return (((unsigned long)row | (unsigned long)row_stride | (unsigned long)x) & 15) == 0 ? K / 8 : 0;
}

// (row_0 . x, ..., row_{R-1} . x) by one warp, row_r = row + r * row_stride bytes; every lane gets
// the sums. All R rows' loads of a group are issued before the first is used, and each x pack is
// loaded once for all R rows: short rows (the down projection of a small expert) are grouped so
// that a warp keeps as many bytes in flight as it does on one long row, and a SwiGLU's gate and
// up rows travel together. Rows and inputs that are not 16-byte aligned (K not a multiple of 8)
// take the scalar path. The last (partial) group is predicated, so a short row is one memory
// round trip rather than one per pack. G: packs per row per group (loads in flight per lane: R * G).
// w holds the group in flight; with first_loaded, the caller has already loaded the first group
// into it (load_group with p = lane).
template <typename T, int R, int G>
__device__ __forceinline__ void warp_rows_dot(const char* row, long row_stride,
                                              const float* __restrict__ x, int K,
                                              typename T::Pack (&w)[G][R], bool first_loaded,
                                              float (&out)[R]) {
    const int lane = threadIdx.x & 31;
    const long packs = aligned_packs(row, row_stride, x, K);
    const float4* x4 = (const float4*)x;
    float acc[R];
#pragma unroll
    for (int r = 0; r < R; ++r) acc[r] = 0.0f;
    for (long p = lane; p < packs; p += G * WARP) {
        if (!first_loaded || p != lane) load_group<T, R, G>(w, row, row_stride, p, packs);
#pragma unroll
        for (int u = 0; u < G; ++u) {
            const long q = p + u * WARP;
            if (q < packs) {
                const float4 x0 = __ldg(x4 + 2 * q), x1 = __ldg(x4 + 2 * q + 1);
#pragma unroll
                for (int r = 0; r < R; ++r) acc[r] += T::dot8(w[u][r], x0, x1);
            }
        }
    }
    for (long i = packs * 8 + lane; i < K; i += WARP) {
#pragma unroll
        for (int r = 0; r < R; ++r) acc[r] += T::one(row + r * row_stride, i) * x[i];
    }
#pragma unroll
    for (int r = 0; r < R; ++r) out[r] = warp_sum(acc[r]);
}

// Pulls `bytes` from `p` into L2, a 128-byte line per lane.
__device__ __forceinline__ void prefetch_l2(const char* p, long bytes) {
    for (long off = (long)(threadIdx.x & 31) * 128; off < bytes; off += WARP * 128)
        asm volatile("prefetch.global.L2 [%0];" ::"l"(p + off));
}

// One warp's rows of a matrix-vector product (see matvec_impl) in block bx of a slot: the R rows
// from n (plain) or the gate row n and up row n + N (SWIGLU). preload does what needs no input,
// finish the rest.
template <typename T, int R, int G, bool SWIGLU>
struct MatvecRows {
    static constexpr int RR = SWIGLU ? 2 : R;  // rows read
    int n, rows;
    long row_bytes, row_stride;
    typename T::Pack w[G][RR];
    bool first_loaded = false;

    __device__ MatvecRows(int bx, int N, int K) {
        n = (bx * (blockDim.x >> 5) + (threadIdx.x >> 5)) * R;
        rows = SWIGLU ? 2 : min(R, N - n);
        row_bytes = (long)K * (T::PACK_BYTES / 8);
        row_stride = SWIGLU ? (long)N * row_bytes : row_bytes;
    }

    // Loads the first group of matrix `matrix`'s rows into registers and, with `prefetch_rest`,
    // pulls the rest of them into L2: what can be done before the input is ready.
    __device__ void preload(const char* matrix, const float* x, int N, int K, bool prefetch_rest) {
        if (n >= N || !matrix) return;
        const char* first = matrix + (long)n * row_bytes;
        if (rows == RR) {
            load_group<T, RR, G>(w, first, row_stride, threadIdx.x & 31,
                                 aligned_packs(first, row_stride, x, K));
            first_loaded = true;
        }
        const long skip = first_loaded ? (long)G * WARP * T::PACK_BYTES : 0;
        if (prefetch_rest && row_bytes > skip)
            for (int r = 0; r < rows; ++r) prefetch_l2(first + r * row_stride + skip, row_bytes - skip);
    }

    // Writes the rows' outputs to out[0..] (matrix null: an expert another rank holds, zeros).
    __device__ void finish(const char* matrix, const float* x, const float* residual, float* out,
                           int N, int K) {
        const int lane = threadIdx.x & 31;
        if (n >= N) return;
        out += n;
        if (!matrix) {
            if (lane < (SWIGLU ? 1 : rows)) out[lane] = 0.0f;
            return;
        }
        const char* first = matrix + (long)n * row_bytes;
        if (rows == RR) {
            float d[RR];
            warp_rows_dot<T, RR, G>(first, row_stride, x, K, w, first_loaded, d);
            if (SWIGLU) {
                if (lane == 0) out[0] = d[0] / (1.0f + expf(-d[0])) * d[1];
            } else {
#pragma unroll
                for (int r = 0; r < RR; ++r)
                    if (lane == r) out[r] = d[r] + (residual ? residual[n + r] : 0.0f);
            }
        } else {  // the last warp of a matrix whose rows are not a multiple of R
            for (int r = 0; r < rows; ++r) {
                typename T::Pack w1[G][1];
                float d[1];
                warp_rows_dot<T, 1, G>(first + r * row_stride, row_stride, x, K, w1, false, d);
                if (lane == 0) out[r] = d[0] + (residual ? residual[n + r] : 0.0f);
            }
        }
    }
};

// Matrix e of W_base (null for e < 0: an expert another rank holds).
__device__ __forceinline__ const char* matrix_of(const char* W_base, long stride_bytes, int e) {
    return e < 0 ? nullptr : W_base + (long)e * stride_bytes;
}

// The one matrix-vector kernel: dense layers, MoE experts chosen on the device, and the SwiGLU of
// gate and up projections.
//
//   slot s (0..n_slots, grid.y) uses matrix W_base + e_s * expert_stride_bytes,
//   e_s = ids ? ids[s] : s (e_s < 0: not on this rank, y = 0), and input x + s * x_slot_stride;
//   plain:  y[s * y_slot_stride + n] = W_{e_s}[n, :] . x_s (+ residual[n])
//   SWIGLU: each matrix is [gate (N rows); up (N rows)];
//           y[s * y_slot_stride + n] = silu(gate[n, :] . x_s) * (up[n, :] . x_s)
// Each warp computes R consecutive output rows (plain) or one (SWIGLU, R = 1), loading G packs
// of each of its rows per group; blockDim.x / 32 warps per block. A matrix known up front (no
// ids) does not depend on earlier kernels: before the PDL wait each warp loads its first group
// into registers and pulls the rest of its rows into L2. Expert ids are read after the wait, and
// only then is the successor let start, so a successor may read the same ids before its own
// wait: with ids_early, the ids (through L2) and the first group of the chosen rows (into
// registers) are loaded before the wait (the experts' down projection after gate/up).
template <typename T, int R, int G, bool SWIGLU>
__device__ void matvec_impl(const char* __restrict__ W_base, long expert_stride_bytes,
                            const int* __restrict__ ids, int ids_early,
                            const float* __restrict__ x, long x_slot_stride,
                            const float* __restrict__ residual, float* __restrict__ y,
                            long y_slot_stride, int N, int K) {
    const int s = blockIdx.y;
    const float* xv = x + s * x_slot_stride;
    MatvecRows<T, R, G, SWIGLU> m(blockIdx.x, N, K);
    const char* matrix;
    timeline_begin();
    if (!ids) {
        let_next_start_();
        matrix = W_base + (long)s * expert_stride_bytes;
        m.preload(matrix, xv, N, K, true);
        wait_for_previous();
    } else if (ids_early) {
        let_next_start_();
        matrix = matrix_of(W_base, expert_stride_bytes, __ldcg(ids + s));
        m.preload(matrix, xv, N, K, false);
        wait_for_previous();
    } else {
        wait_for_previous();
        matrix = matrix_of(W_base, expert_stride_bytes, ids[s]);
        let_next_start_();
    }
    m.finish(matrix, xv, residual, y + s * y_slot_stride, N, K);
}

// Entry points: NAME, one row per warp, UNROLL packs per group; NAME_glu, the SwiGLU of a gate and
// an up row per warp; NAME_g8 and NAME_glu_g8, the same with groups of 8 packs (rows of 7 or 8
// packs per lane in one round trip; ops.rs picks them); NAME_r4, four rows of 3 packs (short
// rows). The launch bound asks for one block of MATVEC_MAX_WARPS warps per SM: the compiler then
// gives the 16-bit kernels 96 to 124 registers (fewer warps resident, each holding its first
// group across the PDL wait). Held to 3 blocks (at most 80 registers) they were slower on an
// H200: Qwen3 56.3 against 55.4 us, Mixtral-8x7B 248.8 against 214.8 (docs/architecture.md,
// "GPU kernel design notes": forced occupancy, under "Tried and not kept").
#define MATVEC_ENTRY(NAME, T, R, G, SWIGLU)                                                     \
    extern "C" __global__ void __launch_bounds__(MATVEC_MAX_WARPS * WARP, 1)                    \
        NAME(const char* W, long es, const int* ids, int ids_early, const float* x, long xs,    \
             const float* res, float* y, long ys, int N, int K) {                               \
        matvec_impl<T, R, G, SWIGLU>(W, es, ids, ids_early, x, xs, res, y, ys, N, K);           \
    }
MATVEC_ENTRY(matvec_bf16, Bf16, 1, UNROLL, false)
MATVEC_ENTRY(matvec_f16, F16, 1, UNROLL, false)
MATVEC_ENTRY(matvec_f32, F32, 1, UNROLL, false)
MATVEC_ENTRY(matvec_bf16_glu, Bf16, 1, UNROLL, true)
MATVEC_ENTRY(matvec_f16_glu, F16, 1, UNROLL, true)
MATVEC_ENTRY(matvec_f32_glu, F32, 1, UNROLL, true)
MATVEC_ENTRY(matvec_bf16_g8, Bf16, 1, 8, false)
MATVEC_ENTRY(matvec_f16_g8, F16, 1, 8, false)
MATVEC_ENTRY(matvec_f32_g8, F32, 1, 8, false)
MATVEC_ENTRY(matvec_bf16_glu_g8, Bf16, 1, 8, true)
MATVEC_ENTRY(matvec_f16_glu_g8, F16, 1, 8, true)
MATVEC_ENTRY(matvec_f32_glu_g8, F32, 1, 8, true)
MATVEC_ENTRY(matvec_bf16_r4, Bf16, 4, 3, false)
MATVEC_ENTRY(matvec_f16_r4, F16, 4, 3, false)
MATVEC_ENTRY(matvec_f32_r4, F32, 4, 3, false)

// y = x / sqrt(mean(x^2) + eps) * g, one block per row of length D.
extern "C" __global__ void rms_norm(const float* __restrict__ x, const float* __restrict__ g,
                                    float* __restrict__ y, int D, float eps) {
    let_next_start();
    wait_for_previous();
    const float* xr = x + (long)blockIdx.x * D;
    float* yr = y + (long)blockIdx.x * D;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < D; i += blockDim.x) ss += xr[i] * xr[i];
    ss = block_sum(ss);
    const float inv = rsqrtf(ss / (float)D + eps);
    for (int i = threadIdx.x; i < D; i += blockDim.x) yr[i] = xr[i] * inv * g[i];
}

// Bytes of its router row each lane loads before the wait and holds in registers (a whole row
// of up to 8 * 8 * 32 = 2048 16-bit weights; the rest of a longer row is pulled into L2 then
// and loaded after the wait).
#define ROUTER_HELD_BYTES 128

// The FFN's rms_norm and its router in one kernel, so no norm kernel runs (or is waited for)
// between o_proj and the router: every block normalises x into shared memory (K floats, dynamic)
// as rms_norm does (y = x / sqrt(mean(x^2) + eps) * g; block 0 also writes it to `normed` for the
// experts) and each of its warps computes one expert's logit from it. The router rows and g do
// not depend on earlier kernels: they are loaded (into registers and shared memory) before the
// wait, so after it only x is read from memory.
template <typename T>
__device__ void router_norm_impl(const char* __restrict__ W, const float* __restrict__ x,
                                 const float* __restrict__ g, float eps,
                                 float* __restrict__ normed, float* __restrict__ logits, int E,
                                 int K) {
    constexpr int HELD = ROUTER_HELD_BYTES / T::PACK_BYTES;
    extern __shared__ float4 xs4[];
    const int lane = threadIdx.x & 31;
    const int e = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    const long row_bytes = (long)K * (T::PACK_BYTES / 8);
    const char* row = W + (long)e * row_bytes;
    const int packs = K % 8 == 0 && ((unsigned long)W & 15) == 0 ? K / 8 : 0;
    const float4* x4 = (const float4*)x;
    const float4* g4 = (const float4*)g;
    typename T::Pack w[HELD];
    let_next_start();
#pragma unroll
    for (int j = 0; j < HELD; ++j) {
        const int p = lane + j * WARP;
        if (e < E && p < packs) w[j] = load_pack<T>(row, p);
    }
    const long held_bytes = (long)HELD * WARP * T::PACK_BYTES;
    if (e < E && row_bytes > held_bytes) prefetch_l2(row + held_bytes, row_bytes - held_bytes);
#pragma unroll 4
    for (int i = threadIdx.x; i < K / 4; i += blockDim.x) xs4[i] = __ldg(g4 + i);
    wait_for_previous();
    // x as float4 (K % 4 == 0, ops.rs checks), four loads in flight per thread: a block of 256
    // threads reading one float at a time took longer than the norm kernel's 1024.
    float ss = 0.0f;
#pragma unroll 4
    for (int i = threadIdx.x; i < K / 4; i += blockDim.x) {
        const float4 v = x4[i];
        ss += v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w;
    }
    ss = block_sum(ss);
    const float inv = rsqrtf(ss / (float)K + eps);
    float4* n4 = (float4*)normed;
#pragma unroll 4
    for (int i = threadIdx.x; i < K / 4; i += blockDim.x) {
        const float4 v = x4[i], s = xs4[i];
        const float4 y = make_float4(v.x * inv * s.x, v.y * inv * s.y, v.z * inv * s.z, v.w * inv * s.w);
        xs4[i] = y;
        if (blockIdx.x == 0) n4[i] = y;
    }
    __syncthreads();
    if (e >= E) return;
    float acc = 0.0f;
#pragma unroll
    for (int j = 0; j < HELD; ++j) {
        const int p = lane + j * WARP;
        if (p < packs) acc += T::dot8(w[j], xs4[2 * p], xs4[2 * p + 1]);
    }
    for (int p = lane + HELD * WARP; p < packs; p += WARP)
        acc += T::dot8(load_pack<T>(row, p), xs4[2 * p], xs4[2 * p + 1]);
    const float* xs = (const float*)xs4;
    for (int k = packs * 8 + lane; k < K; k += WARP) acc += T::one(row, k) * xs[k];
    acc = warp_sum(acc);
    if (lane == 0) logits[e] = acc;
}

#define ROUTER_NORM_ENTRY(NAME, T)                                                              \
    extern "C" __global__ void __launch_bounds__(MATVEC_MAX_WARPS * WARP)                       \
        NAME(const char* W, const float* x, const float* g, float eps, float* normed,           \
             float* logits, int E, int K) {                                                     \
        router_norm_impl<T>(W, x, g, eps, normed, logits, E, K);                                \
    }
ROUTER_NORM_ENTRY(router_norm_bf16, Bf16)
ROUTER_NORM_ENTRY(router_norm_f16, F16)
ROUTER_NORM_ENTRY(router_norm_f32, F32)

// Decode attention for one token with grouped-query heads, its rope and KV append fused in: the
// token's q, k and v heads come raw from the qkv matvec (bias added), get the optional per-head
// RMSNorm (Qwen3) and rotary embedding here, and the token attends over the cached positions
// 0..*pos_ptr-1 and itself, whose k and v stay in registers (the first query head of each group
// appends them to the caches at *pos_ptr for later steps). So no rope kernel runs, or is waited
// for, between the qkv matvec and attention.
// One block per query head; its warps split the cached positions (online softmax per warp,
// ATTN_BATCH positions loaded at once so their latencies overlap) and are combined at the end by
// all the block's threads, so any context length runs in fixed shared memory. Lane l holds
// elements l, l+32, ... of a head: D <= 32 * PL (entries for PL 4 and 8). The caches hold f32, or
// bf16 (KV16), and are contiguous (position p in cache row p) or, with a block table, paged as
// the batched steps' caches are (kv_slot in common.cuh): so a one-row step of a served sequence
// runs this step too.
#define ATTN_WARPS 16
#ifndef ATTN_BATCH
#define ATTN_BATCH 4
#endif

// Element i of a cache of f32 or (KV16) bf16, through L2 only.
template <bool KV16>
__device__ __forceinline__ float kv_read(const void* __restrict__ cache, long i) {
    if (KV16) return __uint_as_float(((u32)__ldcg((const unsigned short*)cache + i)) << 16);
    return __ldcg((const float*)cache + i);
}

// K and V rows of the positions base + b * ATTN_WARPS (b < ATTN_BATCH) below len; zeros beyond.
// `head` is the element offset of this KV head's rows; a position's row is kv_slot(...) of the
// block table (null: contiguous). Loaded through L2 only (ld.global.cg): the first batch is read
// before the PDL wait, when this SM's L1 may still hold lines from an earlier launch, and a row
// is read once anyway; the table too (the host writes it before the step).
template <int PL, bool KV16>
__device__ __forceinline__ void load_kv_rows(const void* __restrict__ k_cache,
                                             const void* __restrict__ v_cache, long head,
                                             const int* __restrict__ table, int block, int base,
                                             int len, int D, float (&kr)[ATTN_BATCH][PL],
                                             float (&vr)[ATTN_BATCH][PL]) {
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int b = 0; b < ATTN_BATCH; ++b) {
        const int p = base + b * ATTN_WARPS;
        const long row =
            p < len ? (table ? (long)__ldcg(table + p / block) * block + p % block : p) : 0;
#pragma unroll
        for (int j = 0; j < PL; ++j) {
            const int d = lane + WARP * j;
            const bool ok = p < len && d < D;
            kr[b][j] = ok ? kv_read<KV16>(k_cache, head + row * D + d) : 0.0f;
            vr[b][j] = ok ? kv_read<KV16>(v_cache, head + row * D + d) : 0.0f;
        }
    }
}

// One head held by a warp (lane l: elements l + 32 j, zeros beyond D): RMSNorm with the weights
// `g` (lane l's elements, loaded before the PDL wait) when `normed`, then the half rotation by
// (c, s), with `scratch` (D floats of the warp's own) to reach each element's partner. The same
// arithmetic as rope_kv_append.
template <int PL>
__device__ __forceinline__ void norm_rope_head(float (&v)[PL], bool normed, const float (&g)[PL],
                                               float eps, const float (&c)[PL],
                                               const float (&s)[PL], int D, float* scratch) {
    const int lane = threadIdx.x & 31, half = D / 2;
    if (normed) {
        float ss = 0.0f;
#pragma unroll
        for (int j = 0; j < PL; ++j) ss = fmaf(v[j], v[j], ss);
        const float inv = rsqrtf(warp_sum(ss) / (float)D + eps);
#pragma unroll
        for (int j = 0; j < PL; ++j) {
            const int d = lane + WARP * j;
            v[j] = d < D ? v[j] * inv * g[j] : 0.0f;
        }
    }
#pragma unroll
    for (int j = 0; j < PL; ++j) {
        const int d = lane + WARP * j;
        if (d < D) scratch[d] = v[j];
    }
    __syncwarp();
#pragma unroll
    for (int j = 0; j < PL; ++j) {
        const int d = lane + WARP * j;
        if (d < D)
            v[j] = d < half ? v[j] * c[j] - scratch[d + half] * s[j]
                            : v[j] * c[j] + scratch[d - half] * s[j];
    }
    __syncwarp();
}

template <int PL, bool KV16>
__device__ void attention_decode_impl(const float* __restrict__ qkv,
                                      const float* __restrict__ q_norm,
                                      const float* __restrict__ k_norm, float eps,
                                      const float* __restrict__ inv_freq,
                                      void* __restrict__ k_cache, void* __restrict__ v_cache,
                                      const int* __restrict__ pos_ptr,
                                      const int* __restrict__ table, int block,
                                      float* __restrict__ out, int H, int KVH, int D,
                                      int capacity, float scale) {
    __shared__ float m_s[ATTN_WARPS], l_s[ATTN_WARPS], f_s[ATTN_WARPS];
    __shared__ float acc_s[ATTN_WARPS][WARP * PL];
    const int h = blockIdx.x, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int group = H / KVH, kvh = h / group;
    const long head = (long)kvh * capacity * D;
    let_next_start();
    // Before the wait: the position, the rope angles, the q/k norm weights and the first batch of
    // cached rows. None of them comes from the kernels waited for (the host sets the position
    // before the step; rows below it were appended by earlier steps), and an early launch may
    // still have L1 lines of an earlier one, so the position is read through L2 (ld.global.cg)
    // like the rows.
    const int pos = __ldcg(pos_ptr);
    const int len = pos;  // the cached positions
    int base = warp;
    float kr[ATTN_BATCH][PL], vr[ATTN_BATCH][PL];
    load_kv_rows<PL, KV16>(k_cache, v_cache, head, table, block, base, len, D, kr, vr);
    float qv[PL], kv[PL], c[PL], s[PL], acc[PL], qg[PL], kg[PL];
#pragma unroll
    for (int j = 0; j < PL; ++j) {
        const int d = lane + WARP * j;
        acc[j] = 0.0f;
        const int f = d < D / 2 ? d : d - D / 2;
        s[j] = c[j] = 0.0f;
        if (d < D) sincosf((float)pos * inv_freq[f], &s[j], &c[j]);
        qg[j] = q_norm && d < D ? q_norm[d] : 0.0f;
        kg[j] = k_norm && warp == 0 && d < D ? k_norm[d] : 0.0f;
    }
    wait_for_previous();
    // The token's q (every warp) and its k and v (warp 0), all loaded before any is used.
#pragma unroll
    for (int j = 0; j < PL; ++j) {
        const int d = lane + WARP * j;
        qv[j] = d < D ? qkv[(long)h * D + d] : 0.0f;
        kv[j] = warp == 0 && d < D ? qkv[(long)(H + kvh) * D + d] : 0.0f;
        acc[j] = warp == 0 && d < D ? qkv[(long)(H + KVH + kvh) * D + d] : 0.0f;
    }
    norm_rope_head<PL>(qv, q_norm != nullptr, qg, eps, c, s, D, acc_s[warp]);
    float m = NEG_INF, l = 0.0f;
    // Warp 0 starts from the token itself: its score, weight 1 at m = score, and its v.
    if (warp == 0) {
        norm_rope_head<PL>(kv, k_norm != nullptr, kg, eps, c, s, D, acc_s[warp]);
        float sd = 0.0f;
#pragma unroll
        for (int j = 0; j < PL; ++j) sd = fmaf(qv[j], kv[j], sd);
        m = warp_sum(sd) * scale;
        l = 1.0f;
        if (h % group == 0) {
            const long row = table ? (long)__ldcg(table + pos / block) * block + pos % block : pos;
#pragma unroll
            for (int j = 0; j < PL; ++j) {
                const int d = lane + WARP * j;
                if (d < D) {
                    kv_store(k_cache, head + row * D + d, kv[j], KV16);
                    kv_store(v_cache, head + row * D + d, acc[j], KV16);
                }
            }
        }
    }
    for (; base < len; base += ATTN_WARPS * ATTN_BATCH) {
        float sc[ATTN_BATCH];
        float m_new = m;
#pragma unroll
        for (int b = 0; b < ATTN_BATCH; ++b) {
            float sd = 0.0f;
#pragma unroll
            for (int j = 0; j < PL; ++j) sd = fmaf(qv[j], kr[b][j], sd);
            sd = warp_sum(sd) * scale;
            sc[b] = base + b * ATTN_WARPS < len ? sd : NEG_INF;
            m_new = fmaxf(m_new, sc[b]);
        }
        // Position `base` is always valid, so m_new is finite here.
        const float corr = expf(m - m_new);
        l *= corr;
#pragma unroll
        for (int j = 0; j < PL; ++j) acc[j] *= corr;
#pragma unroll
        for (int b = 0; b < ATTN_BATCH; ++b) {
            const float e = expf(sc[b] - m_new);
            l += e;
#pragma unroll
            for (int j = 0; j < PL; ++j) acc[j] = fmaf(e, vr[b][j], acc[j]);
        }
        m = m_new;
        load_kv_rows<PL, KV16>(k_cache, v_cache, head, table, block,
                               base + ATTN_WARPS * ATTN_BATCH, len, D, kr, vr);
    }
    if (lane == 0) { m_s[warp] = m; l_s[warp] = l; }
#pragma unroll
    for (int j = 0; j < PL; ++j) acc_s[warp][lane + WARP * j] = acc[j];
    __syncthreads();
    // Each warp's share of the total: exp(m_w - M), 0 for a warp that saw no position.
    if (threadIdx.x < ATTN_WARPS) {
        float M = NEG_INF;
        for (int w = 0; w < ATTN_WARPS; ++w) M = fmaxf(M, m_s[w]);
        const float mw = m_s[threadIdx.x];
        f_s[threadIdx.x] = mw == NEG_INF ? 0.0f : expf(mw - M);
    }
    __syncthreads();
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
        float o = 0.0f, L = 0.0f;
        for (int w = 0; w < ATTN_WARPS; ++w) {
            L += l_s[w] * f_s[w];
            o += acc_s[w][d] * f_s[w];
        }
        out[(long)h * D + d] = o * (1.0f / L);
    }
}

#define ATTENTION_ENTRY(NAME, PL, KV16)                                                         \
    extern "C" __global__ void __launch_bounds__(ATTN_WARPS * WARP)                             \
        NAME(const float* qkv, const float* q_norm, const float* k_norm, float eps,             \
             const float* inv_freq, void* k_cache, void* v_cache, const int* pos_ptr,           \
             const int* table, int block, float* out, int H, int KVH, int D, int capacity,      \
             float scale) {                                                                     \
        attention_decode_impl<PL, KV16>(qkv, q_norm, k_norm, eps, inv_freq, k_cache, v_cache,   \
                                        pos_ptr, table, block, out, H, KVH, D, capacity,        \
                                        scale);                                                 \
    }
ATTENTION_ENTRY(attention_decode_d128, 4, false)
ATTENTION_ENTRY(attention_decode, 8, false)
ATTENTION_ENTRY(attention_decode_d128_kv16, 4, true)
ATTENTION_ENTRY(attention_decode_kv16, 8, true)

// y[n] = residual[n] + sum_s weights[s] * partial[s][n] (+ sigmoid(*shared_logit) * shared[n]):
// the weighted sum of the chosen experts' outputs in a fixed order (deterministic, unlike
// atomics), plus a sigmoid-gated shared expert (Qwen2-MoE). residual and shared may be null.
// combine_elements computes E elements (first, first + stride, ...; those from N on are
// skipped), loading every value of a batch of COMBINE_BATCH slots, for all E elements, before
// the first is used: one memory round trip per batch, not one per slot and element.
#define COMBINE_BATCH 8
template <int E>
__device__ __forceinline__ void combine_elements(int first, int stride,
                                                 const float* __restrict__ partial,
                                                 const float* __restrict__ weights, int n_slots,
                                                 const float* __restrict__ residual,
                                                 const float* __restrict__ shared,
                                                 const float* __restrict__ shared_logit, int N,
                                                 float (&out)[E]) {
    float acc[E], base[E], extra[E];
#pragma unroll
    for (int i = 0; i < E; ++i) {
        const int n = first + i * stride;
        acc[i] = 0.0f;
        base[i] = residual && n < N ? residual[n] : 0.0f;
        extra[i] = shared && n < N ? shared[n] : 0.0f;
    }
    for (int s0 = 0; s0 < n_slots; s0 += COMBINE_BATCH) {
        float w[COMBINE_BATCH], p[E][COMBINE_BATCH];
#pragma unroll
        for (int j = 0; j < COMBINE_BATCH; ++j) {
            const int s = s0 + j;
            w[j] = s < n_slots ? weights[s] : 0.0f;
#pragma unroll
            for (int i = 0; i < E; ++i) {
                const int n = first + i * stride;
                p[i][j] = s < n_slots && n < N ? partial[(long)s * N + n] : 0.0f;
            }
        }
#pragma unroll
        for (int j = 0; j < COMBINE_BATCH; ++j)
#pragma unroll
            for (int i = 0; i < E; ++i) acc[i] = fmaf(w[j], p[i][j], acc[i]);
    }
    const float gate = shared ? 1.0f + expf(-*shared_logit) : 1.0f;
#pragma unroll
    for (int i = 0; i < E; ++i) out[i] = base[i] + (shared ? acc[i] + extra[i] / gate : acc[i]);
}

extern "C" __global__ void combine_slots(const float* __restrict__ partial,
                                         const float* __restrict__ weights, int n_slots,
                                         const float* __restrict__ residual,
                                         const float* __restrict__ shared,
                                         const float* __restrict__ shared_logit,
                                         float* __restrict__ y, int N) {
    let_next_start();
    wait_for_previous();
    const int n = blockIdx.x * blockDim.x + threadIdx.x;
    float v[1];
    combine_elements<1>(n, 0, partial, weights, n_slots, residual, shared, shared_logit, N, v);
    if (n < N) y[n] = v[0];
}

// Elements per thread that combine_slots_norm keeps in registers between its two passes (rows
// up to NORM_HELD * blockDim.x; longer ones read y back).
#define NORM_HELD 4

// combine_slots and the next layer's first rms_norm in one block, for chained layers with no
// all-reduce between them: y as combine_slots writes it, then normed = rms_norm(y) * g with the
// rms_norm kernel's arithmetic (launched with its block size, the sums come out the same). g is
// a weight, loaded before the wait.
extern "C" __global__ void __launch_bounds__(1024) combine_slots_norm(const float* __restrict__ partial,
                                              const float* __restrict__ weights, int n_slots,
                                              const float* __restrict__ residual,
                                              const float* __restrict__ shared,
                                              const float* __restrict__ shared_logit,
                                              float* __restrict__ y, int N,
                                              const float* __restrict__ g,
                                              float* __restrict__ normed, float eps) {
    const int held = NORM_HELD * blockDim.x;
    float gv[NORM_HELD], v[NORM_HELD];
    let_next_start();
#pragma unroll
    for (int i = 0; i < NORM_HELD; ++i) {
        const int n = threadIdx.x + i * blockDim.x;
        gv[i] = n < N ? g[n] : 0.0f;
    }
    wait_for_previous();
    float ss = 0.0f;
    for (int first = 0; first < N; first += held) {
        combine_elements<NORM_HELD>(first + threadIdx.x, blockDim.x, partial, weights, n_slots,
                                    residual, shared, shared_logit, N, v);
#pragma unroll
        for (int i = 0; i < NORM_HELD; ++i) {
            const int n = first + threadIdx.x + i * blockDim.x;
            if (n < N) {
                y[n] = v[i];
                ss += v[i] * v[i];
            }
        }
    }
    ss = block_sum(ss);
    const float inv = rsqrtf(ss / (float)N + eps);
    if (N <= held) {
#pragma unroll
        for (int i = 0; i < NORM_HELD; ++i) {
            const int n = threadIdx.x + i * blockDim.x;
            if (n < N) normed[n] = v[i] * inv * gv[i];
        }
    } else {
        for (int n = threadIdx.x; n < N; n += blockDim.x) normed[n] = y[n] * inv * g[n];
    }
}

// Row r (grid.y) of x = row tokens[r] of the [vocab, D] embedding table, widened to f32 (one
// block per row). The tokens are read from device memory, so a captured step graph takes new
// tokens without being rebuilt. dtype: 0 f32, 1 f16, 2 bf16.
extern "C" __global__ void embed_row(const void* __restrict__ table, int dtype,
                                     const int* __restrict__ tokens, float* __restrict__ x, int D) {
    let_next_start();
    wait_for_previous();
    const long base = (long)tokens[blockIdx.y] * D;
    float* row = x + (long)blockIdx.y * D;
    for (int i = threadIdx.x; i < D; i += blockDim.x) {
        const long j = base + i;
        row[i] = dtype == 0 ? F32::one(table, j) : dtype == 1 ? F16::one(table, j) : Bf16::one(table, j);
    }
}

// Sums across ranks in a 16-bit type (`--reduce-dtype model` through NCCL): to16 rounds a
// segment's partial output once (bf16 != 0: to bf16, else f16) for the all-reduce, and add16
// widens the sum again and adds the residual the segment left out (residual null: none), so the
// residual stream itself stays f32. Grid-stride over n values.
extern "C" __global__ void to16(const float* __restrict__ x, u16* __restrict__ y16, long n,
                                int bf16) {
    let_next_start();
    wait_for_previous();
    for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long)gridDim.x * blockDim.x)
        y16[i] = f32_to_16(x[i], bf16);
}

extern "C" __global__ void add16(const float* __restrict__ residual, const u16* __restrict__ s16,
                                 float* __restrict__ out, long n, int bf16) {
    let_next_start();
    wait_for_previous();
    for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long)gridDim.x * blockDim.x)
        out[i] = (residual ? residual[i] : 0.0f) + f16_to_f32(s16[i], bf16);
}

// The largest of the n values of row r (grid.y) and its index (the lowest index among equal
// values), by one block per row: best[2r] = the value, best[2r + 1] = the index as a float (exact
// below 2^24, far above any vocabulary). NaN never wins, so a row of NaN gives index 0 and NEG_INF.
extern "C" __global__ void __launch_bounds__(1024) argmax(const float* __restrict__ x, int n,
                                                          float* __restrict__ best) {
    let_next_start();
    wait_for_previous();
    x += (long)blockIdx.y * n;
    best += 2 * (long)blockIdx.y;
    __shared__ float part_v[32];
    __shared__ int part_i[32];
    float v = NEG_INF;
    int idx = 0x7fffffff;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        const float xi = x[i];
        if (xi > v) { v = xi; idx = i; }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, v, o);
        const int oi = __shfl_xor_sync(0xffffffffu, idx, o);
        if (ov > v || (ov == v && oi < idx)) { v = ov; idx = oi; }
    }
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) { part_v[warp] = v; part_i[warp] = idx; }
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int w = 1; w < (int)(blockDim.x >> 5); ++w) {
            if (part_v[w] > v || (part_v[w] == v && part_i[w] < idx)) { v = part_v[w]; idx = part_i[w]; }
        }
        best[0] = v;
        best[1] = (float)(idx == 0x7fffffff ? 0 : idx);
    }
}
