//! Shared helpers of the golden-fixture conformance tests (`tests/conformance_*.rs`): loading the
//! JSON fixtures that `scripts/conformance/make_fixtures.py` writes from PyTorch, TRL and
//! transformers, and comparing with a tolerance that reports the worst element.

#![allow(dead_code)]

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

/// `tests/fixtures/<name>`.
pub fn fixture_path(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("fixtures")
        .join(name)
}

/// Parses a fixture; panics with the regeneration hint when it is missing or malformed.
pub fn load_fixture<T: DeserializeOwned>(name: &str) -> T {
    let path = fixture_path(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "cannot read {} ({e}); regenerate with scripts/conformance/make_fixtures.py",
            path.display()
        )
    });
    serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{} is not a valid fixture: {e}", path.display()))
}

/// f64 JSON values that hold exact f32 inputs.
pub fn to_f32(values: &[f64]) -> Vec<f32> {
    values.iter().map(|&v| v as f32).collect()
}

/// The largest error found by [`assert_close`], for the report a test prints.
#[derive(Debug, Clone, Copy, Default)]
pub struct MaxError {
    pub abs: f64,
    pub rel: f64,
}

/// Asserts `|ours[i] − theirs[i]| ≤ rtol·|theirs[i]| + atol(i)` for every element and returns the
/// largest absolute and relative (to `max(|theirs|, 1e-30)`) errors. The panic message names the
/// case, the element, both values and the tolerance.
pub fn assert_close(
    what: &str,
    ours: &[f64],
    theirs: &[f64],
    rtol: f64,
    atol: impl Fn(usize) -> f64,
) -> MaxError {
    assert_eq!(
        ours.len(),
        theirs.len(),
        "{what}: length {} vs fixture {}",
        ours.len(),
        theirs.len()
    );
    let mut worst = MaxError::default();
    for (i, (&a, &b)) in ours.iter().zip(theirs).enumerate() {
        let err = (a - b).abs();
        let tol = rtol * b.abs() + atol(i);
        assert!(
            err <= tol,
            "{what}[{i}]: ours {a:e} vs reference {b:e} (|err| {err:e} > tol {tol:e})"
        );
        worst.abs = worst.abs.max(err);
        worst.rel = worst.rel.max(err / b.abs().max(1e-30));
    }
    worst
}

/// [`assert_close`] on scalars.
pub fn assert_scalar_close(what: &str, ours: f64, theirs: f64, rtol: f64, atol: f64) -> MaxError {
    assert_close(what, &[ours], &[theirs], rtol, |_| atol)
}
