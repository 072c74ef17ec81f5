// Flash attention on the tensor cores (sm_80+): the bf16 fast path of attention_forward and
// attention_backward (backend.rs) when there is no dropout and no key padding. Same function as
// the softmax path in attention.cu and cpu/attention.rs (its twins), computed tile by tile with an
// online softmax, so the [seq, seq] probabilities are never written: the forward saves each
// row's log-sum-exp instead, and the backward recomputes the probabilities from it.
//
// q, k, v are read, and out, dq, dk, dv written, in place in the [rows, 3 * E] q|k|v and
// [rows, E] token buffers (see Tokens), fp32 rounded to bf16 as they are loaded; products
// accumulate in fp32 (mma.sync m16n8k16). The forward also keeps a per-head copy of its output
// for the backward's delta (att has room for it; the backward is not given out). A key is
// masked when it is past the sequence, after the query (causal), or padding
// (key_padding[b, key] != 0, with b = head / heads), exactly as in attention_softmax.
//
// Fragment layouts of mma.m16n8k16 (PTX ISA), with g = lane / 4 and t = lane % 4:
//   A (16 x 16, row-major), 4 registers of 2 bf16: rows g, g + 8; columns 2t, 2t + 1 (+ 8);
//   B (16 x 8), 2 registers: rows (k) 2t, 2t + 1 (+ 8), column (n) g, read from B^T stored
//     row-major, so both halves of a register are adjacent in shared memory;
//   C (16 x 8 fp32), 4 registers: row g columns 2t, 2t + 1, then row g + 8.
// Two adjacent C tiles of a row block are exactly one A fragment, which is how the
// probabilities go from one product into the next without leaving registers.

typedef unsigned short u16;

// Tiles: each warp owns 16 rows of the block's 128 (8 warps: the host launches 256 threads and
// asserts it); the other operand streams
// through shared memory 64 rows at a time. Shared rows are padded by 8 bf16 so that the 8
// row groups of a fragment read fall in different banks.
#define FLASH_ROWS 128
#define FLASH_COLS 64
#define FLASH_PAD 8
// bf16 elements of one shared tile at the largest head size: FLASH_COLS x (64 + FLASH_PAD), or
// its transpose. Each entry point declares its tiles once at this size, whichever head size it
// runs (two instantiations declaring their own would add up past the 48 KiB limit).
#define FLASH_TILE (FLASH_COLS * (64 + FLASH_PAD))

__device__ __forceinline__ u32 pack_bf16(float lo, float hi) { return bf16_bits(lo) | (bf16_bits(hi) << 16); }

// d += a @ b over one 16 x 8 x 16 tile, as one warp.
__device__ __forceinline__ void mma_bf16_16816(float* d, const u32* a, const u32* b) {
#if __CUDA_ARCH__ >= 800
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
    __trap();  // the host takes this path only on sm_80 and newer
#endif
}

// The B fragment of columns n0.. (8 of them) and rows k0.. (16), from B^T stored row-major in
// shared memory with `ld` bf16 per row.
__device__ __forceinline__ void load_b(u32* b, const u16* bt, u32 ld, u32 n0, u32 k0) {
    const u32 lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const u16* row = bt + (n0 + g) * ld + k0 + 2 * t;
    b[0] = *(const u32*)row;
    b[1] = *(const u32*)(row + 8);
}

// A [seq, D] fp32 matrix, `ld` floats between rows.
struct View {
    float* at;
    u64 ld;
};

// A [rows, width] token buffer seen per head: token (b, t) is row b * seq + t when batch_first,
// else t * batch + b; head h of column block `part` is the D columns from (part * heads + h) * D.
struct Tokens {
    const float* data;
    u64 width, batch, heads, seq;
    int batch_first;
    __device__ __forceinline__ View head(u64 bh, u64 part, u64 d) const {
        const u64 b = bh / heads, h = bh % heads;
        const u64 first = (batch_first ? b * seq * width : b * width) + (part * heads + h) * d;
        return View{(float*)data + first, batch_first ? width : batch * width};
    }
};

