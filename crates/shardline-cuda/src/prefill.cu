// Shardline's CUDA kernels for many rows at once, compiled at run time with NVRTC as a module of
// their own: a prompt's rows (prefill), whose matrix products run in cuBLAS, and a batch of
// sequences' rows (batched decode), whose matrix products are the grouped products below (each
// weight row read once for all the rows that need it). These kernels do what lies between the
// products, row by row, mirroring the decode kernels of kernels.cu (same formulas, same order of
// operations). The kernels a batched step chains wait for their predecessor (wait_for_previous)
// before they read anything, so they are launched with programmatic dependent launch, as the
// decode kernels are; split16 and swiglu_rows, between cuBLAS GEMMs, are not.
//
// Activations are f32. For bf16/f16 weights the GEMM inputs are an f32 tensor split into two
// 16-bit tensors, hi = round(x) and lo = round(x - hi), so that W.hi + W.lo keeps about 16 bits
// of x (one rounding alone keeps 8 for bf16, which is too few to match an f32 reference).

// hi[i] = round(x[i]), lo[i] = round(x[i] - hi[i]) in bf16 (bf16 != 0) or f16, for n elements.
extern "C" __global__ void split16(const float* __restrict__ x, u16* __restrict__ hi,
                                   u16* __restrict__ lo, long n, int bf16) {
    for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long)gridDim.x * blockDim.x) {
        const float v = x[i];
        const u16 h = f32_to_16(v, bf16);
        hi[i] = h;
        lo[i] = f32_to_16(v - f16_to_f32(h, bf16), bf16);
    }
}

// dst[a] = src[rows[a]] for rows of D floats; one block per a.
extern "C" __global__ void gather_rows(const float* __restrict__ src, const int* __restrict__ rows,
                                       float* __restrict__ dst, int D) {
    let_next_start();
    wait_for_previous();
    const int a = blockIdx.x;
    const float* s = src + (long)rows[a] * D;
    float* d = dst + (long)a * D;
    for (int i = threadIdx.x; i < D; i += blockDim.x) d[i] = s[i];
}


