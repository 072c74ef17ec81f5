// Multi-head self-attention over a packed [rows, 3 * E] q|k|v buffer, twin of cpu/attention.rs.
// `att[batch, heads, seq, seq]` holds the softmax probabilities; an attention row is the pair
// (bh, i) = (batch * heads + head, query), and att row `bh * seq + i` starts at
// `(bh * seq + i) * seq`, which is also the dropout stream index of its element 0.
//
// Kernels that hold a row of seq values in shared memory take it as dynamic shared memory of
// seq floats (the host checks that it fits).

struct Attn {
    u64 batch, seq, heads, hd;
    int batch_first, causal;

    __device__ u64 width() const { return heads * hd; }
    // Offset of head h of part (0 = q, 1 = k, 2 = v) of token t of sequence b in qkv.
    __device__ u64 qkv_at(u64 b, u64 t, u64 part, u64 h) const {
        return token_row(b, t, batch, seq, batch_first) * 3 * width() + part * width() + h * hd;
    }
    // Offset of head h of token t of sequence b in a [rows, E] buffer (out, dout).
    __device__ u64 out_at(u64 b, u64 t, u64 h) const {
        return token_row(b, t, batch, seq, batch_first) * width() + h * hd;
    }
};

#define ATTN_PARAMS u64 batch, u64 seq, u64 heads, u64 hd, int batch_first, int causal
#define ATTN_ARGS (Attn{batch, seq, heads, hd, batch_first, causal})

__device__ __forceinline__ float dot(const float* a, const float* b, u64 n) {
    float s = 0.0f;
    for (u64 d = 0; d < n; ++d) s += a[d] * b[d];
    return s;
}

// att[b, h, i, :] = softmax_j(q_i . k_j / sqrt(D)) with masked keys (causal j > i, or
// key_padding[b, j] != 0; key_padding may be null) at -inf; a row whose keys are all masked is
// all zeros, as on the CPU. One block per attention row.
extern "C" __global__ void attention_scores(float* att, const float* qkv, const float* key_padding,
                                            ATTN_PARAMS) {
    const Attn s = ATTN_ARGS;
    const float scale = 1.0f / sqrtf((float)s.hd);
    FOR_ROW(row, s.batch * s.heads * s.seq) {
        const u64 bh = row / s.seq, i = row % s.seq, b = bh / s.heads, h = bh % s.heads;
        const float* q = qkv + s.qkv_at(b, i, 0, h);
        float* p = att + row * s.seq;
        float mx = neg_inf();
        FOR_THREAD(j, s.seq) {
            const bool masked = (s.causal && j > i) || (key_padding && key_padding[b * s.seq + j] != 0.0f);
            const float x = masked ? neg_inf() : dot(q, qkv + s.qkv_at(b, j, 1, h), s.hd) * scale;
            p[j] = x;
            mx = fmaxf(mx, x);
        }
        mx = block_reduce(mx, Max());
        if (mx == neg_inf()) {  // the same for the whole block
            FOR_THREAD(j, s.seq) p[j] = 0.0f;
            continue;
        }
        float sum = 0.0f;
        FOR_THREAD(j, s.seq) {
            const float e = expf(p[j] - mx);
            p[j] = e;
            sum += e;
        }
        const float inv = 1.0f / block_reduce(sum, Sum());
        FOR_THREAD(j, s.seq) p[j] *= inv;
    }
}

// out[row(b, i), h*D..(h+1)*D] = dropout(att[b, h, i, :]) @ v. One block per attention row: the
// dropped probabilities go to shared memory, then each thread sums over keys for its columns.
extern "C" __global__ void attention_values(float* out, const float* att, const float* qkv,
                                            ATTN_PARAMS, DROPOUT_PARAMS) {
    extern __shared__ float shared_row[];
    const Attn s = ATTN_ARGS;
    const Dropout d = DROPOUT_ARGS;
    FOR_ROW(row, s.batch * s.heads * s.seq) {
        const u64 bh = row / s.seq, i = row % s.seq, b = bh / s.heads, h = bh % s.heads;
        __syncthreads();  // the previous row's readers of shared_row are done
        FOR_THREAD(j, s.seq) shared_row[j] = att[row * s.seq + j] * dropout_mul(d, row * s.seq + j);
        __syncthreads();
        FOR_THREAD(c, s.hd) {
            float acc = 0.0f;
            for (u64 j = 0; j < s.seq; ++j) acc += shared_row[j] * qkv[s.qkv_at(b, j, 2, h) + c];
            out[s.out_at(b, i, h) + c] = acc;
        }
    }
}

// The backward, as on the CPU:  dP = dropout(dout @ v^T);  dS = att * (dP - rowsum(att * dP)) / sqrt(D);
// dq = dS @ k;  dk = dS^T @ q;  dv = dropout(att)^T @ dout.  Three kernels, each writing one part
// of dqkv (all of it, `=`), in this order:
//   1. attention_backward_query, per query row i: dS row i in shared memory, then dq_i. It also
//      stores rowsum_i = sum_j att * dP in dqkv at column 0 of head h of the v part of token i,
//      which kernel 3 overwrites later: the row sums need no scratch buffer.
//   2. attention_backward_key, per key j: column j of dS (recomputing dP from dout and v, and
//      reading rowsum_i from where kernel 1 left it), then dk_j.
//   3. attention_backward_value, per key j: column j of dropout(att), then dv_j.