// The A fragments (D / 16 of them) of rows r0, r0 + 8 of a [seq, D] matrix (zero past seq).
template <int D>
__device__ __forceinline__ void load_a_rows(u32 (*a)[4], View m, u64 seq, u64 r0) {
    const u32 t = threadIdx.x % 32 % 4;
    const u64 r1 = r0 + 8;
    for (int kk = 0; kk < D / 16; ++kk) {
        const u32 c = kk * 16 + 2 * t;
        const float* x0 = m.at + r0 * m.ld + c;
        const float* x1 = m.at + r1 * m.ld + c;
        const bool in0 = r0 < seq, in1 = r1 < seq;
        a[kk][0] = in0 ? pack_bf16(x0[0], x0[1]) : 0u;
        a[kk][1] = in1 ? pack_bf16(x1[0], x1[1]) : 0u;
        a[kk][2] = in0 ? pack_bf16(x0[8], x0[9]) : 0u;
        a[kk][3] = in1 ? pack_bf16(x1[8], x1[9]) : 0u;
    }
}

// Rows r0.. (FLASH_COLS of them, zero past seq) of a [seq, D] matrix into shared memory as
// bf16, row-major (`rows`, ld D + FLASH_PAD) and/or transposed (`cols`, ld FLASH_COLS + FLASH_PAD);
// either may be null. All threads of the block take part.
template <int D>
__device__ __forceinline__ void load_tile(u16* rows, u16* cols, View m, u64 seq, u64 r0) {
    for (u32 i = threadIdx.x; i < FLASH_COLS * D; i += blockDim.x) {
        const u32 r = i / D, d = i % D;
        const u16 x = r0 + r < seq ? (u16)bf16_bits(m.at[(r0 + r) * m.ld + d]) : (u16)0;
        if (rows) rows[r * (D + FLASH_PAD) + d] = x;
        if (cols) cols[d * (FLASH_COLS + FLASH_PAD) + r] = x;
    }
}

// The A fragments of a 16 x FLASH_COLS tile held as C fragments c[FLASH_COLS / 8][4].
__device__ __forceinline__ void c_to_a(u32 (*a)[4], const float (*c)[4]) {
    for (int kk = 0; kk < FLASH_COLS / 16; ++kk) {
        a[kk][0] = pack_bf16(c[2 * kk][0], c[2 * kk][1]);
        a[kk][1] = pack_bf16(c[2 * kk][2], c[2 * kk][3]);
        a[kk][2] = pack_bf16(c[2 * kk + 1][0], c[2 * kk + 1][1]);
        a[kk][3] = pack_bf16(c[2 * kk + 1][2], c[2 * kk + 1][3]);
    }
}

// c = a (16 x D fragments) @ the FLASH_COLS rows of bt (row-major, ld D + FLASH_PAD)^T.
template <int D>
__device__ __forceinline__ void mma_rows(float (*c)[4], const u32 (*a)[4], const u16* bt) {
    for (int nt = 0; nt < FLASH_COLS / 8; ++nt) {
        c[nt][0] = c[nt][1] = c[nt][2] = c[nt][3] = 0.0f;
        for (int kk = 0; kk < D / 16; ++kk) {
            u32 b[2];
            load_b(b, bt, D + FLASH_PAD, nt * 8, kk * 16);
            mma_bf16_16816(c[nt], a[kk], b);
        }
    }
}

// acc (16 x D) += a (16 x FLASH_COLS fragments) @ the tile whose transpose is bt (ld
// FLASH_COLS + FLASH_PAD).
template <int D>
__device__ __forceinline__ void mma_cols(float (*acc)[4], const u32 (*a)[4], const u16* bt) {
    for (int nt = 0; nt < D / 8; ++nt) {
        for (int kk = 0; kk < FLASH_COLS / 16; ++kk) {
            u32 b[2];
            load_b(b, bt, FLASH_COLS + FLASH_PAD, nt * 8, kk * 16);
            mma_bf16_16816(acc[nt], a[kk], b);
        }
    }
}