// Causal attention of row r (grid.y) over its sequence's positions 0..=kv_position(...) (cache
// rows kv_slot(...): a prompt's consecutive positions, or a batch of sequences each at its own
// position in a paged cache; f32 or, with kv16, bf16), grouped-query heads, one block per (query
// head, row). q is read from the rotated qkv rows ([rows][q | k | v]); out is
// [rows][H*D]. Each warp keeps an online softmax over every PREFILL_ATTN_WARPS-th position; the
// warps are combined at the end. Lane l holds elements l, l+32, ... of a head: D <= 256.
#define PREFILL_ATTN_WARPS 8
#define ATTN_MAX_PER_LANE 8
extern "C" __global__ void __launch_bounds__(PREFILL_ATTN_WARPS * WARP)
    attention_rows(const float* __restrict__ qkv, const void* __restrict__ k_cache,
                   const void* __restrict__ v_cache, int pos0, const int* __restrict__ positions,
                   const int* __restrict__ tables, int table_stride, int block, int kv16,
                   float* __restrict__ out, int H, int KVH, int D, int capacity, float scale) {
    __shared__ float m_s[PREFILL_ATTN_WARPS], l_s[PREFILL_ATTN_WARPS];
    __shared__ float acc_s[PREFILL_ATTN_WARPS][WARP * ATTN_MAX_PER_LANE];
    let_next_start();
    wait_for_previous();
    const int h = blockIdx.x, r = blockIdx.y, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int kvh = h / (H / KVH);
    const int len = kv_position(pos0, positions, r) + 1;
    const float* q = qkv + (long)r * (H + 2 * KVH) * D + (long)h * D;
    const long head = (long)kvh * capacity * D;
    float qv[ATTN_MAX_PER_LANE], acc[ATTN_MAX_PER_LANE];
#pragma unroll
    for (int j = 0; j < ATTN_MAX_PER_LANE; ++j) {
        const int d = lane + WARP * j;
        qv[j] = d < D ? q[d] : 0.0f;
        acc[j] = 0.0f;
    }
    float m = NEG_INF, l = 0.0f;
    for (int p = warp; p < len; p += PREFILL_ATTN_WARPS) {
        float kr[ATTN_MAX_PER_LANE], vr[ATTN_MAX_PER_LANE];
        float sd = 0.0f;
        const long slot = kv_slot(tables, table_stride, block, r, p);
#pragma unroll
        for (int j = 0; j < ATTN_MAX_PER_LANE; ++j) {
            const int d = lane + WARP * j;
            kr[j] = d < D ? kv_load(k_cache, head + slot * D + d, kv16) : 0.0f;
            vr[j] = d < D ? kv_load(v_cache, head + slot * D + d, kv16) : 0.0f;
            sd = fmaf(qv[j], kr[j], sd);
        }
        sd = warp_sum(sd) * scale;
        const float m_new = fmaxf(m, sd);
        const float corr = expf(m - m_new);
        const float e = expf(sd - m_new);
        l = l * corr + e;
#pragma unroll
        for (int j = 0; j < ATTN_MAX_PER_LANE; ++j) acc[j] = fmaf(e, vr[j], acc[j] * corr);
        m = m_new;
    }
    if (lane == 0) { m_s[warp] = m; l_s[warp] = l; }
#pragma unroll
    for (int j = 0; j < ATTN_MAX_PER_LANE; ++j) acc_s[warp][lane + WARP * j] = acc[j];
    __syncthreads();
    if (warp != 0) return;
    float M = NEG_INF;
    for (int w = 0; w < PREFILL_ATTN_WARPS; ++w) M = fmaxf(M, m_s[w]);
    float L = 0.0f;
    float o[ATTN_MAX_PER_LANE];
#pragma unroll
    for (int j = 0; j < ATTN_MAX_PER_LANE; ++j) o[j] = 0.0f;
    for (int w = 0; w < PREFILL_ATTN_WARPS; ++w) {
        if (m_s[w] == NEG_INF) continue;  // this warp saw no position
        const float f = expf(m_s[w] - M);
        L += l_s[w] * f;
#pragma unroll
        for (int j = 0; j < ATTN_MAX_PER_LANE; ++j) o[j] += acc_s[w][lane + WARP * j] * f;
    }
    const float inv = 1.0f / L;
    float* orow = out + (long)r * H * D + (long)h * D;
#pragma unroll
    for (int j = 0; j < ATTN_MAX_PER_LANE; ++j) {
        const int d = lane + WARP * j;
        if (d < D) orow[d] = o[j] * inv;
    }
}

// act[a][i] = silu(gu[a][i]) * gu[a][N + i] for n rows of the [gate (N) | up (N)] GEMM output.
extern "C" __global__ void swiglu_rows(const float* __restrict__ gu, float* __restrict__ act,
                                       long n, int N) {
    for (long t = (long)blockIdx.x * blockDim.x + threadIdx.x; t < n * N;
         t += (long)gridDim.x * blockDim.x) {
        const long a = t / N;
        const int i = (int)(t - a * N);
        const float g = gu[a * 2 * N + i], u = gu[a * 2 * N + N + i];
        act[t] = g / (1.0f + expf(-g)) * u;
    }
}

// combine_slots of kernels.cu for row r (one block per row): y[r][n] = sum_j weights[r*k+j] *
// expert_out[slot_row[r*k+j]][n] (slot_row < 0: an expert another rank holds, adds nothing), in
// slot order, plus sigmoid(shared_logit[r]) * shared[r][n] when a shared expert is given, plus
// residual[r][n] when one is given.
extern "C" __global__ void combine_rows(const float* __restrict__ expert_out,
                                        const int* __restrict__ slot_row,
                                        const float* __restrict__ weights, int k,
                                        const float* __restrict__ shared,
                                        const float* __restrict__ shared_logit,
                                        const float* __restrict__ residual,
                                        float* __restrict__ y, int N) {
    let_next_start();
    wait_for_previous();
    const int r = blockIdx.x;
    for (int n = threadIdx.x; n < N; n += blockDim.x) {
        float acc = 0.0f;
        for (int j = 0; j < k; ++j) {
            const int a = slot_row[(long)r * k + j];
            const float part = a >= 0 ? expert_out[(long)a * N + n] : 0.0f;
            acc = fmaf(weights[(long)r * k + j], part, acc);
        }
        if (shared) acc += shared[(long)r * N + n] / (1.0f + expf(-shared_logit[r]));
        if (residual) acc += residual[(long)r * N + n];
        y[(long)r * N + n] = acc;
    }
}

