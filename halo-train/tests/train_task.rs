//! Tokenizer round trip, the arithmetic judge, and the generated data sets.

use halo_train::train::arithmetic_task::parse_prompt;
use halo_train::train::{judge, ArithmeticTask, ByteTokenizer, PreferenceRow, Verdict};

#[test]
fn byte_tokenizer_round_trips_any_text_and_stops_at_eos() {
    let tok = ByteTokenizer;
    for text in ["", "23+58=81", "héllo wörld \u{1F600}\n\t\"", "\0\u{7f}"] {
        let ids = tok.encode(text);
        assert_eq!(ids.len(), text.len());
        assert!(ids.iter().all(|&id| (id as usize) < tok.vocab_size()));
        assert_eq!(tok.decode(&ids), text);
    }
    let mut ids = tok.encode("81");
    ids.push(ByteTokenizer::EOS);
    ids.extend(tok.encode("junk"));
    assert_eq!(tok.decode(&ids), "81");
    // Invalid UTF-8 from a model becomes replacement characters, not a panic.
    assert_eq!(tok.decode(&[0xff, b'7' as u32]), "\u{fffd}7");
}

#[test]
fn judge_accepts_exactly_the_canonical_sum() {
    assert_eq!(judge("23+58=", "81").unwrap(), Verdict::Correct);
    assert_eq!(judge("0+0=", "0").unwrap(), Verdict::Correct);
    assert_eq!(judge("49+49=", "98").unwrap(), Verdict::Correct);
    assert_eq!(
        judge("23+58=", "71").unwrap(),
        Verdict::Wrong {
            expected: 81,
            got: 71
        }
    );
    assert_eq!(
        judge("23+58=", "810").unwrap(),
        Verdict::Wrong {
            expected: 81,
            got: 810
        }
    );
    for garbled in [
        "", "081", " 81", "81 ", "8a", "-81", "+81", "8 1", "\u{fffd}", "81\n",
    ] {
        assert_eq!(
            judge("23+58=", garbled).unwrap(),
            Verdict::Garbled,
            "{garbled:?}"
        );
    }
    assert!(judge("23+58=", "81").unwrap().is_desirable());
    assert!(!judge("23+58=", "82").unwrap().is_desirable());
    for bad_prompt in ["23+58", "23-58=", "+58=", "a+b=", "023+5="] {
        assert!(judge(bad_prompt, "81").is_err(), "{bad_prompt:?}");
    }
    assert_eq!(parse_prompt("7+12="), Some((7, 12)));
}

