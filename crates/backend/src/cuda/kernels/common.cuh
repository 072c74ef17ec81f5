// Helpers shared by every kernel file (they are concatenated after this one into one
// translation unit). NVRTC compiles without include paths, so no header is used: fixed-width
// types and infinities are spelled out here.
//
// Conventions: sizes and indices are `u64` (the Rust side passes every size as u64), tensors are
// plain pointers, and every block has a multiple of 32 threads (block_reduce relies on it).

typedef unsigned long long u64;
typedef unsigned int u32;

__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }

// x rounded to the nearest bf16 (ties to even), as its 16 bits. Infinities stay infinite. A NaN
// is kept a (quiet) NaN apart: rounding would carry the GPU's own NaN, 0x7fffffff (from 0 * inf
// or inf - inf), into the sign bit and make it -0, so a diverged row would read as zeros.
__device__ __forceinline__ u32 bf16_bits(float x) {
    const u32 b = __float_as_uint(x);
    if ((b & 0x7fffffffu) > 0x7f800000u) return (b >> 16) | 0x40u;
    return (b + 0x7fffu + ((b >> 16) & 1u)) >> 16;
}

// Grid-stride loop over 0..n: any grid size covers any n.
#define FOR_EACH(i, n) \
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += (u64)gridDim.x * blockDim.x)

// Block-stride loop over 0..n: the threads of one block share the work of one row.
#define FOR_THREAD(j, n) for (u64 j = threadIdx.x; j < (n); j += blockDim.x)

// Block-per-row loop over 0..n: any grid size covers any number of rows. `r` is the same for
// every thread of a block, so block_reduce may be called inside.
#define FOR_ROW(r, n) for (u64 r = blockIdx.x; r < (n); r += gridDim.x)

// ---- Philox4x32-10, word for word as src/philox.rs

// Word `i % 4` of the block `i / 4` of the stream (seed, offset): uniform u32 number `i`.
__device__ u32 philox_word(u64 seed, u64 offset, u64 i) {
    const u64 block = i / 4;
    u32 c0 = (u32)block, c1 = (u32)(block >> 32), c2 = (u32)offset, c3 = (u32)(offset >> 32);
    u32 k0 = (u32)seed, k1 = (u32)(seed >> 32);
    for (int round = 0; round < 10; ++round) {
        if (round > 0) {
            k0 += 0x9E3779B9u;
            k1 += 0xBB67AE85u;
        }
        const u32 hi0 = __umulhi(0xD2511F53u, c0), lo0 = 0xD2511F53u * c0;
        const u32 hi1 = __umulhi(0xCD9E8D57u, c2), lo1 = 0xCD9E8D57u * c2;
        const u32 n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
        c0 = n0;
        c1 = lo1;
        c2 = n2;
        c3 = lo0;
    }
    switch (i % 4) {
        case 0: return c0;
        case 1: return c1;
        case 2: return c2;
        default: return c3;
    }
}

// A dropout as the host prepares it (backend.rs, `dropout_args`): element i is dropped when its
// uniform u32 is below `threshold` (= p * 2^32, computed on the host exactly as the CPU does),
// kept ones are multiplied by `keep` (= 1 / (1 - p), in f32 on the host). No dropout is
// threshold 0 and keep 1; p >= 1 is threshold 2^32 (every element dropped) and keep 0.
struct Dropout {
    u64 seed, offset, threshold;
    float keep;
};

#define DROPOUT_PARAMS u64 drop_seed, u64 drop_offset, u64 drop_threshold, float drop_keep
#define DROPOUT_ARGS (Dropout{drop_seed, drop_offset, drop_threshold, drop_keep})

// The multiplier of element i of the dropout stream: 0 or `keep`.
__device__ __forceinline__ float dropout_mul(const Dropout& d, u64 i) {
    if (d.threshold == 0) return d.keep;  // nothing can be dropped: skip the generator
    return (u64)philox_word(d.seed, d.offset, i) < d.threshold ? 0.0f : d.keep;
}

// ---- Block reductions

struct Sum {
    template <typename T>
    __device__ T operator()(T a, T b) const { return a + b; }
};
// fmaxf ignores a NaN operand, like Rust's f32::max in the CPU kernels.
struct Max {
    __device__ float operator()(float a, float b) const { return fmaxf(a, b); }
};
struct Min {
    __device__ u64 operator()(u64 a, u64 b) const { return a < b ? a : b; }
};

// Combines `v` over the whole block and returns the result to every thread. Every thread of
// the block must call it (it synchronises). Warps reduce with shuffles, then every thread
// combines the per-warp results in warp order: deterministic for a given block size.
template <typename T, typename Op>
__device__ T block_reduce(T v, Op op) {
    __shared__ T partial[32];
    for (int m = 16; m > 0; m >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, m));
    const u32 lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = (blockDim.x + 31) / 32;
    __syncthreads();  // the previous call's readers of `partial` are done
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    T total = partial[0];
    for (u32 w = 1; w < warps; ++w) total = op(total, partial[w]);
    return total;
}

// ---- Column reductions in two levels (backend.rs, `column_reduce`)
//
// out[j] += sum over rows of f(row, j), for columns col0..col0 + cols of [rows, n] matrices.
// The rows are cut into chunks of chunk_rows; work item w (one block at a time, grid-stride) is
// the 32-column tile w % tiles of chunk w / tiles. Lane l of warp v adds rows v, v + warps, ...
// of the chunk in its column, so each warp reads 128 contiguous bytes per row; the warps' sums
// are then added in warp order and stored as the chunk's partial, and add_column_partials adds
// the partials in chunk order. Every sum has a fixed order: results do not depend on timing.
#define COLUMN_PARAMS u64 rows, u64 n, u64 col0, u64 cols, u64 chunk_rows

struct ColumnItem {
    u64 chunk, j, r0, r1;  // the chunk, this thread's column (relative to col0), its rows r0..r1
    bool active;           // j < cols
};

// Calls body(item) for each work item of this block. Every thread of the block runs every
// item (the body may call column_warps_sum, which synchronises).
template <typename Body>
__device__ void for_column_items(u64 rows, u64 cols, u64 chunk_rows, Body body) {
    const u64 tiles = (cols + 31) / 32, chunks = (rows + chunk_rows - 1) / chunk_rows;
    for (u64 w = blockIdx.x; w < tiles * chunks; w += gridDim.x) {
        ColumnItem it;
        it.chunk = w / tiles;
        it.j = (w % tiles) * 32 + threadIdx.x % 32;
        it.active = it.j < cols;
        it.r0 = it.chunk * chunk_rows + threadIdx.x / 32;
        const u64 end = (it.chunk + 1) * chunk_rows;
        it.r1 = end < rows ? end : rows;
        body(it);
    }
}

// The sum, in warp order, of `acc` over the warps of the block, for this thread's lane. Every
// thread of the block must call it (it synchronises).
__device__ float column_warps_sum(float acc) {
    __shared__ float part[1024];  // one per thread of the largest block
    const u32 lane = threadIdx.x % 32, warps = blockDim.x / 32;
    __syncthreads();  // the previous call's readers of `part` are done
    part[threadIdx.x] = acc;
    __syncthreads();
    float s = part[lane];
    for (u32 v = 1; v < warps; ++v) s += part[v * 32 + lane];
    return s;
}
