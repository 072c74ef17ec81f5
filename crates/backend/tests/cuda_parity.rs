//! The CUDA backend against the CPU backend (the reference), call by call: see
//! `flint_backend::parity`. Needs a GPU; without one the test says why and passes, unless
//! `FLINT_REQUIRE_GPU` is set (as on GPU machines), where a missing GPU fails it.

use flint_backend::cpu::Cpu;
use flint_backend::cuda::Cuda;
use flint_backend::{parity, Backend};

#[test]
fn cuda_matches_cpu_in_every_call() {
    let cuda = match Cuda::new(0) {
        Ok(cuda) => cuda,
        Err(e) if std::env::var_os("FLINT_REQUIRE_GPU").is_some() => {
            panic!("FLINT_REQUIRE_GPU is set but the GPU is unusable: {e:#}")
        }
        Err(e) => {
            eprintln!("SKIPPED: no usable GPU: {e:#}");
            return;
        }
    };
    eprintln!("parity of {} against the CPU", cuda.device());
    let mut rows = parity::run(&Cpu, &cuda, 1).unwrap_or_else(|e| panic!("{e:#}"));
    rows.extend(cuda.self_test_rows());
    let table = parity::table(&rows);
    println!("{table}");
    let failed = rows.iter().filter(|r| !r.passed).count();
    assert_eq!(
        failed,
        0,
        "{failed} of {} outputs differ:\n{table}",
        rows.len()
    );
}
