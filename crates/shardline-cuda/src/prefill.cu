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
                                    const int* __restrict__ offsets, int count,
                                    const int* __restrict__ src, const float* __restrict__ x,
                                    const float* __restrict__ residual, float* __restrict__ y,
                                    int N, int K, int y_stride, int elem_bytes) {
    __shared__ float acc_s[GROUPED_WARPS][GROUPED_TILE][2];
    let_next_start();
    wait_for_previous();
    const int g = blockIdx.y, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
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
        const char* __restrict__ W, long matrix_stride, const int* __restrict__ offsets,       \
        int count, const int* __restrict__ src, const float* __restrict__ x,                   \
        const float* __restrict__ residual, float* __restrict__ y, int N, int K, int y_stride) { \
        /* a pack is 8 weights: PACK_BYTES / 8 bytes each */                                   \
        grouped_matvec_impl<T, SWIGLU>(W, matrix_stride, offsets, count, src, x, residual, y,  \
                                       N, K, y_stride, T::PACK_BYTES / 8);                     \
    }
GROUPED_ENTRY(grouped_bf16, Bf16, false)
GROUPED_ENTRY(grouped_f16, F16, false)
GROUPED_ENTRY(grouped_f32, F32, false)
GROUPED_ENTRY(grouped_glu_bf16, Bf16, true)
GROUPED_ENTRY(grouped_glu_f16, F16, true)
GROUPED_ENTRY(grouped_glu_f32, F32, true)

// The chosen experts of a batch grouped by expert, on the device (one block): ids[s] is the local
// expert of slot s = row * k + j (-1 or >= E: not on this rank). Writes offsets[0..=E] (expert e's
// assignments are offsets[e] .. offsets[e + 1], in slot order), src[a] (the row of assignment a)
// and slot_row[s] (the assignment of slot s, or -1). Dynamic shared memory: (E + 1 + S) ints.
extern "C" __global__ void group_by_expert(const int* __restrict__ ids, int S, int k, int E,
                                           int* __restrict__ offsets, int* __restrict__ src,
                                           int* __restrict__ slot_row) {
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
    if (threadIdx.x == 0)
        for (int e = 0; e < E; ++e) start[e + 1] += start[e];
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
