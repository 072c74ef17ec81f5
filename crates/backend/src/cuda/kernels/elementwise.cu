// Elementwise kernels and the small pieces of the matmul (bias, transpose, bias gradient).
// Twins of cpu/mod.rs (fill, scale), cpu/matmul.rs, cpu/activation.rs and cpu/residual.rs.

// x[n] = value
extern "C" __global__ void fill(float* x, u64 n, float value) {
    FOR_EACH(i, n) x[i] = value;
}

// x[n] *= s
extern "C" __global__ void scale(float* x, u64 n, float s) {
    FOR_EACH(i, n) x[i] *= s;
}

// out[rows, n] = bias[n] on every row (the matmul then accumulates onto it, as the CPU does)
extern "C" __global__ void bias_rows(float* out, const float* bias, u64 rows, u64 n) {
    FOR_EACH(i, rows * n) out[i] = bias[i % n];
}

// out[cols, rows] = inp[rows, cols]^T
extern "C" __global__ void transpose(float* out, const float* inp, u64 rows, u64 cols) {
    FOR_EACH(o, rows * cols) {
        const u64 c = o / rows, r = o % rows;
        out[o] = inp[r * cols + c];
    }
}

// dst[r * dst_ld + c] = src[r * src_ld + c] for r < rows, c < cols: a matrix copied between row
// strides (backend.rs pads the rows of large products to 16-byte alignment). One block per row.
extern "C" __global__ void copy_rows(float* dst, const float* src, u64 rows, u64 cols, u64 dst_ld,
                                     u64 src_ld) {
    FOR_ROW(r, rows) FOR_THREAD(c, cols) dst[r * dst_ld + c] = src[r * src_ld + c];
}

// dst[r * dst_ld + c] = bf16(src[r * src_ld + c]) for r < rows, c < cols: a product's operand
// rounded to bf16 (nearest, ties to even) for the matrix units. One block per row.
extern "C" __global__ void to_bf16(unsigned short* dst, const float* src, u64 rows, u64 cols, u64 dst_ld,
                                   u64 src_ld) {
    FOR_ROW(r, rows) FOR_THREAD(c, cols) dst[r * dst_ld + c] = (unsigned short)bf16_bits(src[r * src_ld + c]);
}

// partials[chunk, cols] = sum over the chunk's rows of dout[rows, n] (see COLUMN_PARAMS): the
// first level of the bias gradient dbias[n] += sum over rows of dout.
extern "C" __global__ void column_sum_partials(float* partials, const float* dout, COLUMN_PARAMS) {
    for_column_items(rows, cols, chunk_rows, [&](const ColumnItem& it) {
        float acc = 0.0f;
        if (it.active)
            for (u64 r = it.r0; r < it.r1; r += blockDim.x / 32) acc += dout[r * n + col0 + it.j];
        const float s = column_warps_sum(acc);
        if (threadIdx.x < 32 && it.active) partials[it.chunk * cols + it.j] = s;
    });
}

// out[cols] (+)= sum over chunks, in chunk order, of partials[chunks, cols]: the second level of
// a column reduction.
extern "C" __global__ void add_column_partials(float* out, const float* partials, u64 chunks,
                                               u64 cols, int accumulate) {
    FOR_EACH(j, cols) {
        float s = 0.0f;
        for (u64 c = 0; c < chunks; ++c) s += partials[c * cols + j];
        out[j] = accumulate ? out[j] + s : s;
    }
}

// ---- Activations: `act` is 0 = ReLU, 1 = GELU (erf), 2 = GELU (tanh), as in backend.rs.

#define SQRT_2_OVER_PI 0.7978846f
#define FRAC_1_SQRT_2 0.70710678118654752f
#define FRAC_2_SQRT_PI 1.12837916709551257f

// tanh(u) = 1 - 2 / (e^{2u} + 1), the formula of the CPU kernel (which evaluates e^x with a
// polynomial; expf is within a few ulp of it).
__device__ __forceinline__ float tanh_as_cpu(float u) { return 1.0f - 2.0f / (expf(2.0f * u) + 1.0f); }

__device__ float activate(int act, float x) {
    switch (act) {
        case 0: return fmaxf(x, 0.0f);
        case 1: return 0.5f * x * (1.0f + erff(x * FRAC_1_SQRT_2));
        default: {
            const float u = SQRT_2_OVER_PI * (x + 0.044715f * x * x * x);
            return 0.5f * x * (1.0f + tanh_as_cpu(u));
        }
    }
}

__device__ float activate_grad(int act, float x) {
    switch (act) {
        case 0: return x > 0.0f ? 1.0f : 0.0f;
        case 1: {
            const float cdf = 0.5f * (1.0f + erff(x * FRAC_1_SQRT_2));
            const float pdf = expf(-0.5f * x * x) * (FRAC_1_SQRT_2 * FRAC_2_SQRT_PI * 0.5f);
            return cdf + x * pdf;
        }
        default: {
            const float u = SQRT_2_OVER_PI * (x + 0.044715f * x * x * x);
            const float t = tanh_as_cpu(u);
            const float du = SQRT_2_OVER_PI * (1.0f + 3.0f * 0.044715f * x * x);
            return 0.5f * (1.0f + t) + 0.5f * x * (1.0f - t * t) * du;
        }
    }
}

// out[n] = dropout(act(inp)); dropout element i is element i
extern "C" __global__ void activation_forward(float* out, const float* inp, u64 n, int act,
                                              DROPOUT_PARAMS) {
    const Dropout d = DROPOUT_ARGS;
    FOR_EACH(i, n) out[i] = activate(act, inp[i]) * dropout_mul(d, i);
}

// dinp[n] = act'(inp) * dout * mask
extern "C" __global__ void activation_backward(float* dinp, const float* dout, const float* inp,
                                               u64 n, int act, DROPOUT_PARAMS) {
    const Dropout d = DROPOUT_ARGS;
    FOR_EACH(i, n) dinp[i] = activate_grad(act, inp[i]) * dout[i] * dropout_mul(d, i);
}

// ---- Residual connection

// out[n] = resid + dropout(inp)
extern "C" __global__ void residual_forward(float* out, const float* resid, const float* inp,
                                            u64 n, DROPOUT_PARAMS) {
    const Dropout d = DROPOUT_ARGS;
    FOR_EACH(i, n) out[i] = resid[i] + inp[i] * dropout_mul(d, i);
}

// dresid[n] = dout;  dinp[n] = dropout(dout)
extern "C" __global__ void residual_backward(float* dresid, float* dinp, const float* dout, u64 n,
                                             DROPOUT_PARAMS) {
    const Dropout d = DROPOUT_ARGS;
    FOR_EACH(i, n) {
        const float g = dout[i];
        dresid[i] = g;
        dinp[i] = g * dropout_mul(d, i);
    }
}
