//! Padded token batches, completion-only targets, and KTO's mismatched KL pairs.

use halo_kernels::IGNORE_INDEX;
use halo_train::train::batching::dpo_batch;
use halo_train::train::{
    kl_partners, kto_batch, token_batch, ByteTokenizer, EpochSampler, PairedExample, TargetSpan,
    TextTokenizer, UnpairedExample,
};

const EOS: u32 = ByteTokenizer::EOS;
const BYTES: TextTokenizer = TextTokenizer::Byte;

#[test]
fn completion_targets_cover_exactly_the_completion_and_its_eos() {
    let b = token_batch(
        &BYTES,
        &[("1+2=", "3"), ("10+20=", "30")],
        TargetSpan::CompletionOnly,
        32,
    )
    .unwrap();
    assert_eq!((b.batch, b.seq), (2, 10)); // [EOS] 10+20= 30 [EOS]
    let row0 = &b.input_ids[..10];
    assert_eq!(row0, &[EOS, 49, 43, 50, 61, 51, EOS, EOS, EOS, EOS]);
    let t0 = &b.targets[..10];
    // Position 4 ('=') predicts '3', position 5 ('3') predicts EOS; nothing else counts.
    let i = IGNORE_INDEX;
    assert_eq!(t0, &[i, i, i, i, 51, EOS as i32, i, i, i, i]);
    let t1 = &b.targets[10..];
    assert_eq!(t1, &[i, i, i, i, i, i, 51, 48, EOS as i32, i]);
}

#[test]
fn language_model_targets_cover_every_next_token() {
    let b = token_batch(&BYTES, &[("ab", "c")], TargetSpan::Everything, 32).unwrap();
    assert_eq!(b.input_ids, vec![EOS, 97, 98, 99, EOS]);
    assert_eq!(b.targets, vec![97, 98, 99, EOS as i32, IGNORE_INDEX]);
}

#[test]
fn long_examples_keep_the_end_of_the_prompt() {
    let b = token_batch(&BYTES, &[("abcdefgh", "xy")], TargetSpan::CompletionOnly, 6).unwrap();
    assert_eq!(b.input_ids, vec![102, 103, 104, 120, 121, EOS]);
    let i = IGNORE_INDEX;
    assert_eq!(b.targets, vec![i, i, 120, 121, EOS as i32, i]);
    assert!(token_batch(&BYTES, &[], TargetSpan::Everything, 8).is_err());
    assert!(token_batch(&BYTES, &[("a", "b")], TargetSpan::Everything, 1).is_err());
}

#[test]
fn kl_rotation_mismatches_every_example_when_batch_exceeds_one() {
    for batch in 2..40 {
        let partners = kl_partners(batch).unwrap();
        let mut seen = vec![false; batch];
        for (i, &j) in partners.iter().enumerate() {
            assert_ne!(i, j, "batch {batch}: example {i} keeps its own completion");
            assert!(!seen[j], "batch {batch}: completion {j} used twice");
            seen[j] = true;
        }
    }
    // A batch of one cannot be mismatched: it is an error, not a silent matched pair.
    assert!(kl_partners(1).is_err());
    assert!(kl_partners(0).is_err());
}

#[test]
fn kto_batch_pairs_each_prompt_with_another_examples_completion() {
    let examples: Vec<UnpairedExample> = (0..5)
        .map(|i| UnpairedExample {
            prompt: format!("{i}+{i}="),
            completion: format!("{}", 10 * i + 7),
            desirable: i % 2 == 0,
        })
        .collect();
    let refs: Vec<&UnpairedExample> = examples.iter().collect();
    let batch = kto_batch(&BYTES, &refs, 32).unwrap();
    assert_eq!(batch.desirable, vec![true, false, true, false, true]);
    let tok = ByteTokenizer;
    let row_text = |b: &halo_train::train::TokenBatch, r: usize| {
        let ids = &b.input_ids[r * b.seq + 1..(r + 1) * b.seq];
        tok.decode(ids)
    };
    for i in 0..5 {
        assert_eq!(
            row_text(&batch.examples, i),
            format!("{}{}", examples[i].prompt, examples[i].completion)
        );
        let partner = &examples[(i + 4) % 5];
        assert_eq!(
            row_text(&batch.kl_pairs, i),
            format!("{}{}", examples[i].prompt, partner.completion)
        );
        assert_ne!(partner.completion, examples[i].completion);
    }
    assert!(kto_batch(&BYTES, &refs[..1], 32).is_err());
}

#[test]
fn dpo_batch_puts_chosen_rows_before_rejected_rows() {
    let pairs = [PairedExample {
        prompt: "1+1=".into(),
        chosen: "2".into(),
        rejected: "3".into(),
    }];
    let refs: Vec<&PairedExample> = pairs.iter().collect();
    let b = dpo_batch(&BYTES, &refs, 16).unwrap();
    assert_eq!(b.batch, 2);
    assert_eq!(b.input_ids[5], b'2' as u32);
    assert_eq!(b.input_ids[b.seq + 5], b'3' as u32);
}

#[test]
fn epoch_sampler_visits_every_index_once_per_epoch() {
    let mut sampler = EpochSampler::new(10, 1).unwrap();
    let mut first_epoch: Vec<usize> = sampler.next_batch(4);
    first_epoch.extend(sampler.next_batch(6));
    let mut sorted = first_epoch.clone();
    sorted.sort();
    assert_eq!(sorted, (0..10).collect::<Vec<_>>());
    assert_ne!(first_epoch, (0..10).collect::<Vec<_>>());
    assert_eq!(sampler.next_batch(25).len(), 25);
    assert!(EpochSampler::new(0, 1).is_err());
}
