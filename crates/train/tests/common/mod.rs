//! Shared by the tests that compare against PyTorch / transformers fixtures.

/// max |a - b| / max |b|; infinite when `a` holds a NaN or an infinity.
pub fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    if a.iter().any(|x| !x.is_finite()) {
        return f64::INFINITY;
    }
    let diff = a
        .iter()
        .zip(b)
        .map(|(x, y)| (*x as f64 - *y as f64).abs())
        .fold(0.0, f64::max);
    diff / b.iter().map(|y| (*y as f64).abs()).fold(1e-12, f64::max)
}
