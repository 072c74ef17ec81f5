// Multi-head self-attention over a packed [rows, 3 * E] q|k|v buffer, twin of cpu/attention.rs.
// The four O(S^2 * D) products (scores, values, and the backward's dP, dq, dk, dv) run on
// cuBLASLt (backend.rs, `attention_forward` / `attention_backward`); the kernels here are the
// softmax, its backward and dropout between them.
//
// `att[batch, heads, seq, seq]` holds the softmax probabilities; an attention row is the pair
// (bh, i) = (batch * heads + head, query), and att row `bh * seq + i` starts at
// `(bh * seq + i) * seq`, which is also the dropout stream index of its element 0.

// att[b, h, i, :] = softmax_j(att[b, h, i, j] / sqrt(D)) in place, where att holds the raw
// scores q_i . k_j, with masked keys (causal j > i, or key_padding[b, j] != 0; key_padding may
// be null) at -inf; a row whose keys are all masked is all zeros, as on the CPU. One block per
// attention row.
extern "C" __global__ void attention_softmax(float* att, const float* key_padding, u64 batch, u64 seq,
                                             u64 heads, u64 hd, int causal) {
    const float scale = 1.0f / sqrtf((float)hd);
    FOR_ROW(row, batch * heads * seq) {
        const u64 i = row % seq, b = row / seq / heads;
        float* p = att + row * seq;
        float mx = neg_inf();
        FOR_THREAD(j, seq) {
            const bool masked = (causal && j > i) || (key_padding && key_padding[b * seq + j] != 0.0f);
            const float x = masked ? neg_inf() : p[j] * scale;
            p[j] = x;
            mx = fmaxf(mx, x);
        }
        mx = block_reduce(mx, Max());
        if (mx == neg_inf()) {  // the same for the whole block
            FOR_THREAD(j, seq) p[j] = 0.0f;
            continue;
        }
        float sum = 0.0f;
        FOR_THREAD(j, seq) {
            const float e = expf(p[j] - mx);
            p[j] = e;
            sum += e;
        }
        const float inv = 1.0f / block_reduce(sum, Sum());
        FOR_THREAD(j, seq) p[j] *= inv;
    }
}

// dropped[i] = att[start + i] * (multiplier of element start + i of the dropout stream), i < n:
// dropout(att) of one batch element's heads, for the products that read it.
extern "C" __global__ void attention_dropout(float* dropped, const float* att, u64 n, u64 start,
                                             DROPOUT_PARAMS) {
    const Dropout d = DROPOUT_ARGS;
    FOR_EACH(i, n) dropped[i] = att[start + i] * dropout_mul(d, start + i);
}

// The softmax backward of batch element b, in place on its heads' dP = dout @ v^T
// ([heads, seq, seq], as cuBLASLt left it):  dP *= dropout multipliers;
// dS = att * (dP - rowsum(att * dP)) / sqrt(D). Past the keys a causal row sees, dS is 0 (the CPU
// never computes dP there). One block per attention row of b.
extern "C" __global__ void attention_softmax_backward(float* ds, const float* att, u64 b, u64 seq,
                                                      u64 heads, u64 hd, int causal,
                                                      DROPOUT_PARAMS) {
    const Dropout d = DROPOUT_ARGS;
    const float scale = 1.0f / sqrtf((float)hd);
    FOR_ROW(r, heads * seq) {
        const u64 i = r % seq, row = b * heads * seq + r;
        const float* p = att + row * seq;
        float* x = ds + r * seq;
        float part = 0.0f;
        FOR_THREAD(j, seq) {
            const float v = (causal && j > i) ? 0.0f : x[j] * dropout_mul(d, row * seq + j);
            x[j] = v;
            part += p[j] * v;
        }
        // Each thread reads back only the elements it wrote above.
        const float rowsum = block_reduce(part, Sum());
        FOR_THREAD(j, seq) x[j] = p[j] * (x[j] - rowsum) * scale;
    }
}

__device__ __forceinline__ float dot(const float* a, const float* b, u64 n) {
    float s = 0.0f;
    for (u64 d = 0; d < n; ++d) s += a[d] * b[d];
    return s;
}

// One decoding step with a KV cache, for one sequence; one block per head h:
// k_cache[pos] = k;  v_cache[pos] = v (this head's columns);
// out[h*D..] = softmax_j(q . k_j / sqrt(D), j <= pos) @ v_j.  Shared memory: pos + 1 floats.
extern "C" __global__ void attention_decode(float* out, const float* qkv, float* k_cache,
                                            float* v_cache, u64 pos, u64 heads, u64 hd) {
    extern __shared__ float shared_row[];
    const u64 e = heads * hd, n = pos + 1;
    const float scale = 1.0f / sqrtf((float)hd);
    FOR_ROW(h, heads) {
        __syncthreads();  // the previous head's readers of shared_row are done
        FOR_THREAD(c, hd) {
            k_cache[pos * e + h * hd + c] = qkv[e + h * hd + c];
            v_cache[pos * e + h * hd + c] = qkv[2 * e + h * hd + c];
        }
        __syncthreads();  // row pos of the caches is written before it is read below
        float mx = neg_inf();
        FOR_THREAD(j, n) {
            const float x = dot(qkv + h * hd, k_cache + j * e + h * hd, hd) * scale;
            shared_row[j] = x;
            mx = fmaxf(mx, x);
        }
        mx = block_reduce(mx, Max());
        float sum = 0.0f;
        FOR_THREAD(j, n) {
            const float w = expf(shared_row[j] - mx);
            shared_row[j] = w;
            sum += w;
        }
        const float inv = 1.0f / block_reduce(sum, Sum());
        __syncthreads();
        FOR_THREAD(c, hd) {
            float acc = 0.0f;
            for (u64 j = 0; j < n; ++j) acc += shared_row[j] * inv * v_cache[j * e + h * hd + c];
            out[h * hd + c] = acc;
        }
    }
}
