//! Every CUDA kernel compiles with NVRTC for sm_80 (A100) and sm_90 (H100/H200), on a machine
//! with no GPU: only NVRTC is needed (`pip install nvidia-cuda-nvrtc-cu12`). CI sets
//! `FLINT_REQUIRE_NVRTC=1`, so there a missing NVRTC fails the test instead of skipping it.

use flint_backend::cuda::compile;

fn nvrtc_or_skip() -> bool {
    match compile::nvrtc_version() {
        Ok(v) => {
            eprintln!("NVRTC {}.{}", v.0, v.1);
            true
        }
        Err(e) if std::env::var_os("FLINT_REQUIRE_NVRTC").is_some() => {
            panic!("FLINT_REQUIRE_NVRTC is set but NVRTC is unusable: {e:#}")
        }
        Err(e) => {
            eprintln!("SKIPPED: {e:#}");
            false
        }
    }
}

#[test]
fn kernels_compile_for_sm80_and_sm90() {
    if !nvrtc_or_skip() {
        return;
    }
    for arch in [(8, 0), (9, 0)] {
        let cubin = compile::compile(&compile::source(), arch).unwrap_or_else(|e| panic!("{e:#}"));
        // An ELF image, as the driver loads it.
        assert_eq!(
            &cubin[..4],
            b"\x7fELF",
            "sm_{}{}: not a cubin",
            arch.0,
            arch.1
        );
    }
}

#[test]
fn a_broken_kernel_is_reported_with_nvrtc_log() {
    if !nvrtc_or_skip() {
        return;
    }
    let err = compile::compile(
        "extern \"C\" __global__ void k(float* x) { x[0] = y; }",
        (9, 0),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("sm_90") && err.contains("\"y\""), "{err}");
}