// ---- grouped products for a batch of rows ----
//
// An assignment pairs a row of x with a matrix; assignments are grouped by matrix, and each weight
// row is read from memory once for all the assignments of its group. Group g (grid.y) holds
// assignments offsets[g] .. offsets[g + 1] (with offsets null: one group of `count`) and uses
// matrix W + g * matrix_stride bytes; assignment a reads x row src[a] (src null: row a) of K
// values and writes y row a (y_stride values apart):
//   plain:  y[a][n] = W[n, :] . x_a (+ residual[a][n]), for N rows n;
//   SWIGLU: the matrix is [gate (N rows); up (N rows)]; y[a][n] = silu(gate[n] . x_a) * (up[n] . x_a).
// Each warp holds two weight rows (rows 2u and 2u + 1; SWIGLU: gate u and up u) a chunk of
// GROUPED_PACKS packs of 8 weights per lane at a time, and runs every assignment of a tile of up to
// GROUPED_TILE through it before the next chunk; the partial sums of the tile wait in shared
// memory. A tile after the first reads the weights again, from L2 while they are still there.
#define GROUPED_WARPS 8
#define GROUPED_TILE 64

// The group a block works on: blockIdx.y itself, or with a list of the groups that have
// assignments (group_by_expert's `active`, -1 past its end) the blockIdx.y-th of them, so that a
// batch launches blocks only for the experts its rows chose.
__device__ __forceinline__ int group_of(const int* __restrict__ active) {
    return active ? active[blockIdx.y] : (int)blockIdx.y;
}

template <typename T> struct Packs { static const int N = 8; };   // 16-bit weights: 1 KB a row chunk
template <> struct Packs<F32> { static const int N = 4; };

template <typename T>
__device__ __forceinline__ typename T::Pack load_pack(const char* row, long k);
template <>
__device__ __forceinline__ uint4 load_pack<Bf16>(const char* row, long k) {
    return __ldcs((const uint4*)(row + k * 2));
}
template <>
__device__ __forceinline__ uint4 load_pack<F16>(const char* row, long k) {
    return __ldcs((const uint4*)(row + k * 2));
}
template <>
__device__ __forceinline__ F32::Pack load_pack<F32>(const char* row, long k) {
    const float4* p = (const float4*)(row + k * 4);
    F32::Pack v;
    v.lo = __ldcs(p);
    v.hi = __ldcs(p + 1);
    return v;
}