// Element e of C tile nt is at row (e < 2 ? 0 : 8) and column nt * 8 + 2t + e % 2 of the warp's
// 16-row block.
__device__ __forceinline__ u32 c_row(int e) { return threadIdx.x % 32 / 4 + (e >= 2 ? 8 : 0); }
__device__ __forceinline__ u32 c_col(int nt, int e) { return nt * 8 + 2 * (threadIdx.x % 4) + e % 2; }

struct Mask {
    const float* key_padding;  // [batch, seq]
    u64 heads, seq;
    int causal;
    __device__ __forceinline__ bool operator()(u64 head, u64 query, u64 key) const {
        return query >= seq || key >= seq || (causal && key > query) ||
               key_padding[head / heads * seq + key] != 0.0f;
    }
};

// Sum (or max) over the 4 lanes that share a row.
__device__ __forceinline__ float quad_sum(float x) {
    x += __shfl_xor_sync(0xffffffffu, x, 1);
    return x + __shfl_xor_sync(0xffffffffu, x, 2);
}
__device__ __forceinline__ float quad_max(float x) {
    x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
    return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}

// Writes the warp's 16 x D accumulator (times `mul[row half]`) to rows r0.. of `dst`.
template <int D>
__device__ __forceinline__ void store_rows(View dst, const float (*acc)[4], const float* mul, u64 seq, u64 r0) {
    for (int nt = 0; nt < D / 8; ++nt)
        for (int e = 0; e < 4; ++e) {
            const u64 r = r0 + c_row(e);
            if (r < seq) dst.at[r * dst.ld + c_col(nt, e)] = acc[nt][e] * mul[e / 2];
        }
}

// out = softmax(q k^T * scale, masked) v per head (also into the per-head copy `saved_o`, [bh,
// seq, D]), and lse[row] = log-sum-exp of the row's scaled scores. One block per 128 queries of
// one head.
template <int D>
__device__ void flash_forward_tile(u16* shared, Tokens out, float* saved_o, float* lse, Tokens qkv, u64 bh,
                                   Mask mask, float scale) {
    const u64 seq = mask.seq;
    const int causal = mask.causal;
    u16* ks = shared;
    u16* vt = shared + FLASH_TILE;
    const u32 warp = threadIdx.x / 32;
    const u64 tiles = (seq + FLASH_ROWS - 1) / FLASH_ROWS;
    FOR_ROW(item, tiles * bh) {
        const u64 head = item / tiles, q0 = item % tiles * FLASH_ROWS, w0 = q0 + warp * 16;
        u32 qa[D / 16][4];
        load_a_rows<D>(qa, qkv.head(head, 0, D), seq, w0 + c_row(0));
        float acc[D / 8][4] = {};
        float m[2] = {neg_inf(), neg_inf()}, l[2] = {0.0f, 0.0f};
        const u64 end = causal && q0 + FLASH_ROWS < seq ? q0 + FLASH_ROWS : seq;
        for (u64 k0 = 0; k0 < end; k0 += FLASH_COLS) {
            __syncthreads();  // the previous tile's readers are done
            load_tile<D>(ks, nullptr, qkv.head(head, 1, D), seq, k0);
            load_tile<D>(nullptr, vt, qkv.head(head, 2, D), seq, k0);
            __syncthreads();
            if (causal && k0 > w0 + 15) continue;  // every key is after every row of this warp
            float s[FLASH_COLS / 8][4];
            mma_rows<D>(s, qa, ks);
            float mx[2] = {neg_inf(), neg_inf()};
            for (int nt = 0; nt < FLASH_COLS / 8; ++nt)
                for (int e = 0; e < 4; ++e) {
                    const u64 key = k0 + c_col(nt, e), row = w0 + c_row(e);
                    s[nt][e] = mask(head, row, key) ? neg_inf() : s[nt][e] * scale;
                    mx[e / 2] = fmaxf(mx[e / 2], s[nt][e]);
                }
            float shift[2], rescale[2], sum[2] = {0.0f, 0.0f};
            for (int h = 0; h < 2; ++h) {
                const float next = fmaxf(m[h], quad_max(mx[h]));
                shift[h] = next == neg_inf() ? 0.0f : next;  // a row with nothing visible yet
                rescale[h] = expf(m[h] - shift[h]);
                m[h] = next;
            }
            for (int nt = 0; nt < FLASH_COLS / 8; ++nt)
                for (int e = 0; e < 4; ++e) {
                    s[nt][e] = expf(s[nt][e] - shift[e / 2]);
                    sum[e / 2] += s[nt][e];
                }
            for (int h = 0; h < 2; ++h) l[h] = l[h] * rescale[h] + quad_sum(sum[h]);
            for (int nt = 0; nt < D / 8; ++nt)
                for (int e = 0; e < 4; ++e) acc[nt][e] *= rescale[e / 2];
            u32 pa[FLASH_COLS / 16][4];
            c_to_a(pa, s);
            mma_cols<D>(acc, pa, vt);
        }
        float inv[2];
        for (int h = 0; h < 2; ++h) inv[h] = l[h] > 0.0f ? 1.0f / l[h] : 0.0f;
        store_rows<D>(out.head(head, 0, D), acc, inv, seq, w0);
        store_rows<D>(View{saved_o + head * seq * D, D}, acc, inv, seq, w0);
        if (threadIdx.x % 4 == 0)
            for (int h = 0; h < 2; ++h) {
                const u64 r = w0 + c_row(2 * h);
                if (r < seq) lse[head * seq + r] = m[h] + logf(l[h]);
            }
    }
}

