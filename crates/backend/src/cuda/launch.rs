//! Finding flint's kernels in the loaded module and launching them.
//!
//! Kernel arguments cross to the GPU untyped, so a launch whose arguments do not match the
//! kernel's parameters would read garbage. Each kernel therefore carries its parameter list,
//! read from the CUDA source it was compiled from, and every launch is checked against it.

use super::compile;
use anyhow::{anyhow, bail, Context, Result};
use cudarc::driver::{CudaFunction, CudaModule, CudaStream, LaunchConfig, PushKernelArg};
use std::collections::HashMap;
use std::sync::Arc;

/// Threads per block of every launch: a multiple of the warp size (`block_reduce` needs one).
pub(super) const THREADS: usize = 256;

/// Grid size cap: kernels loop over grid-sized strides, so more blocks only add scheduling.
const MAX_BLOCKS: usize = 1 << 16;

/// Dynamic shared memory a block may use without opting in: 48 KiB on every GPU since Kepler,
/// a limit on static plus dynamic shared memory together, so the static arrays of the kernels
/// that take dynamic memory (`block_reduce`'s 32 partials, at most 256 bytes) are reserved out
/// of it.
pub(super) const MAX_SHARED_BYTES: usize = (48 << 10) - 1024;

/// One kernel argument; sizes and device addresses are `u64` (the kernels' `u64` and pointers).
#[derive(Clone, Copy, Debug)]
pub(super) enum Arg {
    U64(u64),
    F32(f32),
    I32(i32),
}

/// A size or index argument.
pub(super) fn size(n: usize) -> Arg {
    Arg::U64(n as u64)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    U64,
    F32,
    I32,
}

impl Arg {
    fn kind(&self) -> Kind {
        match self {
            Arg::U64(_) => Kind::U64,
            Arg::F32(_) => Kind::F32,
            Arg::I32(_) => Kind::I32,
        }
    }
}

/// A kernel of the module and the parameter kinds its source declares.
pub(super) struct Kernel {
    name: &'static str,
    func: CudaFunction,
    params: Vec<Kind>,
}

impl Kernel {
    fn load(
        module: &Arc<CudaModule>,
        signatures: &HashMap<String, Vec<Kind>>,
        name: &'static str,
    ) -> Result<Kernel> {
        let params = signatures
            .get(name)
            .with_context(|| format!("kernel {name} is not declared in the CUDA source"))?
            .clone();
        let func = module
            .load_function(name)
            .map_err(|e| anyhow!("kernel {name} is not in the compiled module: {e}"))?;
        Ok(Kernel { name, func, params })
    }
}

/// Declares `Kernels`, one field per kernel, loaded by name.
macro_rules! kernels {
    ($($name:ident),* $(,)?) => {
        pub(super) struct Kernels {
            $(pub $name: Kernel,)*
        }

        impl Kernels {
            pub(super) fn load(module: &Arc<CudaModule>) -> Result<Kernels> {
                let signatures = signatures(&compile::source())?;
                Ok(Kernels {
                    $($name: Kernel::load(module, &signatures, stringify!($name))?,)*
                })
            }
        }

        #[cfg(test)]
        const NAMES: &[&str] = &[$(stringify!($name)),*];
    };
}

kernels!(
    fill,
    scale,
    bias_rows,
    transpose,
    copy_rows,
    to_bf16,
    column_sum_partials,
    add_column_partials,
    activation_forward,
    activation_backward,
    residual_forward,
    residual_backward,
    layernorm_forward,
    layernorm_backward_input,
    layernorm_backward_params_partials,
    attention_softmax,
    attention_dropout,
    attention_softmax_backward,
    attention_decode,
    heads_split,
    heads_merge,
    flash_delta,
    flash_forward,
    flash_backward_kv,
    flash_backward_q,
    embedding_forward,
    embedding_backward,
    sum_partials,
    sum_squares,
    mse,
    cross_entropy_count,
    cross_entropy,
    adamw,
);