template <typename T, bool SWIGLU>
__device__ void grouped_matvec_impl(const char* __restrict__ W, long matrix_stride,
                                    const int* __restrict__ active,
                                    const int* __restrict__ offsets, int count,
                                    const int* __restrict__ src, const float* __restrict__ x,
                                    const float* __restrict__ residual, float* __restrict__ y,
                                    int N, int K, int y_stride, int elem_bytes) {
    __shared__ float acc_s[GROUPED_WARPS][GROUPED_TILE][2];
    let_next_start();
    wait_for_previous();
    const int g = group_of(active), warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    if (g < 0) return;
    const int begin = offsets ? offsets[g] : 0, end = offsets ? offsets[g + 1] : count;
    const int unit = blockIdx.x * GROUPED_WARPS + warp;
    const int row0 = SWIGLU ? unit : 2 * unit, row1 = SWIGLU ? N + unit : 2 * unit + 1;
    if (begin >= end || (SWIGLU ? unit >= N : row0 >= N)) return;
    const bool has1 = SWIGLU || row1 < N;
    const char* w0 = W + g * matrix_stride + (long)row0 * K * elem_bytes;
    const char* w1 = W + g * matrix_stride + (long)(has1 ? row1 : row0) * K * elem_bytes;
    const int P = Packs<T>::N;
    const int chunk = P * WARP * 8;
    // 16-byte packs need rows that start 16-byte aligned (K a multiple of 8); others go element
    // by element.
    const bool packed = K % 8 == 0;
    for (int t0 = begin; t0 < end; t0 += GROUPED_TILE) {
        const int tn = min(GROUPED_TILE, end - t0);
        if (packed) {
            for (int kc = 0; kc < K; kc += chunk) {
                typename T::Pack p0[P], p1[P];
#pragma unroll
                for (int p = 0; p < P; ++p) {
                    const long k = kc + (long)(p * WARP + lane) * 8;
                    if (k < K) {
                        p0[p] = load_pack<T>(w0, k);
                        p1[p] = load_pack<T>(w1, k);
                    }
                }
                for (int t = 0; t < tn; ++t) {
                    const int a = t0 + t;
                    const float* xr = x + (long)(src ? src[a] : a) * K;
                    float s0 = 0.0f, s1 = 0.0f;
#pragma unroll
                    for (int p = 0; p < P; ++p) {
                        const long k = kc + (long)(p * WARP + lane) * 8;
                        if (k < K) {
                            const float4 xa = *(const float4*)(xr + k);
                            const float4 xb = *(const float4*)(xr + k + 4);
                            s0 += T::dot8(p0[p], xa, xb);
                            s1 += T::dot8(p1[p], xa, xb);
                        }
                    }
                    s0 = warp_sum(s0);
                    s1 = warp_sum(s1);
                    if (lane == 0) {
                        acc_s[warp][t][0] = kc == 0 ? s0 : acc_s[warp][t][0] + s0;
                        acc_s[warp][t][1] = kc == 0 ? s1 : acc_s[warp][t][1] + s1;
                    }
                }
            }
        } else {
            const long base0 = (w0 - W - g * matrix_stride) / elem_bytes;
            const long base1 = (w1 - W - g * matrix_stride) / elem_bytes;
            const char* wg = W + g * matrix_stride;
            for (int t = 0; t < tn; ++t) {
                const int a = t0 + t;
                const float* xr = x + (long)(src ? src[a] : a) * K;
                float s0 = 0.0f, s1 = 0.0f;
                for (int k = lane; k < K; k += WARP) {
                    s0 = fmaf(T::one(wg, base0 + k), xr[k], s0);
                    s1 = fmaf(T::one(wg, base1 + k), xr[k], s1);
                }
                s0 = warp_sum(s0);
                s1 = warp_sum(s1);
                if (lane == 0) {
                    acc_s[warp][t][0] = s0;
                    acc_s[warp][t][1] = s1;
                }
            }
        }
        __syncwarp();
        for (int t = lane; t < tn; t += WARP) {
            const long a = t0 + t;
            const float v0 = acc_s[warp][t][0], v1 = acc_s[warp][t][1];
            if (SWIGLU) {
                y[a * y_stride + unit] = v0 / (1.0f + expf(-v0)) * v1;
            } else {
                y[a * y_stride + row0] = v0 + (residual ? residual[a * y_stride + row0] : 0.0f);
                if (has1)
                    y[a * y_stride + row1] = v1 + (residual ? residual[a * y_stride + row1] : 0.0f);
            }
        }
        __syncwarp();
    }
}

#define GROUPED_ENTRY(NAME, T, SWIGLU)                                                          \
    extern "C" __global__ void __launch_bounds__(GROUPED_WARPS * WARP) NAME(                    \
        const char* __restrict__ W, long matrix_stride, const int* __restrict__ active,        \
        const int* __restrict__ offsets, int count, const int* __restrict__ src,               \
        const float* __restrict__ x, const float* __restrict__ residual, float* __restrict__ y, \
        int N, int K, int y_stride) {                                                          \
        /* a pack is 8 weights: PACK_BYTES / 8 bytes each */                                   \
        grouped_matvec_impl<T, SWIGLU>(W, matrix_stride, active, offsets, count, src, x,       \
                                       residual, y, N, K, y_stride, T::PACK_BYTES / 8);        \
    }