// delta[bh, t] = dout . out over the head's D columns of token t: the rowsum(P * dP) of the
// softmax backward (`saved_o` is the forward's per-head copy of out).
extern "C" __global__ void flash_delta(float* delta, const float* dout, const float* saved_o, u64 batch,
                                       u64 heads, u64 seq, u64 hd, int batch_first) {
    const Tokens g{dout, heads * hd, batch, heads, seq, batch_first};
    FOR_EACH(r, batch * heads * seq) {
        const View row = g.head(r / seq, 0, hd);
        const float* x = row.at + r % seq * row.ld;
        float s = 0.0f;
        for (u64 d = 0; d < hd; ++d) s += x[d] * saved_o[r * hd + d];
        delta[r] = s;
    }
}

// dk, dv of 128 keys of one head: dv = P^T dout, dk = dS^T q, looping over the queries.
template <int D>
__device__ void flash_backward_kv_tile(u16* shared, float* stats, Tokens dqkv, Tokens qkv, Tokens dout,
                                       const float* lse, const float* delta, u64 bh, Mask mask, float scale) {
    const u64 seq = mask.seq;
    const int causal = mask.causal;
    u16 *qs = shared, *qt = shared + FLASH_TILE, *gs = shared + 2 * FLASH_TILE, *gt = shared + 3 * FLASH_TILE;
    float *lse_s = stats, *delta_s = stats + FLASH_COLS;
    const u32 warp = threadIdx.x / 32;
    const u64 tiles = (seq + FLASH_ROWS - 1) / FLASH_ROWS;
    FOR_ROW(item, tiles * bh) {
        const u64 head = item / tiles, k0 = item % tiles * FLASH_ROWS, w0 = k0 + warp * 16;
        u32 ka[D / 16][4], va[D / 16][4];
        load_a_rows<D>(ka, qkv.head(head, 1, D), seq, w0 + c_row(0));
        load_a_rows<D>(va, qkv.head(head, 2, D), seq, w0 + c_row(0));
        float dk_acc[D / 8][4] = {}, dv_acc[D / 8][4] = {};
        // Causal: queries before the block's first key see none of its keys.
        for (u64 q0 = causal ? k0 / FLASH_COLS * FLASH_COLS : 0; q0 < seq; q0 += FLASH_COLS) {
            __syncthreads();
            load_tile<D>(qs, qt, qkv.head(head, 0, D), seq, q0);
            load_tile<D>(gs, gt, dout.head(head, 0, D), seq, q0);
            for (u32 i = threadIdx.x; i < FLASH_COLS; i += blockDim.x) {
                const bool in = q0 + i < seq;
                lse_s[i] = in ? lse[head * seq + q0 + i] : 0.0f;
                delta_s[i] = in ? delta[head * seq + q0 + i] : 0.0f;
            }
            __syncthreads();
            if (causal && q0 + FLASH_COLS - 1 < w0) continue;  // every query is before every key
            float s[FLASH_COLS / 8][4], dp[FLASH_COLS / 8][4];
            mma_rows<D>(s, ka, qs);   // s^T = k q^T
            mma_rows<D>(dp, va, gs);  // dP^T = v dout^T
            for (int nt = 0; nt < FLASH_COLS / 8; ++nt)
                for (int e = 0; e < 4; ++e) {
                    const u32 c = c_col(nt, e);
                    const u64 query = q0 + c, key = w0 + c_row(e);
                    const float p = mask(head, query, key) ? 0.0f : expf(s[nt][e] * scale - lse_s[c]);
                    s[nt][e] = p;
                    dp[nt][e] = p * (dp[nt][e] - delta_s[c]) * scale;
                }
            u32 pa[FLASH_COLS / 16][4];
            c_to_a(pa, s);
            mma_cols<D>(dv_acc, pa, gt);  // dv += P^T dout
            c_to_a(pa, dp);
            mma_cols<D>(dk_acc, pa, qt);  // dk += dS^T q
        }
        const float one[2] = {1.0f, 1.0f};
        store_rows<D>(dqkv.head(head, 1, D), dk_acc, one, seq, w0);
        store_rows<D>(dqkv.head(head, 2, D), dv_acc, one, seq, w0);
    }
}

