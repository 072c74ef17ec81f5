// nn.LayerNorm over the last dimension, twin of cpu/layernorm.rs.

// out[rows, c] = (inp - mean) * rstd * weight + bias;  mean[rows], rstd[rows] saved.
// One block per row.
extern "C" __global__ void layernorm_forward(float* out, float* mean, float* rstd, const float* inp,
                                             const float* weight, const float* bias, u64 rows,
                                             u64 c, float eps) {
    FOR_ROW(r, rows) {
        const float* x = inp + r * c;
        float s = 0.0f;
        FOR_THREAD(j, c) s += x[j];
        const float mu = block_reduce(s, Sum()) / (float)c;
        float s2 = 0.0f;
        FOR_THREAD(j, c) s2 += (x[j] - mu) * (x[j] - mu);
        const float var = block_reduce(s2, Sum()) / (float)c;
        const float rs = 1.0f / sqrtf(var + eps);
        FOR_THREAD(j, c) out[r * c + j] = (x[j] - mu) * rs * weight[j] + bias[j];
        if (threadIdx.x == 0) {
            mean[r] = mu;
            rstd[r] = rs;
        }
    }
}

// dinp[rows, c] (+)= rstd * (g - mean(g) - xhat * mean(g * xhat)) with g = dout * weight.
// One block per row; `accumulate` is 0 or 1.
extern "C" __global__ void layernorm_backward_input(float* dinp, const float* dout, const float* inp,
                                                    const float* weight, const float* mean,
                                                    const float* rstd, u64 rows, u64 c,
                                                    int accumulate) {
    FOR_ROW(r, rows) {
        const float* x = inp + r * c;
        const float* g = dout + r * c;
        const float mu = mean[r], rs = rstd[r];
        float sum_g = 0.0f, sum_gx = 0.0f;
        FOR_THREAD(j, c) {
            const float gw = g[j] * weight[j];
            sum_g += gw;
            sum_gx += gw * (x[j] - mu) * rs;
        }
        const float mean_g = block_reduce(sum_g, Sum()) / (float)c;
        const float mean_gx = block_reduce(sum_gx, Sum()) / (float)c;
        FOR_THREAD(j, c) {
            const float xhat = (x[j] - mu) * rs;
            const float v = rs * (g[j] * weight[j] - mean_g - xhat * mean_gx);
            dinp[r * c + j] = accumulate ? dinp[r * c + j] + v : v;
        }
    }
}

// partials[chunk, cols] = sum over the chunk's rows of dout * xhat, then partials[chunks + chunk,
// cols] = sum of dout (see COLUMN_PARAMS, n = c): the first level of dweight[c] += sum_rows
// dout * xhat and dbias[c] += sum_rows dout.
extern "C" __global__ void layernorm_backward_params_partials(float* partials, const float* dout,
                                                              const float* inp, const float* mean,
                                                              const float* rstd, COLUMN_PARAMS) {
    const u64 chunks = (rows + chunk_rows - 1) / chunk_rows;
    for_column_items(rows, cols, chunk_rows, [&](const ColumnItem& it) {
        float aw = 0.0f, ab = 0.0f;
        if (it.active)
            for (u64 r = it.r0; r < it.r1; r += blockDim.x / 32) {
                const u64 e = r * n + col0 + it.j;
                const float g = dout[e];
                aw += g * (inp[e] - mean[r]) * rstd[r];
                ab += g;
            }
        const float sw = column_warps_sum(aw), sb = column_warps_sum(ab);
        if (threadIdx.x < 32 && it.active) {
            partials[it.chunk * cols + it.j] = sw;
            partials[(chunks + it.chunk) * cols + it.j] = sb;
        }
    });
}