GROUPED_ENTRY(grouped_bf16, Bf16, false)
GROUPED_ENTRY(grouped_f16, F16, false)
GROUPED_ENTRY(grouped_f32, F32, false)
GROUPED_ENTRY(grouped_glu_bf16, Bf16, true)
GROUPED_ENTRY(grouped_glu_f16, F16, true)
GROUPED_ENTRY(grouped_glu_f32, F32, true)

// ---- grouped products on the tensor cores (16-bit weights, sm_80 and later) ----
//
// The contract of grouped_matvec_impl (K a multiple of 8), computed with mma.m16n8k16: a warp owns
// 16 weight rows (plain: rows 16u .. 16u + 15; SWIGLU: gate rows 8u .. 8u + 7 and the same up
// rows, so that a lane ends up holding a gate value and its up value) and multiplies them with the
// group's assignments 8 at a time, accumulating in f32. Each x element enters as two 16-bit values,
// hi = round(x) and lo = round(x - hi), against the same (exact) weights, so the products keep
// about 16 bits of x as the f32 kernels do (one rounding keeps 8 for bf16). The CUDA-core kernel
// above spends a warp reduction per row and assignment; here the arithmetic of a whole tile of
// assignments is a few instructions, so large batches stay bound by the weights' bytes.
//
// Which k an mma slot holds is free as long as both operands agree: lane (g = lane / 4,
// t = lane % 4) loads weights k = 8t .. 8t + 7 of a 32-wide step for its rows g and g + 8, and x
// values k = 8t .. 8t + 7 of assignment g, and feeds k = 8t .. 8t + 3 to one mma and
// 8t + 4 .. 8t + 7 to a second, in the pairs its fragment layout gives it. Every load is 16 bytes,
// and a quad of lanes reads 64 contiguous bytes of a row.
//
// TILES (4 or 8 tiles of 8 assignments per pass over the weights) is fixed per launch from the
// step's rows, so the loops have no branches: each k chunk's weight and x loads are all in flight
// before its first mma. The host gives these kernels steps of many rows only: with few, the
// products are bound by the weights' bytes, which the CUDA-core kernel above streams faster.
#define MMA_WARPS 4
#define MMA_KSTEPS 2  // 32-wide k steps per chunk

template <bool BF16>
__device__ __forceinline__ void mma_16816(float (&c)[4], u32 a0, u32 a1, u32 a2, u32 a3, u32 b0,
                                          u32 b1) {
#if __CUDA_ARCH__ >= 800
    if (BF16) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
            "{%8,%9}, {%0,%1,%2,%3};"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
    } else {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
            "{%8,%9}, {%0,%1,%2,%3};"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
    }
#else
    __trap();  // the host picks these kernels only on sm_80 and later
#endif
}

// Two f32 values as a pair of 16-bit values (the first in the low half), rounded (hi) and the
// rounding's remainder rounded (lo).
template <bool BF16>
__device__ __forceinline__ void split_pair(float a, float b, u32& hi, u32& lo) {
    const u16 ha = f32_to_16(a, BF16), hb = f32_to_16(b, BF16);
    hi = (u32)ha | ((u32)hb << 16);
    const u16 la = f32_to_16(a - f16_to_f32(ha, BF16), BF16);
    const u16 lb = f32_to_16(b - f16_to_f32(hb, BF16), BF16);
    lo = (u32)la | ((u32)lb << 16);
}

