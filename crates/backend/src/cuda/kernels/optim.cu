// torch.optim.AdamW over a flat buffer, twin of cpu/adamw.rs; the host computes the constants
// exactly as the CPU does (bias corrections in f64, then f32).

// m = b1 m + (1-b1) g (as m += (1-b1)(g - m));  v = b2 v + (1-b2) g^2;
// p = p * decay - step_size * m / (sqrt(v) / bc2_sqrt + eps).
// With `mirror` (may be null), param is [mirror_rows, mirror_cols] and the updated values are
// also written transposed: mirror[cols, rows] = p^T.
extern "C" __global__ void adamw(float* param, const float* grad, float* m, float* v, u64 n,
                                 float beta1, float beta2, float eps, float bc2_sqrt,
                                 float step_size, float decay, float* mirror, u64 mirror_rows,
                                 u64 mirror_cols) {
    FOR_EACH(i, n) {
        const float g = grad[i];
        float mi = m[i];
        mi += (1.0f - beta1) * (g - mi);
        const float vi = beta2 * v[i] + (1.0f - beta2) * g * g;
        const float denom = sqrtf(vi) / bc2_sqrt + eps;
        const float p = param[i] * decay - step_size * mi / denom;
        m[i] = mi;
        v[i] = vi;
        param[i] = p;
        if (mirror) mirror[(i % mirror_cols) * mirror_rows + i / mirror_cols] = p;
    }
}