// dq of 128 queries of one head: dq = dS k, looping over the keys.
template <int D>
__device__ void flash_backward_q_tile(u16* shared, Tokens dqkv, Tokens qkv, Tokens dout, const float* lse,
                                      const float* delta, u64 bh, Mask mask, float scale) {
    const u64 seq = mask.seq;
    const int causal = mask.causal;
    u16 *ks = shared, *kt = shared + FLASH_TILE, *vs = shared + 2 * FLASH_TILE;
    const u32 warp = threadIdx.x / 32;
    const u64 tiles = (seq + FLASH_ROWS - 1) / FLASH_ROWS;
    FOR_ROW(item, tiles * bh) {
        const u64 head = item / tiles, q0 = item % tiles * FLASH_ROWS, w0 = q0 + warp * 16;
        u32 qa[D / 16][4], ga[D / 16][4];
        load_a_rows<D>(qa, qkv.head(head, 0, D), seq, w0 + c_row(0));
        load_a_rows<D>(ga, dout.head(head, 0, D), seq, w0 + c_row(0));
        float row_lse[2], row_delta[2];
        for (int h = 0; h < 2; ++h) {
            const u64 r = w0 + c_row(2 * h);
            row_lse[h] = r < seq ? lse[head * seq + r] : 0.0f;
            row_delta[h] = r < seq ? delta[head * seq + r] : 0.0f;
        }
        float acc[D / 8][4] = {};
        const u64 end = causal && q0 + FLASH_ROWS < seq ? q0 + FLASH_ROWS : seq;
        for (u64 k0 = 0; k0 < end; k0 += FLASH_COLS) {
            __syncthreads();
            load_tile<D>(ks, kt, qkv.head(head, 1, D), seq, k0);
            load_tile<D>(vs, nullptr, qkv.head(head, 2, D), seq, k0);
            __syncthreads();
            if (causal && k0 > w0 + 15) continue;
            float s[FLASH_COLS / 8][4], dp[FLASH_COLS / 8][4];
            mma_rows<D>(s, qa, ks);   // s = q k^T
            mma_rows<D>(dp, ga, vs);  // dP = dout v^T
            for (int nt = 0; nt < FLASH_COLS / 8; ++nt)
                for (int e = 0; e < 4; ++e) {
                    const u64 key = k0 + c_col(nt, e), row = w0 + c_row(e);
                    const float p = mask(head, row, key) ? 0.0f : expf(s[nt][e] * scale - row_lse[e / 2]);
                    dp[nt][e] = p * (dp[nt][e] - row_delta[e / 2]) * scale;
                }
            u32 pa[FLASH_COLS / 16][4];
            c_to_a(pa, dp);
            mma_cols<D>(acc, pa, kt);  // dq += dS k
        }
        const float one[2] = {1.0f, 1.0f};
        store_rows<D>(dqkv.head(head, 0, D), acc, one, seq, w0);
    }
}