/// A launch of `blocks` blocks of [`THREADS`] threads (at least one, at most [`MAX_BLOCKS`]) with
/// `shared_floats` floats of dynamic shared memory.
pub(super) fn grid(blocks: usize, shared_floats: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (blocks.clamp(1, MAX_BLOCKS) as u32, 1, 1),
        block_dim: (THREADS as u32, 1, 1),
        shared_mem_bytes: (shared_floats * 4) as u32,
    }
}

/// A launch of one thread per element of `n` (grid-stride beyond [`MAX_BLOCKS`] blocks).
pub(super) fn elementwise(n: usize) -> LaunchConfig {
    grid(n.div_ceil(THREADS), 0)
}

/// Queues `kernel` on `stream` after checking `args` against its parameters.
pub(super) fn launch(
    stream: &CudaStream,
    kernel: &Kernel,
    cfg: LaunchConfig,
    args: impl IntoIterator<Item = Arg>,
) -> Result<()> {
    let args: Vec<Arg> = args.into_iter().collect();
    let kinds: Vec<Kind> = args.iter().map(Arg::kind).collect();
    if kinds != kernel.params {
        bail!(
            "kernel {} launched with arguments {kinds:?}, but it takes {:?}",
            kernel.name,
            kernel.params
        );
    }
    let mut builder = stream.launch_builder(&kernel.func);
    for arg in &args {
        match arg {
            Arg::U64(x) => builder.arg(x),
            Arg::F32(x) => builder.arg(x),
            Arg::I32(x) => builder.arg(x),
        };
    }
    // SAFETY: the arguments match the kernel's parameters in number and kind (checked above);
    // the device addresses among them come from views the backend checked for dtype and length.
    unsafe { builder.launch(cfg) }.map_err(|e| anyhow!("launching kernel {}: {e}", kernel.name))?;
    Ok(())
}

/// The parameter kinds of every `extern "C" __global__` kernel of `src`, by name. Parameter
/// macros (`#define X_PARAMS a, b`) are expanded.
fn signatures(src: &str) -> Result<HashMap<String, Vec<Kind>>> {
    let mut macros: HashMap<&str, &str> = HashMap::new();
    for line in src.lines() {
        if let Some(rest) = line.trim().strip_prefix("#define ") {
            if let Some((name, body)) = rest.split_once(' ') {
                if name.ends_with("_PARAMS") {
                    macros.insert(name, body);
                }
            }
        }
    }
    let mut kernels = HashMap::new();
    const DECL: &str = "extern \"C\" __global__ void ";
    for (at, _) in src.match_indices(DECL) {
        let rest = &src[at + DECL.len()..];
        let (name, rest) = rest.split_once('(').context("kernel without parameters")?;
        let (params, _) = rest.split_once(')').context("unclosed parameter list")?;
        let mut kinds = Vec::new();
        for param in params.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            match macros.get(param) {
                Some(body) => {
                    for p in body.split(',') {
                        kinds.push(kind(p)?);
                    }
                }
                None => kinds.push(kind(param)?),
            }
        }
        kernels.insert(name.trim().to_string(), kinds);
    }
    Ok(kernels)
}

fn kind(param: &str) -> Result<Kind> {
    let param = param.trim();
    Ok(if param.contains('*') || param.starts_with("u64 ") {
        Kind::U64
    } else if param.starts_with("float ") {
        Kind::F32
    } else if param.starts_with("int ") {
        Kind::I32
    } else {
        bail!("kernel parameter `{param}`: use a pointer, u64, float or int")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kernel_is_declared_with_parameters_launches_can_match() {
        let sigs = signatures(&compile::source()).unwrap_or_else(|e| panic!("{e:#}"));
        for name in NAMES {
            assert!(sigs.contains_key(*name), "{name} is not in the CUDA source");
        }
        assert_eq!(
            sigs["attention_softmax_backward"],
            [
                &[Kind::U64; 7][..],
                &[Kind::I32],
                &[Kind::U64; 3],
                &[Kind::F32],
                &[Kind::I32]
            ]
            .concat()
        );
    }

    #[test]
    fn every_kernel_in_the_source_is_loaded() {
        let sigs = signatures(&compile::source()).unwrap_or_else(|e| panic!("{e:#}"));
        for name in sigs.keys() {
            assert!(NAMES.contains(&name.as_str()), "{name} is never loaded");
        }
    }
}
