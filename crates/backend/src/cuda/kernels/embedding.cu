// Token plus position embeddings (GPT-2's wte and wpe), twin of cpu/embedding.rs. Element
// (r, j) of out[rows, c] is element r * c + j of the dropout stream.

// out[r] = dropout(wte[ids[r]] + wpe[r % seq]). A token id outside 0..vocab is not read: its row
// is written as zeros and the smallest such r is left in *bad_row (which the host set to
// u64::MAX before the launch), so the host reports it as the CPU does.
extern "C" __global__ void embedding_forward(float* out, const int* ids, const float* wte,
                                             const float* wpe, u64 rows, u64 seq, u64 c, u64 vocab,
                                             u64* bad_row, DROPOUT_PARAMS) {
    const Dropout d = DROPOUT_ARGS;
    FOR_EACH(i, rows * c) {
        const u64 r = i / c, j = i % c;
        const int id = ids[r];
        if (id < 0 || (u64)id >= vocab) {
            atomicMin(bad_row, r);
            out[i] = 0.0f;
            continue;
        }
        const u64 p = r % seq;
        out[i] = (wte[(u64)id * c + j] + wpe[p * c + j]) * dropout_mul(d, i);
    }
}

// dwte[ids[r]] += g[r];  dwpe[r % seq] += g[r];  g = dropout(dout). Rows that share a token or a
// position add with atomics, in no fixed order (the CPU adds them in row order). Ids outside
// 0..vocab are skipped (the forward already reported them).
extern "C" __global__ void embedding_backward(float* dwte, float* dwpe, const float* dout,
                                              const int* ids, u64 rows, u64 seq, u64 c, u64 vocab,
                                              DROPOUT_PARAMS) {
    const Dropout d = DROPOUT_ARGS;
    FOR_EACH(i, rows * c) {
        const u64 r = i / c, j = i % c;
        const int id = ids[r];
        if (id < 0 || (u64)id >= vocab) continue;
        const float g = dout[i] * dropout_mul(d, i);
        atomicAdd(&dwte[(u64)id * c + j], g);
        atomicAdd(&dwpe[(r % seq) * c + j], g);
    }
}
