//! The C header `kernels/halo_abi.h` (as compiled into the host emulation) and its Rust mirror
//! `src/kernel_abi.rs` must agree on every struct size, field offset and constant.

use std::mem::{offset_of, size_of};

use halo_kernels::emulation::{abi_query, c_token_rows_per_block};
use halo_kernels::kernel_abi::*;

fn c(name: &str) -> i64 {
    abi_query(name)
        .expect("the emulated device loads")
        .unwrap_or_else(|| panic!("the C side does not know `{name}`"))
}

macro_rules! check_struct {
    ($s:ident { $($f:ident),* $(,)? }) => {{
        assert_eq!(c(concat!("sizeof ", stringify!($s))), size_of::<$s>() as i64, "sizeof {}", stringify!($s));
        $(
            assert_eq!(
                c(concat!(stringify!($s), ".", stringify!($f))),
                offset_of!($s, $f) as i64,
                "offset of {}.{}", stringify!($s), stringify!($f)
            );
        )*
    }};
}

#[test]
fn struct_layouts_match_the_c_header() {
    check_struct!(HaloTokenParams {
        rows,
        vocab,
        ignore_index,
        rows_per_block
    });
    check_struct!(HaloSeqParams {
        batch,
        seq,
        ignore_index,
        use_clamp,
        clamp_min,
        clamp_max
    });
    check_struct!(HaloClampParams {
        n,
        clamp_min,
        clamp_max
    });
    check_struct!(HaloKtoParams {
        batch,
        kl_count,
        loss_type,
        kl_mode,
        beta,
        desirable_weight,
        undesirable_weight,
        kl_sum,
        kl_total,
        _pad
    });
    check_struct!(HaloDpoParams {
        pairs,
        loss_type,
        beta,
        label_smoothing,
        discopop_tau,
        f_divergence,
        f_alpha,
        _pad
    });
}

