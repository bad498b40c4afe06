//! Numerically stable logistic functions in f64, shared by every loss.
//!
//! The naive `1 / (1 + exp(−x))` overflows `exp` for very negative `x` and `log(σ(x))` loses all
//! precision (or returns `−inf`) once `σ(x)` rounds to 0. The forms below only ever evaluate
//! `exp(−|x|) ∈ (0, 1]`, so they are finite for every finite `x`.

/// `σ(x) = 1 / (1 + e^{−x})`, stable for all finite `x`.
#[inline]
pub fn sigmoid(x: f64) -> f64 {
    let e = (-x.abs()).exp();
    if x >= 0.0 {
        1.0 / (1.0 + e)
    } else {
        e / (1.0 + e)
    }
}

/// `log σ(x) = −softplus(−x) = min(x, 0) − log1p(e^{−|x|})` (PyTorch's `F.logsigmoid`).
#[inline]
pub fn log_sigmoid(x: f64) -> f64 {
    x.min(0.0) - (-x.abs()).exp().ln_1p()
}

/// `σ'(x) = σ(x)·σ(−x) = e^{−|x|} / (1 + e^{−|x|})²`: exactly 0 (never NaN) once `e^{−|x|}`
/// underflows, i.e. for `|x| > ~745`.
#[inline]
pub fn sigmoid_derivative(x: f64) -> f64 {
    let e = (-x.abs()).exp();
    e / ((1.0 + e) * (1.0 + e))
}

/// `log(1 − e^{x})` for `x ≤ 0`, accurate near `x = 0⁻` where `1 − e^{x}` cancels
/// (`−expm1(x)` keeps full precision). Returns `−inf` at `x = 0`.
#[inline]
pub fn log1m_exp(x: f64) -> f64 {
    // Mächler (2012): log(−expm1(x)) for x > −ln 2, log1p(−exp(x)) below.
    if x > -std::f64::consts::LN_2 {
        (-x.exp_m1()).ln()
    } else {
        (-x.exp()).ln_1p()
    }
}
