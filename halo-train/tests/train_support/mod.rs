//! Shared by the end-to-end training tests: the settings of a run small enough for a test, and
//! the check of its summary line.

use std::path::Path;

use halo_train::train::config::PreferenceSource;
use halo_train::train::TrainArgs;

/// A run of a few steps on a 1-layer, 32-wide model over operands below 20, with DPO; synthetic
/// preference pairs, because a 6-step model rarely answers correctly and sampled pairs would be
/// too few.
pub fn tiny_run_args(output_dir: &Path) -> TrainArgs {
    TrainArgs {
        output_dir: Some(output_dir.to_path_buf()),
        n_layer: 1,
        n_head: 2,
        n_embd: 32,
        operand_limit: 20,
        n_eval: 20,
        pretrain_steps: 6,
        sft_steps: 3,
        kto_steps: 3,
        batch_size: 4,
        pretrain_batch_size: 8,
        evals_per_stage: 1,
        run_dpo: true,
        preference_data: PreferenceSource::Synthetic,
        ..TrainArgs::default()
    }
}

/// Asserts that `line` is exactly `desirable_rate base=<a> sft=<x> kto=<y> dpo=<z>` with every
/// value a fraction in [0, 1].
pub fn assert_full_summary_line(line: &str) {
    let fields: Vec<&str> = line.split(' ').collect();
    assert_eq!(fields.len(), 5, "{line}");
    assert_eq!(fields[0], "desirable_rate", "{line}");
    for (field, name) in fields[1..].iter().zip(["base", "sft", "kto", "dpo"]) {
        let value: f64 = field
            .strip_prefix(&format!("{name}="))
            .unwrap_or_else(|| panic!("{line}"))
            .parse()
            .unwrap_or_else(|_| panic!("{line}"));
        assert!((0.0..=1.0).contains(&value), "{line}");
    }
}
