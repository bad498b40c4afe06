//! The stable logistic helpers vs direct formulas where those are accurate, and their
//! asymptotics where the direct formulas overflow or cancel.

use halo_kernels::losses::sigmoid::{log1m_exp, log_sigmoid, sigmoid, sigmoid_derivative};

fn close(got: f64, want: f64, rel: f64) -> bool {
    (got - want).abs() <= rel * want.abs().max(f64::MIN_POSITIVE)
}

#[test]
fn agree_with_direct_formulas_on_moderate_inputs() {
    let mut x: f64 = -30.0;
    while x <= 30.0 {
        let s = 1.0 / (1.0 + (-x).exp());
        assert!(close(sigmoid(x), s, 1e-14), "sigmoid({x})");
        // ln of a number near 1 has an absolute (not relative) error of ~1e-16.
        let want = -(1.0 + (-x).exp()).ln();
        assert!(
            (log_sigmoid(x) - want).abs() <= 1e-15 + 1e-12 * want.abs(),
            "log_sigmoid({x})"
        );
        let s_neg = 1.0 / (1.0 + x.exp());
        assert!(
            close(sigmoid_derivative(x), s * s_neg, 1e-13),
            "sigmoid'({x})"
        );
        x += 0.37;
    }
    let mut x: f64 = -20.0;
    while x < -0.01 {
        let want = (1.0 - x.exp()).ln();
        assert!(
            (log1m_exp(x) - want).abs() <= 1e-15 + 1e-12 * want.abs(),
            "log1m_exp({x})"
        );
        x += 0.113;
    }
}

#[test]
fn asymptotics_without_overflow_or_nan() {
    for x in [-1e300, -1e5, -800.0, 800.0, 1e5, 1e300] {
        assert!(sigmoid(x).is_finite() && (0.0..=1.0).contains(&sigmoid(x)));
        assert!(log_sigmoid(x).is_finite() && log_sigmoid(x) <= 0.0);
        assert_eq!(sigmoid_derivative(x), 0.0);
    }
    // log σ(x) → x for x → −∞; σ(x) ≈ e^{x} there (no underflow to 0 before e^{x} does).
    assert_eq!(log_sigmoid(-1e5), -1e5);
    assert!(close(sigmoid(-700.0), (-700.0f64).exp(), 1e-12));
    assert!(close(log_sigmoid(-40.0), -40.0 - (-40.0f64).exp(), 1e-15));
    // log(1 − e^x) ≈ log(−x) as x → 0⁻, where 1 − e^x would cancel.
    assert!(close(log1m_exp(-1e-20), (1e-20f64).ln(), 1e-12));
    assert!(close(log1m_exp(-1e-10), (1e-10f64).ln() - 0.5e-10, 1e-12));
    assert_eq!(log1m_exp(0.0), f64::NEG_INFINITY);
    assert!(close(log1m_exp(-800.0), -(-800.0f64).exp(), 1e-12) || log1m_exp(-800.0) == 0.0);
}