template <bool BF16, bool SWIGLU, int TILES>
__device__ void grouped_mma_impl(const char* __restrict__ W, long matrix_stride,
                                 const int* __restrict__ active, const int* __restrict__ offsets,
                                 int count, const int* __restrict__ src,
                                 const float* __restrict__ x, const float* __restrict__ residual,
                                 float* __restrict__ y, int N, int K, int y_stride) {
    constexpr int KSTEPS = MMA_KSTEPS;
    let_next_start();
    wait_for_previous();
    const int g = group_of(active), warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    if (g < 0) return;
    const int begin = offsets ? offsets[g] : 0, end = offsets ? offsets[g + 1] : count;
    const int unit = blockIdx.x * MMA_WARPS + warp;
    const int lg = lane >> 2, lt = lane & 3;
    // This lane's two weight rows (the mma's rows lg and lg + 8) and whether they exist.
    const int first = SWIGLU ? 8 * unit : 16 * unit;
    if (begin >= end || first >= N) return;
    const int row_a = first + lg;
    const int row_b = SWIGLU ? N + first + lg : first + lg + 8;
    const bool has_a = row_a < N, has_b = SWIGLU ? has_a : row_b < N;
    const char* wm = W + g * matrix_stride;
    const uint4* wa = (const uint4*)(wm + (long)(has_a ? row_a : 0) * K * 2);
    const uint4* wb = (const uint4*)(wm + (long)(has_b ? row_b : 0) * K * 2);
    const uint4 zero4 = make_uint4(0, 0, 0, 0);
    const float4 zerof = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    for (int t0 = begin; t0 < end; t0 += 8 * TILES) {
        const float* xr[TILES];
#pragma unroll
        for (int j = 0; j < TILES; ++j) {
            const int a = t0 + 8 * j + lg;
            xr[j] = a < end ? x + (long)(src ? src[a] : a) * K : nullptr;
        }
        float c[TILES][4];
#pragma unroll
        for (int j = 0; j < TILES; ++j) c[j][0] = c[j][1] = c[j][2] = c[j][3] = 0.0f;
        for (int kc = 0; kc < K; kc += 32 * KSTEPS) {
            uint4 pa[KSTEPS], pb[KSTEPS];
            float4 xa[KSTEPS][TILES], xb[KSTEPS][TILES];
#pragma unroll
            for (int s = 0; s < KSTEPS; ++s) {
                const int k = kc + 32 * s + 8 * lt;
                pa[s] = has_a && k < K ? __ldcs(wa + k / 8) : zero4;
                pb[s] = has_b && k < K ? __ldcs(wb + k / 8) : zero4;
#pragma unroll
                for (int j = 0; j < TILES; ++j) {
                    const bool ok = xr[j] && k < K;
                    xa[s][j] = ok ? *(const float4*)(xr[j] + k) : zerof;
                    xb[s][j] = ok ? *(const float4*)(xr[j] + k + 4) : zerof;
                }
            }
#pragma unroll
            for (int s = 0; s < KSTEPS; ++s) {
#pragma unroll
                for (int j = 0; j < TILES; ++j) {
                    u32 h0, l0, h1, l1, h2, l2, h3, l3;
                    split_pair<BF16>(xa[s][j].x, xa[s][j].y, h0, l0);
                    split_pair<BF16>(xa[s][j].z, xa[s][j].w, h1, l1);
                    split_pair<BF16>(xb[s][j].x, xb[s][j].y, h2, l2);
                    split_pair<BF16>(xb[s][j].z, xb[s][j].w, h3, l3);
                    mma_16816<BF16>(c[j], pa[s].x, pb[s].x, pa[s].y, pb[s].y, h0, h1);
                    mma_16816<BF16>(c[j], pa[s].x, pb[s].x, pa[s].y, pb[s].y, l0, l1);
                    mma_16816<BF16>(c[j], pa[s].z, pb[s].z, pa[s].w, pb[s].w, h2, h3);
                    mma_16816<BF16>(c[j], pa[s].z, pb[s].z, pa[s].w, pb[s].w, l2, l3);
                }
            }
        }
        // c[j]: rows (lg, lg + 8) of the 16 by assignments (2 lt, 2 lt + 1) of tile j.
#pragma unroll
        for (int j = 0; j < TILES; ++j) {
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const long a = t0 + 8 * j + 2 * lt + e;
                if (a >= end) continue;
                if (SWIGLU) {
                    if (has_a) {
                        const float gate = c[j][e], up = c[j][2 + e];
                        y[a * y_stride + row_a] = gate / (1.0f + expf(-gate)) * up;
                    }
                } else {
                    if (has_a)
                        y[a * y_stride + row_a] =
                            c[j][e] + (residual ? residual[a * y_stride + row_a] : 0.0f);
                    if (has_b)
                        y[a * y_stride + row_b] =
                            c[j][2 + e] + (residual ? residual[a * y_stride + row_b] : 0.0f);
                }
            }
        }
    }
}