#[test]
fn constants_match_the_c_header() {
    let pairs: &[(&str, i64)] = &[
        ("HALO_TOKEN_THREADS", TOKEN_THREADS as i64),
        ("HALO_SEQ_THREADS", SEQ_THREADS as i64),
        ("HALO_LOSS_THREADS", LOSS_THREADS as i64),
        ("HALO_STATUS_LEN", STATUS_LEN as i64),
        ("HALO_STATUS_OK", STATUS_OK as i64),
        ("HALO_STATUS_BAD_LABEL", STATUS_BAD_LABEL as i64),
        ("HALO_STATUS_NONFINITE", STATUS_NONFINITE as i64),
        ("HALO_STATUS_NONFINITE_GRAD", STATUS_NONFINITE_GRAD as i64),
        ("HALO_STATUS_EMPTY_SEQUENCE", STATUS_EMPTY_SEQUENCE as i64),
        (
            "HALO_STATUS_BWD_NONFINITE_LOGITS",
            STATUS_BWD_NONFINITE_LOGITS as i64,
        ),
        (
            "HALO_STATUS_BWD_INCONSISTENT_LSE",
            STATUS_BWD_INCONSISTENT_LSE as i64,
        ),
        ("HALO_STATUS_BWD_OVERFLOW", STATUS_BWD_OVERFLOW as i64),
        ("HALO_KTO_LOSS_KTO", KTO_LOSS_KTO as i64),
        (
            "HALO_KTO_LOSS_APO_ZERO_UNPAIRED",
            KTO_LOSS_APO_ZERO_UNPAIRED as i64,
        ),
        ("HALO_KL_FROM_PAIRS", KL_FROM_PAIRS as i64),
        ("HALO_KL_FROM_SUM", KL_FROM_SUM as i64),
        ("HALO_KL_ZERO", KL_ZERO as i64),
        ("HALO_KTO_OUT_LOSS", kto_out::LOSS as i64),
        ("HALO_KTO_OUT_Z0", kto_out::Z0 as i64),
        ("HALO_KTO_OUT_KL_SUM", kto_out::KL_SUM as i64),
        ("HALO_KTO_OUT_KL_COUNT", kto_out::KL_COUNT as i64),
        (
            "HALO_KTO_OUT_CHOSEN_REWARD_SUM",
            kto_out::CHOSEN_REWARD_SUM as i64,
        ),
        (
            "HALO_KTO_OUT_REJECTED_REWARD_SUM",
            kto_out::REJECTED_REWARD_SUM as i64,
        ),
        ("HALO_KTO_OUT_CHOSEN_COUNT", kto_out::CHOSEN_COUNT as i64),
        (
            "HALO_KTO_OUT_REJECTED_COUNT",
            kto_out::REJECTED_COUNT as i64,
        ),
        (
            "HALO_KTO_OUT_CHOSEN_LOGP_SUM",
            kto_out::CHOSEN_LOGP_SUM as i64,
        ),
        (
            "HALO_KTO_OUT_REJECTED_LOGP_SUM",
            kto_out::REJECTED_LOGP_SUM as i64,
        ),
        ("HALO_KTO_OUT_LEN", kto_out::LEN as i64),
        ("HALO_DPO_LOSS_SIGMOID", DPO_LOSS_SIGMOID as i64),
        ("HALO_DPO_LOSS_ROBUST", DPO_LOSS_ROBUST as i64),
        ("HALO_DPO_LOSS_HINGE", DPO_LOSS_HINGE as i64),
        ("HALO_DPO_LOSS_IPO", DPO_LOSS_IPO as i64),
        ("HALO_DPO_LOSS_APO_ZERO", DPO_LOSS_APO_ZERO as i64),
        ("HALO_DPO_LOSS_APO_DOWN", DPO_LOSS_APO_DOWN as i64),
        ("HALO_DPO_LOSS_EXO_PAIR", DPO_LOSS_EXO_PAIR as i64),
        ("HALO_DPO_LOSS_NCA_PAIR", DPO_LOSS_NCA_PAIR as i64),
        ("HALO_DPO_LOSS_BCO_PAIR", DPO_LOSS_BCO_PAIR as i64),
        ("HALO_DPO_LOSS_SPPO_HARD", DPO_LOSS_SPPO_HARD as i64),
        ("HALO_DPO_LOSS_AOT", DPO_LOSS_AOT as i64),
        ("HALO_DPO_LOSS_AOT_UNPAIRED", DPO_LOSS_AOT_UNPAIRED as i64),
        ("HALO_DPO_LOSS_DISCOPOP", DPO_LOSS_DISCOPOP as i64),
        ("HALO_DPO_LOSS_SFT", DPO_LOSS_SFT as i64),
        ("HALO_DPO_LOSS_SIGMOID_NORM", DPO_LOSS_SIGMOID_NORM as i64),
        ("HALO_DPO_F_REVERSE_KL", DPO_F_REVERSE_KL as i64),
        ("HALO_DPO_F_FORWARD_KL", DPO_F_FORWARD_KL as i64),
        ("HALO_DPO_F_JS_DIVERGENCE", DPO_F_JS_DIVERGENCE as i64),
        ("HALO_DPO_F_ALPHA", DPO_F_ALPHA as i64),
        ("HALO_DPO_OUT_LOSS", dpo_out::LOSS as i64),
        (
            "HALO_DPO_OUT_CHOSEN_REWARD_SUM",
            dpo_out::CHOSEN_REWARD_SUM as i64,
        ),
        (
            "HALO_DPO_OUT_REJECTED_REWARD_SUM",
            dpo_out::REJECTED_REWARD_SUM as i64,
        ),
        (
            "HALO_DPO_OUT_ACCURACY_COUNT",
            dpo_out::ACCURACY_COUNT as i64,
        ),
        ("HALO_DPO_OUT_MARGIN_SUM", dpo_out::MARGIN_SUM as i64),
        (
            "HALO_DPO_OUT_CHOSEN_LOGP_SUM",
            dpo_out::CHOSEN_LOGP_SUM as i64,
        ),
        (
            "HALO_DPO_OUT_REJECTED_LOGP_SUM",
            dpo_out::REJECTED_LOGP_SUM as i64,
        ),
        ("HALO_DPO_OUT_LEN", dpo_out::LEN as i64),
    ];
    for &(name, rust) in pairs {
        assert_eq!(c(name), rust, "{name}");
    }
    assert_eq!(abi_query("NoSuchThing").expect("loads"), None);
}

#[test]
fn rows_per_block_rule_matches_the_c_header() {
    for vocab in (1..=9000).chain([32_000, 50_257, 128_256, 256_000]) {
        let rpb = token_rows_per_block(vocab);
        assert_eq!(
            rpb,
            c_token_rows_per_block(vocab).expect("loads"),
            "vocab {vocab}"
        );
        assert!(rpb >= 1 && (rpb as u32).is_power_of_two() && rpb <= 64);
    }
    assert_eq!(token_rows_per_block(50), 64);
    assert_eq!(token_rows_per_block(32_000), 1);
}
