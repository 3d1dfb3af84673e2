// Shardline's CUDA kernels for prefill (many rows at once), compiled at run time with NVRTC as a
// module of their own. The matrix products run in cuBLAS; these kernels do what lies between them,
// row by row, mirroring the decode kernels of kernels.cu (same formulas, same order of operations).
//
// Activations are f32. For bf16/f16 weights the GEMM inputs are an f32 tensor split into two
// 16-bit tensors, hi = round(x) and lo = round(x - hi), so that W.hi + W.lo keeps about 16 bits
// of x (one rounding alone keeps 8 for bf16, which is too few to match an f32 reference).

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
    const int a = blockIdx.x;
    const float* s = src + (long)rows[a] * D;
    float* d = dst + (long)a * D;
    for (int i = threadIdx.x; i < D; i += blockDim.x) d[i] = s[i];
}


// Causal attention of row r (grid.y) over cache positions 0..=pos0 + r, grouped-query heads, one
// block per (query head, row). q is read from the rotated qkv rows ([rows][q | k | v]); out is
// [rows][H*D]. Each warp keeps an online softmax over every PREFILL_ATTN_WARPS-th position; the
// warps are combined at the end. Lane l holds elements l, l+32, ... of a head: D <= 256.
#define PREFILL_ATTN_WARPS 8
#define ATTN_MAX_PER_LANE 8
extern "C" __global__ void __launch_bounds__(PREFILL_ATTN_WARPS * WARP)
    attention_rows(const float* __restrict__ qkv, const float* __restrict__ k_cache,
                   const float* __restrict__ v_cache, int pos0, float* __restrict__ out, int H,
                   int KVH, int D, int capacity, float scale) {
    __shared__ float m_s[PREFILL_ATTN_WARPS], l_s[PREFILL_ATTN_WARPS];
    __shared__ float acc_s[PREFILL_ATTN_WARPS][WARP * ATTN_MAX_PER_LANE];
    const int h = blockIdx.x, r = blockIdx.y, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int kvh = h / (H / KVH);
    const int len = pos0 + r + 1;
    const float* q = qkv + (long)r * (H + 2 * KVH) * D + (long)h * D;
    const float* kb = k_cache + (long)kvh * capacity * D;
    const float* vb = v_cache + (long)kvh * capacity * D;
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
#pragma unroll
        for (int j = 0; j < ATTN_MAX_PER_LANE; ++j) {
            const int d = lane + WARP * j;
            kr[j] = d < D ? kb[(long)p * D + d] : 0.0f;
            vr[j] = d < D ? vb[(long)p * D + d] : 0.0f;
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
// slot order, plus sigmoid(shared_logit[r]) * shared[r][n] when a shared expert is given.
extern "C" __global__ void combine_rows(const float* __restrict__ expert_out,
                                        const int* __restrict__ slot_row,
                                        const float* __restrict__ weights, int k,
                                        const float* __restrict__ shared,
                                        const float* __restrict__ shared_logit,
                                        float* __restrict__ y, int N) {
    const int r = blockIdx.x;
    for (int n = threadIdx.x; n < N; n += blockDim.x) {
        float acc = 0.0f;
        for (int j = 0; j < k; ++j) {
            const int a = slot_row[(long)r * k + j];
            const float part = a >= 0 ? expert_out[(long)a * N + n] : 0.0f;
            acc = fmaf(weights[(long)r * k + j], part, acc);
        }
        if (shared) acc += shared[(long)r * N + n] / (1.0f + expf(-shared_logit[r]));
        y[(long)r * N + n] = acc;
    }
}
