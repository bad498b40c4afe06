//! Atomic, deterministic checkpoint files; the metrics log of a resumed run; AdamW's saved state.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use halo_kernels::HaloError;
use halo_train::autograd::Gradients;
use halo_train::model::atomic_file::{
    is_temporary, remove_temporaries, write_atomically, write_bytes_atomically,
};
use halo_train::model::optim::{AdamW, AdamWConfig};
use halo_train::model::{DTypeOnDisk, Gpt, GptConfig};
use halo_train::train::{MetricRecord, MetricsLog};
use safetensors::SafeTensors;

fn config() -> GptConfig {
    GptConfig {
        n_layer: 2,
        n_head: 2,
        n_embd: 8,
        vocab_size: 13,
        n_ctx: 7,
        dropout: 0.0,
    }
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("halo-atomic-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn identical_weights_give_identical_bytes_with_a_sorted_header() {
    let dir = temp_dir("bytes");
    let model = Gpt::new(config(), 3).unwrap();
    // HashMap metadata came out in a different order for different maps, even in one process:
    // eight saves all agreeing would have had a chance of 1/128.
    let files: Vec<Vec<u8>> = (0..8)
        .map(|i| {
            let path = dir.join(format!("m{i}.safetensors"));
            model
                .clone()
                .save_safetensors(&path, DTypeOnDisk::F32)
                .unwrap();
            std::fs::read(&path).unwrap()
        })
        .collect();
    assert!(files.iter().all(|f| f == &files[0]));
    // The file is valid safetensors whose every tensor holds the model's values.
    let st = SafeTensors::deserialize(&files[0]).unwrap();
    for p in model.parameters() {
        let t = st.tensor(&p.name).unwrap();
        assert_eq!(t.shape(), p.shape.as_slice());
        let values: Vec<f32> = t
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        assert_eq!(values, p.data, "{}", p.name);
    }
    // Header: 8-byte length, JSON whose keys are sorted, padded to 8 bytes.
    let n = u64::from_le_bytes(files[0][..8].try_into().unwrap()) as usize;
    assert_eq!(n % 8, 0);
    let header = std::str::from_utf8(&files[0][8..8 + n]).unwrap();
    let position = |key: &str| header.find(&format!("\"{key}\":")).unwrap();
    let mut keys: Vec<String> = ["__metadata__", "format", "halo_gpt_config"]
        .map(String::from)
        .to_vec();
    let mut names: Vec<String> = model.parameters().iter().map(|p| p.name.clone()).collect();
    names.sort();
    keys.extend(names);
    let positions: Vec<usize> = keys.iter().map(|k| position(k)).collect();
    assert!(
        positions.windows(2).all(|w| w[0] < w[1]),
        "header keys not in sorted order: {header}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_failed_or_killed_write_never_touches_the_final_name() {
    let dir = temp_dir("failed");
    let path = dir.join("base.safetensors");
    let model = Gpt::new(config(), 1).unwrap();
    model.save_safetensors(&path, DTypeOnDisk::F32).unwrap();
    let good = std::fs::read(&path).unwrap();
    // A writer that dies half-way (an error after writing part of the file): the final name
    // keeps the old complete file and the temporary file is removed.
    let err = write_atomically(&path, |temp| {
        std::fs::write(temp, &good[..good.len() / 2]).unwrap();
        Err(HaloError::InvalidShape("killed".into()))
    })
    .unwrap_err();
    assert!(matches!(err, HaloError::InvalidShape(_)));
    assert_eq!(std::fs::read(&path).unwrap(), good);
    let names: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["base.safetensors"]);
    // What a SIGKILL leaves: a temporary file beside the good one. Loading ignores it, and
    // the cleanup removes only it.
    let stale = dir.join(".halo-tmp-1234-0-99-base.safetensors");
    std::fs::write(&stale, &good[..100]).unwrap();
    assert!(is_temporary(stale.file_name().unwrap()));
    assert!(!is_temporary(path.file_name().unwrap()));
    assert_eq!(Gpt::load_safetensors(&path).unwrap(), model);
    assert_eq!(remove_temporaries(&dir).unwrap(), 1);
    assert!(!stale.exists() && path.is_file());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn two_threads_saving_to_one_path_leave_one_complete_model() {
    let dir = temp_dir("threads");
    let path = Arc::new(dir.join("kto.safetensors"));
    let models = Arc::new([
        Gpt::new(config(), 1).unwrap(),
        Gpt::new(config(), 2).unwrap(),
    ]);
    models[0]
        .save_safetensors(&*path, DTypeOnDisk::F32)
        .unwrap();
    let done = Arc::new(AtomicBool::new(false));
    // A reader loading all the while: every load is one of the two models, whole.
    let reader = {
        let (path, models, done) = (path.clone(), models.clone(), done.clone());
        std::thread::spawn(move || {
            let mut loads = 0;
            while !done.load(Ordering::Relaxed) {
                let loaded = Gpt::load_safetensors(&*path).unwrap();
                assert!(
                    loaded == models[0] || loaded == models[1],
                    "a mix of two models"
                );
                loads += 1;
            }
            loads
        })
    };
    let writers: Vec<_> = (0..2)
        .map(|i| {
            let (path, models) = (path.clone(), models.clone());
            std::thread::spawn(move || {
                for _ in 0..40 {
                    models[i]
                        .save_safetensors(&*path, DTypeOnDisk::F32)
                        .unwrap();
                }
            })
        })
        .collect();
    for w in writers {
        w.join().unwrap();
    }
    done.store(true, Ordering::Relaxed);
    assert!(reader.join().unwrap() > 0);
    let last = Gpt::load_safetensors(&*path).unwrap();
    assert!(last == models[0] || last == models[1]);
    let names: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["kto.safetensors"], "temporary files left behind");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn save_pretrained_writes_both_files_atomically_and_reloads() {
    let dir = temp_dir("pretrained");
    let model = Gpt::new(config(), 5).unwrap();
    model.save_pretrained(&dir, DTypeOnDisk::F32).unwrap();
    let first = std::fs::read(dir.join("model.safetensors")).unwrap();
    model.save_pretrained(&dir, DTypeOnDisk::F32).unwrap();
    assert_eq!(std::fs::read(dir.join("model.safetensors")).unwrap(), first);
    assert_eq!(Gpt::load_pretrained(&dir).unwrap(), model);
    let mut names: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    names.sort();
    assert_eq!(names, ["config.json", "model.safetensors"]);
    std::fs::remove_dir_all(&dir).unwrap();
}

fn record(step: usize, loss: f64) -> MetricRecord {
    MetricRecord {
        stage: "sft".into(),
        step,
        global_step: 100 + step,
        values: vec![("loss".into(), loss), ("kl".into(), f64::NAN)],
    }
}

#[test]
fn metrics_are_never_truncated_and_a_resumed_log_keeps_its_checkpointed_records() {
    let dir = temp_dir("metrics");
    let path = dir.join("metrics.jsonl");
    let mut log = MetricsLog::create_new(&path).unwrap();
    for step in 1..=3 {
        log.log(record(step, 0.5 / step as f64)).unwrap();
    }
    log.sync().unwrap();
    drop(log);
    // An existing log is never truncated by a new one.
    assert!(matches!(
        MetricsLog::create_new(&path),
        Err(HaloError::Io { .. })
    ));
    // A kill mid-line leaves a torn last record.
    let three = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, format!("{three}{{\"stage\":\"sft\",\"st")).unwrap();
    let lines: Vec<&str> = three.lines().collect();
    // The checkpoint followed 2 records: those are kept, byte for byte, and read back.
    let mut log = MetricsLog::resume(&path, 2).unwrap();
    assert_eq!(log.records().len(), 2);
    assert_eq!(log.records()[1].get("loss"), Some(0.25));
    assert!(log.records()[1].get("kl").unwrap().is_nan());
    assert_eq!(log.records()[1].global_step, 102);
    log.log(record(3, 0.125)).unwrap();
    log.flush().unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    let new_lines: Vec<&str> = text.lines().collect();
    assert_eq!(new_lines.len(), 3);
    assert_eq!(&new_lines[..2], &lines[..2]);
    drop(log);
    // A checkpoint claiming more records than the file holds is an error, not a silent loss.
    let err = MetricsLog::resume(&path, 4).unwrap_err();
    assert!(
        matches!(&err, HaloError::Dataset { reason, .. } if reason.contains("only 3")),
        "{err:?}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A gradient for every parameter, from a formula (no autograd needed).
fn grads(model: &Gpt, k: f32) -> Gradients {
    let mut g = Gradients::new();
    for (i, p) in model.parameters().iter().enumerate() {
        let values: Vec<f32> = (0..p.data.len())
            .map(|j| ((j as f32 + k) * 0.37).sin())
            .collect();
        g.add(i, values).unwrap();
    }
    g
}

#[test]
fn adamw_restored_from_its_moments_continues_exactly() {
    let cfg = AdamWConfig::default();
    let mut a = Gpt::new(config(), 4).unwrap();
    let mut opt = AdamW::new(&a, cfg);
    for k in 0..3 {
        let g = grads(&a, k as f32);
        opt.step(&mut a, &g, 1e-2).unwrap();
    }
    let (m, v) = opt.moments();
    let mut b = a.clone();
    let mut restored = AdamW::restore(&b, cfg, opt.steps(), m.to_vec(), v.to_vec()).unwrap();
    assert_eq!(restored.steps(), 3);
    for k in 3..6 {
        let g = grads(&a, k as f32);
        opt.step(&mut a, &g, 1e-2).unwrap();
        let g = grads(&b, k as f32);
        restored.step(&mut b, &g, 1e-2).unwrap();
    }
    assert_eq!(a, b);
    // A fresh optimizer (moments lost, as a resume without the state would be) diverges.
    let mut c = b.clone();
    let mut fresh = AdamW::new(&c, cfg);
    let g = grads(&c, 6.0);
    fresh.step(&mut c, &g, 1e-2).unwrap();
    let g = grads(&b, 6.0);
    restored.step(&mut b, &g, 1e-2).unwrap();
    assert_ne!(b, c);
    // Moments that do not fit the model, or are not finite, are refused.
    let (m, v) = opt.moments();
    let mut short = m.to_vec();
    short.pop();
    assert!(matches!(
        AdamW::restore(&a, cfg, 3, short, v.to_vec()),
        Err(HaloError::LengthMismatch { .. })
    ));
    let mut bad = v.to_vec();
    bad[0][0] = f32::NAN;
    assert!(matches!(
        AdamW::restore(&a, cfg, 3, m.to_vec(), bad),
        Err(HaloError::Checkpoint(_))
    ));
}

#[test]
fn write_bytes_atomically_replaces_a_file_whole() {
    let dir = temp_dir("replace");
    let path = dir.join("summary.txt");
    write_bytes_atomically(&path, b"first run\n").unwrap();
    write_bytes_atomically(&path, b"second\n").unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), b"second\n");
    std::fs::remove_dir_all(&dir).unwrap();
}
