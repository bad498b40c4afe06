//! KTO class-weight helper: the suggestion lands inside the paper's range
//! `λ_D n_D / (λ_U n_U) ∈ [1, 4/3]`, keeps the larger class at weight 1, and the checker agrees.

use halo_kernels::losses::{check_kto_weights, suggest_kto_weights, KtoWeightCheck, KtoWeights};
use halo_kernels::HaloError;
use proptest::prelude::*;

#[test]
fn paper_example_one_to_ten() {
    // 1 desirable : 10 undesirable → λ_D = 10 (ratio 1), λ_U = 1.
    let w = suggest_kto_weights(100, 1000).unwrap();
    assert_eq!(
        w,
        KtoWeights {
            desirable_weight: 10.0,
            undesirable_weight: 1.0
        }
    );
    assert!(check_kto_weights(100, 1000, w).unwrap().is_in_range());
    // Defaults are too low for that data set, and 14 is too high.
    let ones = KtoWeights {
        desirable_weight: 1.0,
        undesirable_weight: 1.0,
    };
    assert!(matches!(
        check_kto_weights(100, 1000, ones).unwrap(),
        KtoWeightCheck::TooLow { .. }
    ));
    let high = KtoWeights {
        desirable_weight: 14.0,
        undesirable_weight: 1.0,
    };
    assert!(matches!(
        check_kto_weights(100, 1000, high).unwrap(),
        KtoWeightCheck::TooHigh { .. }
    ));
    let r = check_kto_weights(
        100,
        1000,
        KtoWeights {
            desirable_weight: 12.0,
            undesirable_weight: 1.0,
        },
    )
    .unwrap();
    assert!(r.is_in_range());
    assert!((r.ratio() - 1.2).abs() < 1e-12);
}

#[test]
fn balanced_and_slightly_desirable_heavy_keep_defaults() {
    for (d, u) in [(10, 10), (13, 10), (4, 3), (7, 6)] {
        let w = suggest_kto_weights(d, u).unwrap();
        assert_eq!(
            w,
            KtoWeights {
                desirable_weight: 1.0,
                undesirable_weight: 1.0
            },
            "{d}:{u}"
        );
    }
    // 3:1 desirable-heavy: undesirable is raised to 3·3/4 = 2.25 (ratio 4/3).
    let w = suggest_kto_weights(300, 100).unwrap();
    assert_eq!(w.desirable_weight, 1.0);
    assert!((w.undesirable_weight - 2.25).abs() < 1e-12);
}

#[test]
fn errors() {
    let w = KtoWeights {
        desirable_weight: 1.0,
        undesirable_weight: 1.0,
    };
    assert_eq!(
        suggest_kto_weights(0, 5).unwrap_err(),
        HaloError::EmptyBatch("n_desirable")
    );
    assert_eq!(
        suggest_kto_weights(5, 0).unwrap_err(),
        HaloError::EmptyBatch("n_undesirable")
    );
    assert_eq!(
        check_kto_weights(0, 5, w).unwrap_err(),
        HaloError::EmptyBatch("n_desirable")
    );
    for bad in [
        KtoWeights {
            desirable_weight: -1.0,
            undesirable_weight: 1.0,
        },
        KtoWeights {
            desirable_weight: f64::NAN,
            undesirable_weight: 1.0,
        },
        KtoWeights {
            desirable_weight: 1.0,
            undesirable_weight: 0.0,
        },
        KtoWeights {
            desirable_weight: 1.0,
            undesirable_weight: f64::INFINITY,
        },
    ] {
        assert!(matches!(
            check_kto_weights(5, 5, bad).unwrap_err(),
            HaloError::InvalidHyperParameter { .. }
        ));
    }
}

proptest! {
    #[test]
    fn suggestion_is_in_range_and_minimal(nd in 1u64..10_000_000, nu in 1u64..10_000_000) {
        let w = suggest_kto_weights(nd, nu).unwrap();
        let ratio = w.desirable_weight * nd as f64 / (w.undesirable_weight * nu as f64);
        prop_assert!((1.0 - 1e-9..=4.0 / 3.0 + 1e-9).contains(&ratio), "ratio {}", ratio);
        prop_assert!(check_kto_weights(nd, nu, w).unwrap().is_in_range());
        // Weights are never below 1, and at least one stays exactly 1.
        prop_assert!(w.desirable_weight >= 1.0 && w.undesirable_weight >= 1.0);
        prop_assert!(w.desirable_weight == 1.0 || w.undesirable_weight == 1.0);
        // The weight that is raised belongs to the smaller class.
        if w.desirable_weight > 1.0 { prop_assert!(nd < nu); }
        if w.undesirable_weight > 1.0 { prop_assert!(nd > nu); }
    }
}
