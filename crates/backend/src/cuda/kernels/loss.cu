// Losses fused with their gradient, and the sums the host reads back (twin of cpu/loss.rs and
// adamw::sum_squares). Sums run in f64 like the CPU's: each block leaves one partial sum in
// `partials[blockIdx.x]`, and sum_partials adds them in block order, so a result does not
// depend on timing. The host sizes the grid to at most the number of partial slots it owns.

// *total = sum of partials[count], in one block.
extern "C" __global__ void sum_partials(const double* partials, u64 count, double* total) {
    double acc = 0.0;
    FOR_THREAD(i, count) acc += partials[i];
    acc = block_reduce(acc, Sum());
    if (threadIdx.x == 0) *total = acc;
}

// partials: sum of x^2 (in f64) over this block's elements
extern "C" __global__ void sum_squares(const float* x, u64 n, double* partials) {
    double acc = 0.0;
    FOR_EACH(i, n) acc += (double)x[i] * (double)x[i];
    acc = block_reduce(acc, Sum());
    if (threadIdx.x == 0) partials[blockIdx.x] = acc;
}

// dinp[n] = scale * (inp - target) with scale = 2 / n;  partials: sum of (inp - target)^2 in f64
extern "C" __global__ void mse(float* dinp, const float* inp, const float* target, u64 n,
                               float scale, double* partials) {
    double acc = 0.0;
    FOR_EACH(i, n) {
        const float diff = inp[i] - target[i];
        dinp[i] = scale * diff;
        acc += (double)diff * (double)diff;
    }
    acc = block_reduce(acc, Sum());
    if (threadIdx.x == 0) partials[blockIdx.x] = acc;
}

#define IGNORE_INDEX (-100)

__device__ __forceinline__ bool ignored(int t) { return t == IGNORE_INDEX; }
__device__ __forceinline__ bool in_vocab(int t, u64 vocab) { return t >= 0 && (u64)t < vocab; }

// counts[0] = number of rows whose target is not IGNORE_INDEX (the divisor of the mean);
// counts[1] = the first row whose target is neither IGNORE_INDEX nor a token (u64::MAX if none).
// One block.
extern "C" __global__ void cross_entropy_count(const int* targets, u64 rows, u64 vocab, u64* counts) {
    u64 count = 0, bad = ~0ull;
    FOR_THREAD(r, rows) {
        const int t = targets[r];
        if (!ignored(t)) {
            count += 1;
            if (!in_vocab(t, vocab) && r < bad) bad = r;
        }
    }
    count = block_reduce(count, Sum());
    bad = block_reduce(bad, Min());
    if (threadIdx.x == 0) {
        counts[0] = count;
        counts[1] = bad;
    }
}

// F.cross_entropy(logits[rows, vocab], targets[rows]) with its backward, after
// cross_entropy_count: with inv = 1 / counts[0] (0 when no row counts),
// dlogits = (softmax(logits) - onehot(target)) * inv, zero on ignored rows (and on rows with a
// bad target, which the host reports); partials: sum over this block's rows of
// logsumexp(logits) - logits[target], in f64. One block per row at a time.
extern "C" __global__ void cross_entropy(float* dlogits, const float* logits, const int* targets,
                                         u64 rows, u64 vocab, const u64* counts, double* partials) {
    const float inv = counts[0] > 0 ? 1.0f / (float)counts[0] : 0.0f;
    double block_loss = 0.0;
    FOR_ROW(r, rows) {
        const float* x = logits + r * vocab;
        float* d = dlogits + r * vocab;
        const int t = targets[r];
        if (!in_vocab(t, vocab)) {  // ignored (or bad): the same for the whole block
            FOR_THREAD(j, vocab) d[j] = 0.0f;
            continue;
        }
        float mx = neg_inf();
        FOR_THREAD(j, vocab) mx = fmaxf(mx, x[j]);
        mx = block_reduce(mx, Max());
        // The gradient uses the f32 sum of exponentials, as the CPU does; the loss adds the
        // same f32 exponentials in f64 (the CPU takes them in f64, a difference of ~1e-7).
        float sum = 0.0f;
        double sum64 = 0.0;
        FOR_THREAD(j, vocab) {
            const float e = expf(x[j] - mx);
            sum += e;
            sum64 += (double)e;
        }
        sum = block_reduce(sum, Sum());
        sum64 = block_reduce(sum64, Sum());
        FOR_THREAD(j, vocab) {
            float v = expf(x[j] - mx) / sum * inv;
            if (j == (u64)t) v -= inv;
            d[j] = v;
        }
        if (threadIdx.x == 0) block_loss += (double)mx + log(sum64) - (double)x[t];
    }
    if (threadIdx.x == 0) partials[blockIdx.x] = block_loss;
}
