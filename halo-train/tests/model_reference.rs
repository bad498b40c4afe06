//! The model's logits against an independent, naive f64 transcription of Hugging Face
//! `GPT2LMHeadModel.forward` (modeling_gpt2.py: pre-LN blocks, Conv1D `x @ W + b`, q/k/v split of
//! `c_attn`, scaled causal softmax, `gelu_new`, final `ln_f`, logits `h @ wte.T`), reading the
//! parameters by their Hugging Face names. This checks the wiring, not just each op.

use halo_train::model::GptWeights;
use halo_train::model::{Gpt, GptConfig};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

struct Reference<'a> {
    model: &'a Gpt,
}

type Mat = Vec<Vec<f64>>;

impl Reference<'_> {
    fn param(&self, name: &str) -> (Vec<f64>, Vec<usize>) {
        let i = self
            .model
            .parameter_index(name)
            .unwrap_or_else(|| panic!("no parameter {name}"));
        let p = &self.model.parameters()[i];
        (p.data.iter().map(|&v| v as f64).collect(), p.shape.clone())
    }

    fn layer_norm(&self, x: &Mat, prefix: &str) -> Mat {
        let (g, _) = self.param(&format!("{prefix}.weight"));
        let (b, _) = self.param(&format!("{prefix}.bias"));
        x.iter()
            .map(|row| {
                let n = row.len() as f64;
                let mean = row.iter().sum::<f64>() / n;
                let var = row.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n;
                row.iter()
                    .enumerate()
                    .map(|(i, v)| (v - mean) / (var + 1e-5).sqrt() * g[i] + b[i])
                    .collect()
            })
            .collect()
    }

    /// Hugging Face Conv1D: `x @ W + b`, `W: [in, out]`.
    fn conv1d(&self, x: &Mat, prefix: &str) -> Mat {
        let (w, shape) = self.param(&format!("{prefix}.weight"));
        let (b, _) = self.param(&format!("{prefix}.bias"));
        let (nin, nout) = (shape[0], shape[1]);
        x.iter()
            .map(|row| {
                (0..nout)
                    .map(|o| b[o] + (0..nin).map(|i| row[i] * w[i * nout + o]).sum::<f64>())
                    .collect()
            })
            .collect()
    }

    fn attention(&self, qkv: &Mat, n_head: usize) -> Mat {
        let t = qkv.len();
        let c = qkv[0].len() / 3;
        let hd = c / n_head;
        let mut out = vec![vec![0.0; c]; t];
        for h in 0..n_head {
            for i in 0..t {
                let q = &qkv[i][h * hd..(h + 1) * hd];
                let mut w: Vec<f64> = (0..t)
                    .map(|j| {
                        if j > i {
                            f64::NEG_INFINITY
                        } else {
                            let k = &qkv[j][c + h * hd..c + (h + 1) * hd];
                            q.iter().zip(k).map(|(a, b)| a * b).sum::<f64>() / (hd as f64).sqrt()
                        }
                    })
                    .collect();
                let max = w.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                w.iter_mut().for_each(|v| *v = (*v - max).exp());
                let total: f64 = w.iter().sum();
                for d in 0..hd {
                    out[i][h * hd + d] = (0..t)
                        .map(|j| w[j] / total * qkv[j][2 * c + h * hd + d])
                        .sum();
                }
            }
        }
        out
    }

    fn logits(&self, ids: &[u32], config: &GptConfig) -> Mat {
        let (wte, _) = self.param("transformer.wte.weight");
        let (wpe, _) = self.param("transformer.wpe.weight");
        let c = config.n_embd;
        let mut x: Mat = ids
            .iter()
            .enumerate()
            .map(|(t, &id)| {
                (0..c)
                    .map(|d| wte[id as usize * c + d] + wpe[t * c + d])
                    .collect()
            })
            .collect();
        for l in 0..config.n_layer {
            let p = format!("transformer.h.{l}");
            let h = self.layer_norm(&x, &format!("{p}.ln_1"));
            let a = self.attention(&self.conv1d(&h, &format!("{p}.attn.c_attn")), config.n_head);
            let a = self.conv1d(&a, &format!("{p}.attn.c_proj"));
            x = x
                .iter()
                .zip(&a)
                .map(|(r, s)| r.iter().zip(s).map(|(u, v)| u + v).collect())
                .collect();
            let h = self.layer_norm(&x, &format!("{p}.ln_2"));
            let mut f = self.conv1d(&h, &format!("{p}.mlp.c_fc"));
            for v in f.iter_mut().flatten() {
                *v = 0.5
                    * *v
                    * (1.0
                        + ((2.0 / std::f64::consts::PI).sqrt() * (*v + 0.044715 * v.powi(3)))
                            .tanh());
            }
            let f = self.conv1d(&f, &format!("{p}.mlp.c_proj"));
            x = x
                .iter()
                .zip(&f)
                .map(|(r, s)| r.iter().zip(s).map(|(u, v)| u + v).collect())
                .collect();
        }
        let h = self.layer_norm(&x, "transformer.ln_f");
        h.iter()
            .map(|row| {
                (0..config.vocab_size)
                    .map(|v| (0..c).map(|d| row[d] * wte[v * c + d]).sum())
                    .collect()
            })
            .collect()
    }
}

#[test]
fn logits_match_a_naive_hugging_face_transcription() {
    let config = GptConfig {
        n_layer: 3,
        n_head: 4,
        n_embd: 16,
        vocab_size: 19,
        n_ctx: 9,
        dropout: 0.0,
    };
    let mut model = Gpt::new(config, 21).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(22);
    for (_, data) in model.parameters_mut() {
        data.iter_mut().for_each(|v| *v += rng.gen_range(-0.3..0.3));
    }
    let ids: Vec<u32> = (0..2 * 9).map(|_| rng.gen_range(0..19)).collect();
    let got = model.logits_inference(&ids, 2, 9).unwrap();
    let reference = Reference { model: &model };
    for (b, row_ids) in ids.chunks(9).enumerate() {
        let want = reference.logits(row_ids, &config);
        for (t, want_row) in want.iter().enumerate() {
            for (v, &w) in want_row.iter().enumerate() {
                let g = got[(b * 9 + t) * 19 + v] as f64;
                assert!(
                    (g - w).abs() < 1e-4 * (1.0 + w.abs()),
                    "batch {b} pos {t} token {v}: {g} vs {w}"
                );
            }
        }
    }
}