// The entry points: the head size (32 or 64, checked by the host) picks the instantiation.
// `qkv` and `dqkv` are [rows, 3 * E] and `out` and `dout` [rows, E], E = heads * hd.
#define FLASH_PARAMS const float* key_padding, u64 batch, u64 heads, u64 seq, int causal, float scale, u64 hd, int batch_first
#define FLASH_TOKENS(data, parts) (Tokens{data, parts * heads * hd, batch, heads, seq, batch_first})

extern "C" __global__ void flash_forward(float* out, float* saved_o, float* lse, const float* qkv, FLASH_PARAMS) {
    __shared__ __align__(16) u16 shared[2 * FLASH_TILE];
    const Mask mask{key_padding, heads, seq, causal};
    const Tokens o = FLASH_TOKENS(out, 1), x = FLASH_TOKENS(qkv, 3);
    if (hd == 32) flash_forward_tile<32>(shared, o, saved_o, lse, x, batch * heads, mask, scale);
    else flash_forward_tile<64>(shared, o, saved_o, lse, x, batch * heads, mask, scale);
}

extern "C" __global__ void flash_backward_kv(float* dqkv, const float* qkv, const float* dout, const float* lse,
                                             const float* delta, FLASH_PARAMS) {
    __shared__ __align__(16) u16 shared[4 * FLASH_TILE];
    __shared__ float stats[2 * FLASH_COLS];
    const Mask mask{key_padding, heads, seq, causal};
    const Tokens dx = FLASH_TOKENS(dqkv, 3), x = FLASH_TOKENS(qkv, 3), g = FLASH_TOKENS(dout, 1);
    const u64 bh = batch * heads;
    if (hd == 32) flash_backward_kv_tile<32>(shared, stats, dx, x, g, lse, delta, bh, mask, scale);
    else flash_backward_kv_tile<64>(shared, stats, dx, x, g, lse, delta, bh, mask, scale);
}

extern "C" __global__ void flash_backward_q(float* dqkv, const float* qkv, const float* dout, const float* lse,
                                            const float* delta, FLASH_PARAMS) {
    __shared__ __align__(16) u16 shared[3 * FLASH_TILE];
    const Mask mask{key_padding, heads, seq, causal};
    const Tokens dx = FLASH_TOKENS(dqkv, 3), x = FLASH_TOKENS(qkv, 3), g = FLASH_TOKENS(dout, 1);
    const u64 bh = batch * heads;
    if (hd == 32) flash_backward_q_tile<32>(shared, dx, x, g, lse, delta, bh, mask, scale);
    else flash_backward_q_tile<64>(shared, dx, x, g, lse, delta, bh, mask, scale);
}
