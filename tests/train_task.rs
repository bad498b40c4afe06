//! Tokenizer round trip, the arithmetic judge, and the generated data sets.

use halo_kernels::train::arithmetic_task::parse_prompt;
use halo_kernels::train::{judge, ArithmeticTask, ByteTokenizer, PreferenceRow, Verdict};

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
        error_rate: 0.3,
        n_sft: 500,
        n_preferences: 300,
        n_eval: 50,
    };
    let data = task.generate(3).unwrap();
    assert_eq!(data.eval_prompts.len(), 50);
    let eval: std::collections::HashSet<&String> = data.eval_prompts.iter().collect();
    assert!(data.pretrain.iter().all(|(p, _)| !eval.contains(p)));
    let wrong = data
        .pretrain
        .iter()
        .filter(|(p, c)| !judge(p, c).unwrap().is_desirable())
        .count();
    let rate = wrong as f64 / data.pretrain.len() as f64;
    assert!((rate - 0.3).abs() < 0.05, "error rate {rate}");
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
    }
    // Same seed, same data; other seed, other data.
    assert_eq!(task.generate(3).unwrap().eval_prompts, data.eval_prompts);
    assert_ne!(task.generate(4).unwrap().eval_prompts, data.eval_prompts);
}