__device__ __forceinline__ u64 rowsum_at(const Attn& s, u64 b, u64 i, u64 h) { return s.qkv_at(b, i, 2, h); }

// dP[i, j] = (dout_i . v_j) * mask(i, j): element (bh, i, j) of the probabilities' dropout stream.
__device__ __forceinline__ float dp_at(const Attn& s, const Dropout& d, const float* dout,
                                       const float* qkv, u64 bh, u64 i, u64 j) {
    const u64 b = bh / s.heads, h = bh % s.heads;
    const float x = dot(dout + s.out_at(b, i, h), qkv + s.qkv_at(b, j, 2, h), s.hd);
    return x * dropout_mul(d, (bh * s.seq + i) * s.seq + j);
}

extern "C" __global__ void attention_backward_query(float* dqkv, const float* dout, const float* qkv,
                                                    const float* att, ATTN_PARAMS, DROPOUT_PARAMS) {
    extern __shared__ float shared_row[];
    const Attn s = ATTN_ARGS;
    const Dropout d = DROPOUT_ARGS;
    const float scale = 1.0f / sqrtf((float)s.hd);
    FOR_ROW(row, s.batch * s.heads * s.seq) {
        const u64 bh = row / s.seq, i = row % s.seq, b = bh / s.heads, h = bh % s.heads;
        const float* p = att + row * s.seq;
        __syncthreads();  // the previous row's readers of shared_row are done
        float part = 0.0f;
        FOR_THREAD(j, s.seq) {
            const float x = dp_at(s, d, dout, qkv, bh, i, j);
            shared_row[j] = x;
            part += p[j] * x;
        }
        const float rowsum = block_reduce(part, Sum());
        FOR_THREAD(j, s.seq) shared_row[j] = p[j] * (shared_row[j] - rowsum) * scale;
        __syncthreads();
        FOR_THREAD(c, s.hd) {
            float acc = 0.0f;
            for (u64 j = 0; j < s.seq; ++j) acc += shared_row[j] * qkv[s.qkv_at(b, j, 1, h) + c];
            dqkv[s.qkv_at(b, i, 0, h) + c] = acc;
        }
        if (threadIdx.x == 0) dqkv[rowsum_at(s, b, i, h)] = rowsum;
    }
}

extern "C" __global__ void attention_backward_key(float* dqkv, const float* dout, const float* qkv,
                                                  const float* att, ATTN_PARAMS, DROPOUT_PARAMS) {
    extern __shared__ float shared_row[];
    const Attn s = ATTN_ARGS;
    const Dropout d = DROPOUT_ARGS;
    const float scale = 1.0f / sqrtf((float)s.hd);
    FOR_ROW(col, s.batch * s.heads * s.seq) {
        const u64 bh = col / s.seq, j = col % s.seq, b = bh / s.heads, h = bh % s.heads;
        __syncthreads();  // the previous column's readers of shared_row are done
        FOR_THREAD(i, s.seq) {
            const float p = att[(bh * s.seq + i) * s.seq + j];
            const float rowsum = dqkv[rowsum_at(s, b, i, h)];
            shared_row[i] = p * (dp_at(s, d, dout, qkv, bh, i, j) - rowsum) * scale;
        }
        __syncthreads();
        FOR_THREAD(c, s.hd) {
            float acc = 0.0f;
            for (u64 i = 0; i < s.seq; ++i) acc += shared_row[i] * qkv[s.qkv_at(b, i, 0, h) + c];
            dqkv[s.qkv_at(b, j, 1, h) + c] = acc;
        }
    }
}

extern "C" __global__ void attention_backward_value(float* dqkv, const float* dout, const float* att,
                                                    ATTN_PARAMS, DROPOUT_PARAMS) {
    extern __shared__ float shared_row[];
    const Attn s = ATTN_ARGS;
    const Dropout d = DROPOUT_ARGS;
    FOR_ROW(col, s.batch * s.heads * s.seq) {
        const u64 bh = col / s.seq, j = col % s.seq, b = bh / s.heads, h = bh % s.heads;
        __syncthreads();  // the previous column's readers of shared_row are done
        FOR_THREAD(i, s.seq) {
            const u64 e = (bh * s.seq + i) * s.seq + j;
            shared_row[i] = att[e] * dropout_mul(d, e);
        }
        __syncthreads();
        FOR_THREAD(c, s.hd) {
            float acc = 0.0f;
            for (u64 i = 0; i < s.seq; ++i) acc += shared_row[i] * dout[s.out_at(b, i, h) + c];
            dqkv[s.qkv_at(b, j, 2, h) + c] = acc;
        }
    }
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