#define GROUPED_MMA_ENTRY(NAME, BF16, SWIGLU, TILES)                                            \
    extern "C" __global__ void __launch_bounds__(MMA_WARPS * WARP) NAME(                        \
        const char* __restrict__ W, long matrix_stride, const int* __restrict__ active,        \
        const int* __restrict__ offsets, int count, const int* __restrict__ src,               \
        const float* __restrict__ x, const float* __restrict__ residual, float* __restrict__ y, \
        int N, int K, int y_stride) {                                                          \
        grouped_mma_impl<BF16, SWIGLU, TILES>(W, matrix_stride, active, offsets, count, src,   \
                                              x, residual, y, N, K, y_stride);                 \
    }
#define GROUPED_MMA_TILES(TILES)                                                                \
    GROUPED_MMA_ENTRY(grouped_mma_bf16_t##TILES, true, false, TILES)                            \
    GROUPED_MMA_ENTRY(grouped_mma_f16_t##TILES, false, false, TILES)                            \
    GROUPED_MMA_ENTRY(grouped_mma_glu_bf16_t##TILES, true, true, TILES)                         \
    GROUPED_MMA_ENTRY(grouped_mma_glu_f16_t##TILES, false, true, TILES)
GROUPED_MMA_TILES(4)
GROUPED_MMA_TILES(8)

// The chosen experts of a batch grouped by expert, on the device (one block): ids[s] is the local
// expert of slot s = row * k + j (-1 or >= E: not on this rank). Writes offsets[0..=E] (expert e's
// assignments are offsets[e] .. offsets[e + 1], in slot order), src[a] (the row of assignment a),
// slot_row[s] (the assignment of slot s, or -1) and active[0..active_len] (the experts with
// assignments in ascending order, then -1; active_len >= min(E, S) holds them all). Dynamic shared
// memory: (E + 1 + S) ints.
extern "C" __global__ void group_by_expert(const int* __restrict__ ids, int S, int k, int E,
                                           int* __restrict__ offsets, int* __restrict__ src,
                                           int* __restrict__ slot_row, int* __restrict__ active,
                                           int active_len) {
    extern __shared__ int shm[];
    let_next_start();
    wait_for_previous();
    int* start = shm;          // E + 1
    int* id_s = shm + E + 1;   // S
    for (int i = threadIdx.x; i <= E; i += blockDim.x) start[i] = 0;
    for (int s = threadIdx.x; s < S; s += blockDim.x) {
        const int e = ids[s];
        id_s[s] = e >= 0 && e < E ? e : -1;
    }
    __syncthreads();
    for (int s = threadIdx.x; s < S; s += blockDim.x)
        if (id_s[s] >= 0) atomicAdd(&start[id_s[s] + 1], 1);
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int e = 0; e < E; ++e) start[e + 1] += start[e];
        int used = 0;
        for (int e = 0; e < E && used < active_len; ++e)
            if (start[e + 1] > start[e]) active[used++] = e;
        for (; used < active_len; ++used) active[used] = -1;
    }
    __syncthreads();
    for (int i = threadIdx.x; i <= E; i += blockDim.x) offsets[i] = start[i];
    for (int s = threadIdx.x; s < S; s += blockDim.x) {
        const int e = id_s[s];
        if (e < 0) {
            slot_row[s] = -1;
            continue;
        }
        int rank = 0;
        for (int o = 0; o < s; ++o) rank += id_s[o] == e;
        const int a = start[e] + rank;
        slot_row[s] = a;
        src[a] = s / k;
    }
}