#[test]
fn generated_data_is_judge_labelled_and_evaluation_prompts_are_held_out() {
    let task = ArithmeticTask {
        operand_limit: 20,
        n_pretrain: 2000,
        carry_error_rate: 0.6,
        noise_rate: 0.1,
        n_sft: 500,
        n_preferences: 300,
        n_eval: 50,
    };
    let data = task.generate(3).unwrap();
    assert_eq!(data.eval_prompts.len(), 50);
    let eval: std::collections::HashSet<&String> = data.eval_prompts.iter().collect();
    assert!(data.pretrain.iter().all(|(p, _)| !eval.contains(p)));
    // Carry prompts forget the carry at carry_error_rate; the others are noisy at noise_rate.
    let (mut carry, mut carry_dropped, mut plain, mut plain_wrong) = (0, 0, 0, 0);
    for (p, c) in &data.pretrain {
        let (a, b) = parse_prompt(p).unwrap();
        let got: u64 = c.parse().unwrap();
        if a % 10 + b % 10 >= 10 {
            carry += 1;
            if got == a + b - 10 {
                carry_dropped += 1;
            } else {
                assert_eq!(got, a + b);
            }
        } else {
            plain += 1;
            if got != a + b {
                plain_wrong += 1;
                assert!([1, 2, 10].contains(&got.abs_diff(a + b)), "{p}{c}");
            }
        }
    }
    let carry_rate = carry_dropped as f64 / carry as f64;
    let noise = plain_wrong as f64 / plain as f64;
    assert!(
        (carry_rate - 0.6).abs() < 0.06,
        "carry error rate {carry_rate}"
    );
    assert!((noise - 0.1).abs() < 0.04, "noise rate {noise}");
    assert_eq!(ArithmeticTask::dropped_carry(38, 47), Some(75));
    assert_eq!(ArithmeticTask::dropped_carry(31, 47), None);
    for row in &data.sft {
        let PreferenceRow::Unpaired(e) = row else {
            panic!("sft rows are unpaired")
        };
        assert!(!eval.contains(&e.prompt));
        assert_eq!(
            e.desirable,
            judge(&e.prompt, &e.completion).unwrap().is_desirable()
        );
    }
    for row in &data.preferences {
        let PreferenceRow::Paired(p) = row else {
            panic!("preference rows are paired")
        };
        assert!(!eval.contains(&p.prompt));
        assert_eq!(judge(&p.prompt, &p.chosen).unwrap(), Verdict::Correct);
        assert!(matches!(
            judge(&p.prompt, &p.rejected).unwrap(),
            Verdict::Wrong { .. }
        ));
        // The rejected answer is the typical mistake: the dropped carry where there is one.
        let (a, b) = parse_prompt(&p.prompt).unwrap();
        if let Some(mistake) = ArithmeticTask::dropped_carry(a, b) {
            assert_eq!(p.rejected, mistake.to_string());
        }
    }
    // Same seed, same data; other seed, other data.
    assert_eq!(task.generate(3).unwrap().eval_prompts, data.eval_prompts);
    assert_ne!(task.generate(4).unwrap().eval_prompts, data.eval_prompts);
}

#[test]
fn error_breakdown_separates_carrying_prompts_and_counts_offsets() {
    use halo_train::train::ErrorBreakdown;
    let judged: Vec<(String, Verdict)> = [
        ("38+47=", "75"),
        ("38+47=", "85"),
        ("9+1=", "0"),
        ("12+13=", "25"),
        ("12+30=", "52"),
        ("20+22=", "52"),
        ("5+4=", "x"),
    ]
    .iter()
    .map(|&(p, c)| (p.to_string(), judge(p, c).unwrap()))
    .collect();
    let b = ErrorBreakdown::from_verdicts(judged.iter().map(|(p, v)| (p.as_str(), v))).unwrap();
    // 38+47 and 9+1 carry in the units column; 12+13, 12+30, 20+22, 5+4 do not.
    assert_eq!(b.carrying, (1, 3));
    assert_eq!(b.non_carrying, (1, 4));
    assert_eq!(b.garbled, 1);
    // Ties in count: carrying first.
    assert_eq!(
        b.most_common_wrong(5),
        vec![((true, -10), 2), ((false, 10), 2)]
    );
    assert_eq!(b.most_common_wrong(1), vec![((true, -10), 2)]);
    let text = b.to_string();
    assert!(
        text.starts_with("carrying 1/3, other 1/4, garbled 1"),
        "{text}"
    );
    assert!(text.contains("other+10 x2"), "{text}");
    assert!(ErrorBreakdown::from_verdicts([("38-47=", &Verdict::Garbled)]).is_err());
}

#[test]
fn the_task_defaults_are_the_training_examples() {
    use halo_train::train::TrainArgs;
    let (task, args) = (ArithmeticTask::default(), TrainArgs::default());
    assert_eq!(task.operand_limit, args.operand_limit);
    assert_eq!(task.n_pretrain, args.pretrain_lines);
    assert_eq!(task.n_sft, args.sft_lines);
    assert_eq!(task.n_eval, args.n_eval);
    assert_eq!(task.carry_error_rate, args.carry_error_rate);
    assert_eq!(task.noise_rate, args.noise_rate);
}
