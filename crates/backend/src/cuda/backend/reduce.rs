//! Reductions read back or kept on the device: column sums (bias and layer-norm parameter
//! gradients) in two deterministic levels, and the f64 total of per-block partial sums.

use super::*;

impl Cuda {
    /// The parameter gradients of `out[rows, n] = inp[rows, k] @ W + bias` given `dout` (a
    /// device address): `dweight` in its own layout and `dbias`, stored as `grads` says.
    pub(super) fn param_grads(
        &self,
        dweight: Weight,
        dbias: Option<Tensor>,
        grads: GradStore,
        dout: u64,
        inp: Tensor,
        [rows, k, n]: [usize; 3],
    ) -> Result<()> {
        let inp = f32s(inp, rows * k, "matmul_backward inp")?;
        let dw = f32s(dweight.tensor, k * n, "matmul_backward dweight")?;
        let acc = grads.accumulates();
        match dweight.layout {
            // dW[n, k] (+)= dout^T @ inp
            WeightLayout::OutIn => self.gemm(dw, acc, transposed(dout), plain(inp), n, rows, k)?,
            // dW[k, n] (+)= inp^T @ dout
            WeightLayout::InOut => self.gemm(dw, acc, transposed(inp), plain(dout), k, rows, n)?,
        }
        if let Some(dbias) = dbias {
            let dbias = f32s(dbias, n, "matmul_backward dbias")?;
            let kernel = &self.kernels.column_sum_partials;
            self.column_reduce(kernel, &[dbias], grads, &[ptr(dout)], rows, n)?;
        }
        Ok(())
    }

    /// `outs[o][n] (+)=` (as `grads` says) column sums over `rows` rows of `[rows, n]` matrices,
    /// in two levels (see COLUMN_PARAMS in kernels/common.cuh): `kernel`, called with the
    /// partials buffer, then `inputs`, then COLUMN_PARAMS, leaves output `o`'s sum over row
    /// chunk `ch` in `partials[(o * chunks + ch) * cols..][..cols]`; add_column_partials then
    /// adds each output's chunks in order. The chunks depend on `rows` alone, so a result depends on
    /// neither timing, the GPU nor the number of columns.
    pub(super) fn column_reduce(
        &self,
        kernel: &launch::Kernel,
        outs: &[u64],
        grads: GradStore,
        inputs: &[Arg],
        rows: usize,
        n: usize,
    ) -> Result<()> {
        let guard = lock(&self.column_partials, "the column partials")?;
        let partials = guard.addr();
        let chunk_rows = rows.div_ceil(MAX_ROW_CHUNKS).max(MIN_CHUNK_ROWS);
        let chunks = rows.div_ceil(chunk_rows);
        // Columns whose partials fit the buffer: at least 32768, so more than one slab is rare.
        let slab = COLUMN_PARTIALS / (outs.len() * chunks.max(1));
        for col0 in (0..n).step_by(slab) {
            let cols = slab.min(n - col0);
            let items = cols.div_ceil(32) * chunks;
            let params = [
                size(rows),
                size(n),
                size(col0),
                size(cols),
                size(chunk_rows),
            ];
            let args = std::iter::once(ptr(partials))
                .chain(inputs.iter().copied())
                .chain(params);
            self.launch(kernel, grid(items, 0), args)?;
            for (o, &out) in outs.iter().enumerate() {
                let args = [
                    ptr(out + 4 * col0 as u64),
                    ptr(partials + 4 * (o * chunks * cols) as u64),
                    size(chunks),
                    size(cols),
                    Arg::I32(grads.accumulates() as i32),
                ];
                self.launch(&self.kernels.add_column_partials, elementwise(cols), args)?;
            }
        }
        Ok(())
    }

    /// Adds the `blocks` partial sums a reduction left in scratch and reads the total back.
    pub(super) fn total(&self, scratch: &Scratch, blocks: usize) -> Result<f64> {
        let args = [ptr(scratch.partials()), size(blocks), ptr(scratch.total())];
        self.launch(&self.kernels.sum_partials, grid(1, 0), args)?;
        let [bits] = self.read::<u64, 1>(scratch.total())?;
        Ok(f64::from_bits(bits))
    }
}
