//! Plain f64 reference implementations of every loss, transcribed literally from the TRL formulas
//! with no attention to numerics, and a central finite-difference helper. Tests (here and in other
//! modules, e.g. the CUDA backend) compare the optimised losses against these on moderate inputs;
//! they are not meant for extreme values (`exp` may overflow beyond |x| ≈ 700).

/// `1 / (1 + e^{−x})`, literally.
pub fn sigmoid_ref(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// `log σ(x) = −log(1 + e^{−x})`.
pub fn log_sigmoid_ref(x: f64) -> f64 {
    -(-x).exp().ln_1p()
}

/// `max(0, mean(policy − reference))` over the KL pairs.
pub fn kto_z0_ref(kl_policy: &[f64], kl_reference: &[f64]) -> f64 {
    let mut total = 0.0;
    for j in 0..kl_policy.len() {
        total += kl_policy[j] - kl_reference[j];
    }
    (total / kl_policy.len() as f64).max(0.0)
}

/// TRL `kto_loss` + `nanmean`: `apo_zero_unpaired` when `apo` is set (then `z0` is unused).
#[allow(clippy::too_many_arguments)]
pub fn kto_loss_ref(
    policy: &[f64],
    reference: &[f64],
    desirable: &[bool],
    z0: f64,
    beta: f64,
    desirable_weight: f64,
    undesirable_weight: f64,
    apo: bool,
) -> f64 {
    let mut losses = Vec::new();
    for i in 0..policy.len() {
        let logratio = policy[i] - reference[i];
        let loss = match (desirable[i], apo) {
            (true, false) => desirable_weight * (1.0 - sigmoid_ref(beta * (logratio - z0))),
            (false, false) => undesirable_weight * (1.0 - sigmoid_ref(beta * (z0 - logratio))),
            (true, true) => desirable_weight * (1.0 - sigmoid_ref(beta * logratio)),
            (false, true) => undesirable_weight * sigmoid_ref(beta * logratio),
        };
        losses.push(loss);
    }
    losses.iter().sum::<f64>() / losses.len() as f64
}

/// TRL `DPOTrainer._compute_loss` loss types by name ("sigmoid", "robust", "hinge", "ipo",
/// "apo_zero", "apo_down", "exo_pair", "nca_pair", "bco_pair", "sppo_hard", "aot", "aot_unpaired",
/// "discopop" with τ = 0.05, "sft", "sigmoid_norm"). For "ipo" and "sigmoid_norm" pass the token
/// counts (every log-prob is divided by its count first); for "sft" the chosen counts.
#[allow(clippy::too_many_arguments)]
pub fn dpo_loss_ref(
    loss_type: &str,
    beta: f64,
    label_smoothing: f64,
    policy_chosen: &[f64],
    policy_rejected: &[f64],
    reference_chosen: &[f64],
    reference_rejected: &[f64],
    chosen_counts: &[u32],
    rejected_counts: &[u32],
) -> f64 {
    dpo_loss_ref_f_divergence(
        loss_type,
        beta,
        label_smoothing,
        0.05,
        "reverse_kl",
        0.5,
        policy_chosen,
        policy_rejected,
        reference_chosen,
        reference_rejected,
        chosen_counts,
        rejected_counts,
    )
}

/// TRL 1.16's f-DPO score of a log-ratio: `f_divergence` is "reverse_kl", "forward_kl",
/// "js_divergence" or "alpha_divergence" (with `alpha`, its exponent clamped at 80).
pub fn f_divergence_score_ref(f_divergence: &str, alpha: f64, logratio: f64) -> f64 {
    match f_divergence {
        "reverse_kl" => logratio,
        "forward_kl" => 1.0 - (-logratio).exp(),
        "js_divergence" => 2f64.ln() + log_sigmoid_ref(logratio),
        "alpha_divergence" if (alpha - 1.0).abs() < 1e-6 => logratio,
        "alpha_divergence" => {
            let t = ((alpha - 1.0) * logratio).min(80.0);
            (t.exp() - 1.0) / (alpha - 1.0)
        }
        other => panic!("unknown f-divergence {other}"),
    }
}

/// [`dpo_loss_ref`] with DiscoPOP's τ and under an f-divergence (TRL `f_divergence_type`,
/// `f_alpha_divergence_coef`), transcribed from TRL 1.16 `DPOTrainer._compute_loss`: the scores
/// replace the log-ratios in the loss types that use `delta_score` / `*_scores`; IPO and
/// sigmoid_norm divide the scores by the token counts.
#[allow(clippy::too_many_arguments)]
pub fn dpo_loss_ref_f_divergence(
    loss_type: &str,
    beta: f64,
    label_smoothing: f64,
    discopop_tau: f64,
    f_divergence: &str,
    alpha: f64,
    policy_chosen: &[f64],
    policy_rejected: &[f64],
    reference_chosen: &[f64],
    reference_rejected: &[f64],
    chosen_counts: &[u32],
    rejected_counts: &[u32],
) -> f64 {
    let n = policy_chosen.len();
    let eps = label_smoothing;
    let smoothed = |delta: f64| {
        -log_sigmoid_ref(beta * delta) * (1.0 - eps) - log_sigmoid_ref(-beta * delta) * eps
    };
    // AOT: the smoothed logistic of the k-th smallest of `a` against the k-th smallest of `b`.
    let sorted_loss = |a: &dyn Fn(usize) -> f64, b: &dyn Fn(usize) -> f64| {
        let sorted = |f: &dyn Fn(usize) -> f64| {
            let mut v: Vec<f64> = (0..n).map(f).collect();
            v.sort_by(f64::total_cmp);
            v
        };
        let (a, b) = (sorted(a), sorted(b));
        (0..n).map(|k| smoothed(a[k] - b[k])).sum::<f64>() / n as f64
    };
    match loss_type {
        "aot" => {
            return sorted_loss(&|i| policy_chosen[i] - policy_rejected[i], &|i| {
                reference_chosen[i] - reference_rejected[i]
            })
        }
        "aot_unpaired" => {
            return sorted_loss(&|i| policy_chosen[i] - reference_chosen[i], &|i| {
                policy_rejected[i] - reference_rejected[i]
            })
        }
        "sft" => return chosen_nll_ref(policy_chosen, chosen_counts),
        _ => {}
    }
    let mut total = 0.0;
    for i in 0..n {
        let chosen_logratios = policy_chosen[i] - reference_chosen[i];
        let rejected_logratios = policy_rejected[i] - reference_rejected[i];
        let chosen_scores = f_divergence_score_ref(f_divergence, alpha, chosen_logratios);
        let rejected_scores = f_divergence_score_ref(f_divergence, alpha, rejected_logratios);
        let delta_score = chosen_scores - rejected_scores;
        let normalised_delta = chosen_scores / chosen_counts.get(i).copied().unwrap_or(1) as f64
            - rejected_scores / rejected_counts.get(i).copied().unwrap_or(1) as f64;
        total += match loss_type {
            "sigmoid" => smoothed(delta_score),
            "sigmoid_norm" => -log_sigmoid_ref(beta * normalised_delta),
            "robust" => {
                (-log_sigmoid_ref(beta * delta_score) * (1.0 - eps)
                    + log_sigmoid_ref(-beta * delta_score) * eps)
                    / (1.0 - 2.0 * eps)
            }
            "hinge" => (1.0 - beta * delta_score).max(0.0),
            "ipo" => (normalised_delta - 1.0 / (2.0 * beta)).powi(2),
            "apo_zero" => {
                (1.0 - sigmoid_ref(beta * chosen_logratios))
                    + sigmoid_ref(beta * rejected_logratios)
            }
            "apo_down" => {
                sigmoid_ref(beta * chosen_logratios)
                    + (1.0 - sigmoid_ref(beta * (chosen_logratios - rejected_logratios)))
            }
            "exo_pair" => {
                let x = beta * delta_score;
                sigmoid_ref(x) * (log_sigmoid_ref(x) - (-eps).ln_1p())
                    + sigmoid_ref(-x) * (log_sigmoid_ref(-x) - eps.ln())
            }
            "nca_pair" => {
                let (c, r) = (beta * chosen_logratios, beta * rejected_logratios);
                -log_sigmoid_ref(c) - 0.5 * log_sigmoid_ref(-c) - 0.5 * log_sigmoid_ref(-r)
            }
            "bco_pair" => {
                -log_sigmoid_ref(beta * chosen_logratios)
                    - log_sigmoid_ref(-beta * rejected_logratios)
            }
            "sppo_hard" => {
                (chosen_logratios - 0.5 / beta).powi(2) + (rejected_logratios + 0.5 / beta).powi(2)
            }
            "discopop" => {
                let x = delta_score * beta;
                let modulation = sigmoid_ref(x / discopop_tau);
                -log_sigmoid_ref(x) * (1.0 - modulation) + (-x).exp() * modulation
            }
            other => panic!("unknown loss type {other}"),
        };
    }
    total / n as f64
}

/// Token-mean NLL over all chosen tokens: `−Σ sum_c / Σ count_c`.
pub fn chosen_nll_ref(policy_chosen: &[f64], chosen_counts: &[u32]) -> f64 {
    let tokens: f64 = chosen_counts.iter().map(|&c| c as f64).sum();
    -policy_chosen.iter().sum::<f64>() / tokens
}

/// TRL `cpo_loss` with `loss_type="simpo"`, plus `nll_weight · NLL` (TRL `cpo_alpha`).
#[allow(clippy::too_many_arguments)]
pub fn simpo_loss_ref(
    beta: f64,
    gamma: f64,
    label_smoothing: f64,
    nll_weight: f64,
    policy_chosen: &[f64],
    policy_rejected: &[f64],
    chosen_counts: &[u32],
    rejected_counts: &[u32],
) -> f64 {
    let n = policy_chosen.len();
    let mut total = 0.0;
    for i in 0..n {
        let c = policy_chosen[i] / chosen_counts[i] as f64;
        let r = policy_rejected[i] / rejected_counts[i] as f64;
        let logits = (c - r) - gamma / beta;
        total += -log_sigmoid_ref(beta * logits) * (1.0 - label_smoothing)
            - log_sigmoid_ref(-beta * logits) * label_smoothing;
    }
    total / n as f64 + nll_weight * chosen_nll_ref(policy_chosen, chosen_counts)
}

/// TRL `odds_ratio_loss` + NLL: `NLL − β mean(logσ(log_odds))`.
pub fn orpo_loss_ref(
    beta: f64,
    policy_chosen: &[f64],
    policy_rejected: &[f64],
    chosen_counts: &[u32],
    rejected_counts: &[u32],
) -> f64 {
    let n = policy_chosen.len();
    let mut ratio = 0.0;
    for i in 0..n {
        let c = policy_chosen[i] / chosen_counts[i] as f64;
        let r = policy_rejected[i] / rejected_counts[i] as f64;
        let log_odds = (c - r) - ((-c.exp()).ln_1p() - (-r.exp()).ln_1p());
        ratio += log_sigmoid_ref(log_odds);
    }
    chosen_nll_ref(policy_chosen, chosen_counts) - beta * ratio / n as f64
}

/// Central difference `(f(x + h e_i) − f(x − h e_i)) / 2h` of `f` at `x` along coordinate `i`.
pub fn central_difference(f: impl Fn(&[f64]) -> f64, x: &[f64], i: usize, h: f64) -> f64 {
    let mut plus = x.to_vec();
    let mut minus = x.to_vec();
    plus[i] += h;
    minus[i] -= h;
    (f(&plus) - f(&minus)) / (2.0 * h)
}

/// The full central-difference gradient of `f` at `x`.
pub fn finite_difference_gradient(f: impl Fn(&[f64]) -> f64, x: &[f64], h: f64) -> Vec<f64> {
    (0..x.len())
        .map(|i| central_difference(&f, x, i, h))
        .collect()
}
