//! JSONL loading: both TRL text forms, paired → unpaired conversion, and errors that name the line.

use halo_kernels::HaloError;
use halo_train::train::data::{keep_desirable_fraction, paired_only, write_jsonl};
use halo_train::train::{
    load_jsonl, parse_jsonl, to_unpaired, PairedExample, PreferenceRow, UnpairedExample,
};

fn unpaired(prompt: &str, completion: &str, desirable: bool) -> UnpairedExample {
    UnpairedExample {
        prompt: prompt.into(),
        completion: completion.into(),
        desirable,
    }
}

#[test]
fn parses_unpaired_and_paired_lines_and_skips_blank_ones() {
    let text = concat!(
        r#"{"prompt": "1+2=", "completion": "3", "label": true}"#,
        "\n\n",
        r#"{"prompt": "héllo \"q\"", "chosen": "a\nb", "rejected": "", "extra": 5}"#,
        "\n",
        r#"{"label": false, "completion": "4", "prompt": "1+2="}"#,
        "\n"
    );
    let rows = parse_jsonl(text, "mem.jsonl").unwrap();
    assert_eq!(
        rows,
        vec![
            PreferenceRow::Unpaired(unpaired("1+2=", "3", true)),
            PreferenceRow::Paired(PairedExample {
                prompt: "héllo \"q\"".into(),
                chosen: "a\nb".into(),
                rejected: "".into(),
            }),
            PreferenceRow::Unpaired(unpaired("1+2=", "4", false)),
        ]
    );
}

#[test]
fn paired_rows_become_one_desirable_and_one_undesirable_example_each() {
    let pairs: Vec<PreferenceRow> = (0..50)
        .map(|i| {
            PreferenceRow::Paired(PairedExample {
                prompt: format!("p{i}"),
                chosen: format!("good{i}"),
                rejected: format!("bad{i}"),
            })
        })
        .collect();
    let examples = to_unpaired(&pairs, 7);
    assert_eq!(examples.len(), 100);
    for i in 0..50 {
        let p = format!("p{i}");
        let mine: Vec<&UnpairedExample> = examples.iter().filter(|e| e.prompt == p).collect();
        assert_eq!(mine.len(), 2);
        assert!(mine.contains(&&unpaired(&p, &format!("good{i}"), true)));
        assert!(mine.contains(&&unpaired(&p, &format!("bad{i}"), false)));
    }
    // Shuffled: the order is not the interleaved input order, and depends on the seed.
    let interleaved: Vec<bool> = (0..100).map(|i| i % 2 == 0).collect();
    let labels: Vec<bool> = examples.iter().map(|e| e.desirable).collect();
    assert_ne!(labels, interleaved);
    assert_eq!(examples, to_unpaired(&pairs, 7));
    assert_ne!(examples, to_unpaired(&pairs, 8));
}

#[test]
fn bad_lines_are_errors_naming_file_and_line() {
    let cases = [
        (
            "{\"prompt\": \"a\", \"completion\": \"b\", \"label\": true}\nnot json\n",
            2,
            "invalid JSON",
        ),
        ("\n\n[1, 2]\n", 3, "object"),
        ("{\"prompt\": \"a\", \"completion\": \"b\"}\n", 1, "label"),
        (
            "{\"prompt\": \"a\", \"completion\": \"b\", \"label\": 1}\n",
            1,
            "label",
        ),
        ("{\"prompt\": \"a\", \"chosen\": \"b\"}\n", 1, "rejected"),
        ("{\"completion\": \"b\", \"label\": true}\n", 1, "prompt"),
        (
            "{\"prompt\": 3, \"completion\": \"b\", \"label\": true}\n",
            1,
            "prompt",
        ),
        (
            "{\"prompt\": [{\"role\": \"user\"}], \"completion\": \"b\", \"label\": true}\n",
            1,
            "conversational",
        ),
        ("{\"prompt\": \"a\", \"text\": \"b\"}\n", 1, "neither"),
    ];
    for (text, line, needle) in cases {
        match parse_jsonl(text, "data/x.jsonl") {
            Err(err @ HaloError::Dataset { .. }) => {
                let HaloError::Dataset {
                    file,
                    line: got,
                    reason,
                } = &err
                else {
                    unreachable!()
                };
                assert_eq!(file, "data/x.jsonl");
                assert_eq!(*got, line, "{text:?}: {err}");
                assert!(reason.contains(needle), "{text:?}: {reason}");
                assert!(err
                    .to_string()
                    .starts_with(&format!("data/x.jsonl:{line}:")));
            }
            other => panic!("{text:?}: expected a dataset error, got {other:?}"),
        }
    }
}

#[test]
fn files_round_trip_and_missing_files_are_io_errors() {
    let dir = std::env::temp_dir().join(format!("halo-train-data-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("rows.jsonl");
    let rows = vec![
        PreferenceRow::Unpaired(unpaired("x\ty", "z\u{1F600}", false)),
        PreferenceRow::Paired(PairedExample {
            prompt: "p".into(),
            chosen: "c".into(),
            rejected: "r".into(),
        }),
    ];
    write_jsonl(&path, &rows).unwrap();
    assert_eq!(load_jsonl(&path).unwrap(), rows);
    assert_eq!(paired_only(&rows, "rows").unwrap().len(), 1);
    assert!(paired_only(&rows[..1], "rows").is_err());
    assert!(matches!(
        load_jsonl(&dir.join("missing.jsonl")),
        Err(HaloError::Io { .. })
    ));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn keep_desirable_fraction_drops_only_desirable_examples() {
    let examples: Vec<UnpairedExample> = (0..40)
        .map(|i| unpaired(&format!("p{i}"), "c", i % 4 != 0))
        .collect(); // 30 desirable, 10 undesirable
    let kept = keep_desirable_fraction(examples.clone(), 0.1);
    assert_eq!(kept.iter().filter(|e| e.desirable).count(), 3);
    assert_eq!(kept.iter().filter(|e| !e.desirable).count(), 10);
    assert_eq!(keep_desirable_fraction(examples.clone(), 1.0), examples);
    assert_eq!(keep_desirable_fraction(examples, 0.0).len(), 10);
}
