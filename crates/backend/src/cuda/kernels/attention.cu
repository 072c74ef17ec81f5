// Multi-head self-attention over a packed [rows, 3 * E] q|k|v buffer, twin of cpu/attention.rs.
// The O(S^2 * D) products (scores, values, and the backward's dP, dq, dk, dv) run on cuBLASLt
// (backend.rs, `attention_forward` / `attention_backward`), batched over every (batch, head)
// pair on per-head copies (heads_split / heads_merge); the kernels here are the softmax, its
// backward and dropout between them.
//
// `att[batch, heads, seq, seq]` holds the softmax probabilities; an attention row is the pair
// (bh, i) = (batch * heads + head, query), and att row `bh * seq + i` starts at
// `(bh * seq + i) * seq`, which is also the dropout stream index of its element 0.

// att[b, h, i, :] = softmax_j(att[b, h, i, j] / sqrt(D)) in place, where att holds the raw
// scores q_i . k_j, with masked keys (causal j > i, or key_padding[b, j] != 0; key_padding may
// be null) at -inf; a row whose keys are all masked is all zeros, as on the CPU. One block per
// attention row. When `cached`, the row is read once, into shared memory (`seq` floats), and
// written once; else (a row too long for shared memory) it is worked on in place. A causal row
// reads only the keys it sees. Each thread only reads back the elements it wrote, so no barrier
// is needed between the passes.
extern "C" __global__ void attention_softmax(float* att, const float* key_padding, u64 batch, u64 seq,
                                             u64 heads, u64 hd, int causal, int cached) {
    extern __shared__ float shared_row[];
    const float scale = 1.0f / sqrtf((float)hd);
    FOR_ROW(row, batch * heads * seq) {
        const u64 i = row % seq, b = row / seq / heads, n = causal ? i + 1 : seq;
        float* p = att + row * seq;
        float* buf = cached ? shared_row : p;
        float mx = neg_inf();
        FOR_THREAD(j, n) {
            const bool masked = key_padding && key_padding[b * seq + j] != 0.0f;
            const float x = masked ? neg_inf() : p[j] * scale;
            buf[j] = x;
            mx = fmaxf(mx, x);
        }
        mx = block_reduce(mx, Max());
        if (mx == neg_inf()) {  // the same for the whole block
            FOR_THREAD(j, seq) p[j] = 0.0f;
            continue;
        }
        float sum = 0.0f;
        FOR_THREAD(j, n) {
            const float e = expf(buf[j] - mx);
            buf[j] = e;
            sum += e;
        }
        const float inv = 1.0f / block_reduce(sum, Sum());
        FOR_THREAD(j, seq) p[j] = j < n ? buf[j] * inv : 0.0f;
    }
}

// dropped[i] = att[start + i] * (multiplier of element start + i of the dropout stream), i < n:
// dropout(att) of a chunk of batch elements, for the products that read it.
extern "C" __global__ void attention_dropout(float* dropped, const float* att, u64 n, u64 start,
                                             DROPOUT_PARAMS) {
    const Dropout d = DROPOUT_ARGS;
    FOR_EACH(i, n) dropped[i] = att[start + i] * dropout_mul(d, start + i);
}

// The softmax backward of batch elements b0 .. b0 + nb, in place on their heads' dP = dout @ v^T
// ([nb, heads, seq, seq], as cuBLASLt left it):  dP *= dropout multipliers;
// dS = att * (dP - rowsum(att * dP)) / sqrt(D). Past the keys a causal row sees, dS is 0 (the CPU
// never computes dP there). One block per attention row; the row of dP is read once, into
// shared memory (`seq` floats) when `cached`, else worked on in place, each thread reading back
// only what it wrote.
extern "C" __global__ void attention_softmax_backward(float* ds, const float* att, u64 b0, u64 nb,
                                                      u64 seq, u64 heads, u64 hd, int causal,
                                                      DROPOUT_PARAMS, int cached) {
    extern __shared__ float shared_row[];
    const Dropout d = DROPOUT_ARGS;
    const float scale = 1.0f / sqrtf((float)hd);
    FOR_ROW(r, nb * heads * seq) {
        const u64 i = r % seq, row = b0 * heads * seq + r, n = causal ? i + 1 : seq;
        const float* p = att + row * seq;
        float* x = ds + r * seq;
        float* buf = cached ? shared_row : x;
        float part = 0.0f;
        FOR_THREAD(j, n) {
            const float v = x[j] * dropout_mul(d, row * seq + j);
            buf[j] = v;
            part += p[j] * v;
        }
        const float rowsum = block_reduce(part, Sum());
        FOR_THREAD(j, seq) x[j] = j < n ? p[j] * (buf[j] - rowsum) * scale : 0.0f;
    }
}

// Per-head matrices, packed: dst[part, b, h, t, :] = src[row(b, t), part * E + h * D ..][..D] for
// `parts` column blocks of width E = heads * D (3 for q|k|v, 1 for out), row(b, t) = b * seq + t
// when batch_first, else t * batch + b. Each head's [seq, D] matrix is then one stride from the
// next across batch elements too, so one batched product covers every (batch, head) pair.
__device__ __forceinline__ u64 heads_index(u64 idx, u64 parts, u64 batch, u64 seq, u64 heads, u64 hd,
                                           int batch_first) {
    const u64 d = idx % hd, t = idx / hd % seq, h = idx / (hd * seq) % heads;
    const u64 b = idx / (hd * seq * heads) % batch, part = idx / (hd * seq * heads * batch);
    const u64 row = batch_first ? b * seq + t : t * batch + b, e = heads * hd;
    return row * parts * e + part * e + h * hd + d;
}

extern "C" __global__ void heads_split(float* dst, const float* src, u64 parts, u64 batch, u64 seq,
                                       u64 heads, u64 hd, int batch_first) {
    FOR_EACH(i, parts * batch * seq * heads * hd)
        dst[i] = src[heads_index(i, parts, batch, seq, heads, hd, batch_first)];
}

// The inverse of heads_split.
extern "C" __global__ void heads_merge(float* dst, const float* src, u64 parts, u64 batch, u64 seq,
                                       u64 heads, u64 hd, int batch_first) {
    FOR_EACH(i, parts * batch * seq * heads * hd)
        dst[heads_index(i, parts, batch, seq, heads, hd, batch_first)] = src[i];
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
