//! The profiler's backward pass and influence against an independent naive f64 forward pass on
//! tiny random models: dL/d(hidden) and dL/dO by central finite differences; every entry's
//! influence E_ij by a finite difference along the masking direction (A_ij -> 0, row
//! renormalized) and against the actual masked loss change; the tiled 64x64-style block sums
//! (GQA groups summed, partial tiles) against a naive N x N computation; resumable runs.
// Index loops mirror the formulas in the naive reference.
#![allow(clippy::needless_range_loop, clippy::single_range_in_vec_init)]

use std::ops::Range;
use std::sync::Arc;

use moa::formats::GgmlType;
use moa::moa::profile_file::{packed_index, Profile};
use moa::model::synth::{write_synthetic, SynthSpec};
use moa::model::Model;
use moa::profile::calib::CalibRecord;
use moa::profile::run::{self, RunConfig};
use moa::profile::{model_identity, Captured, Profiler};

fn model(spec: &SynthSpec) -> (tempfile::TempDir, Arc<Model>) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.gguf");
    write_synthetic(spec, &path).unwrap();
    let m = Arc::new(Model::load(&path).unwrap());
    (dir, m)
}

fn tokens(n: usize, seed: u64, vocab: usize) -> Vec<u32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 33) % vocab as u64) as u32
        })
        .collect()
}

/// A perturbation applied inside the reference forward pass.
#[derive(Clone)]
enum Perturb {
    None,
    /// Add to the input hidden state of `layer` at (pos, dim).
    Hidden(usize, usize, usize, f64),
    /// Add to the attention output of `layer` at (pos, head * head_dim + dim).
    AttnOut(usize, usize, usize, f64),
    /// Add `t * delta` to row `row` of the attention probabilities of (layer, head).
    AttnRow {
        layer: usize,
        head: usize,
        row: usize,
        delta: Vec<f64>,
        t: f64,
    },
}

/// Naive f64 llama forward pass, weights dequantized once; attention computed densely.
type Probs = Vec<Vec<Vec<Vec<f64>>>>;

struct Ref {
    c: moa::model::ModelConfig,
    embd: Vec<Vec<f64>>,
    layers: Vec<[Vec<Vec<f64>>; 7]>,
    norms: Vec<[Vec<f64>; 2]>,
    out_norm: Vec<f64>,
    output: Vec<Vec<f64>>,
}

fn mat(m: &Model, name: &str) -> Vec<Vec<f64>> {
    let t = m.file.tensor_info(name).unwrap();
    let cols = t.dims[0] as usize;
    m.file
        .dequantize(name)
        .unwrap()
        .chunks(cols)
        .map(|r| r.iter().map(|&x| x as f64).collect())
        .collect()
}

fn vecw(m: &Model, name: &str) -> Vec<f64> {
    m.file
        .dequantize(name)
        .unwrap()
        .iter()
        .map(|&x| x as f64)
        .collect()
}

fn mv(w: &[Vec<f64>], x: &[f64]) -> Vec<f64> {
    w.iter()
        .map(|r| r.iter().zip(x).map(|(a, b)| a * b).sum())
        .collect()
}

fn rms(x: &[f64], w: &[f64], eps: f64) -> Vec<f64> {
    let s = 1.0 / (x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64 + eps).sqrt();
    x.iter().zip(w).map(|(v, g)| v * s * g).collect()
}

impl Ref {
    fn new(m: &Model) -> Ref {
        let c = m.config.clone();
        let out = if m.file.tensor_info("output.weight").is_some() {
            "output.weight"
        } else {
            "token_embd.weight"
        };
        Ref {
            embd: mat(m, "token_embd.weight"),
            layers: (0..c.n_layer)
                .map(|l| {
                    let n = |s: &str| format!("blk.{l}.{s}.weight");
                    [
                        mat(m, &n("attn_q")),
                        mat(m, &n("attn_k")),
                        mat(m, &n("attn_v")),
                        mat(m, &n("attn_output")),
                        mat(m, &n("ffn_gate")),
                        mat(m, &n("ffn_up")),
                        mat(m, &n("ffn_down")),
                    ]
                })
                .collect(),
            norms: (0..c.n_layer)
                .map(|l| {
                    [
                        vecw(m, &format!("blk.{l}.attn_norm.weight")),
                        vecw(m, &format!("blk.{l}.ffn_norm.weight")),
                    ]
                })
                .collect(),
            out_norm: vecw(m, "output_norm.weight"),
            output: mat(m, out),
            c,
        }
    }

    fn rope(&self, x: &mut [f64], pos: usize) {
        let (hd, nr) = (self.c.head_dim, self.c.rope.n_rot);
        for head in x.chunks_mut(hd) {
            for i in 0..nr / 2 {
                let th =
                    pos as f64 * (self.c.rope.freq_base as f64).powf(-2.0 * i as f64 / nr as f64);
                let (s, co) = th.sin_cos();
                let (a, b) = (head[2 * i], head[2 * i + 1]);
                head[2 * i] = a * co - b * s;
                head[2 * i + 1] = a * s + b * co;
            }
        }
    }

    /// Mean cross-entropy over `targets` (positions t predicted at t-1), every head's
    /// attention probabilities `[layer][head][i][j]` and every layer's values `[layer][j]`.
    fn run(
        &self,
        toks: &[u32],
        targets: &[usize],
        p: &Perturb,
    ) -> (f64, Probs, Vec<Vec<Vec<f64>>>) {
        let c = &self.c;
        let (n, hd, eps) = (toks.len(), c.head_dim, c.rms_eps as f64);
        let group = c.n_head / c.n_head_kv;
        let mut x: Vec<Vec<f64>> = toks
            .iter()
            .map(|&t| self.embd[t as usize].clone())
            .collect();
        let mut all_a = Vec::new();
        let mut all_v = Vec::new();
        for l in 0..c.n_layer {
            if let Perturb::Hidden(pl, pos, d, delta) = *p {
                if pl == l {
                    x[pos][d] += delta;
                }
            }
            let w = &self.layers[l];
            let (mut qs, mut ks, mut vs) = (Vec::new(), Vec::new(), Vec::new());
            for (i, xi) in x.iter().enumerate() {
                let xn = rms(xi, &self.norms[l][0], eps);
                let (mut q, mut k) = (mv(&w[0], &xn), mv(&w[1], &xn));
                self.rope(&mut q, i);
                self.rope(&mut k, i);
                qs.push(q);
                ks.push(k);
                vs.push(mv(&w[2], &xn));
            }
            let mut layer_a = vec![vec![vec![0.0; n]; n]; c.n_head];
            for i in 0..n {
                let mut o = vec![0.0; c.n_head * hd];
                for h in 0..c.n_head {
                    let g = h / group;
                    let q = &qs[i][h * hd..(h + 1) * hd];
                    let s: Vec<f64> = (0..=i)
                        .map(|j| {
                            q.iter()
                                .zip(&ks[j][g * hd..(g + 1) * hd])
                                .map(|(a, b)| a * b)
                                .sum::<f64>()
                                / (hd as f64).sqrt()
                        })
                        .collect();
                    let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let z: f64 = s.iter().map(|v| (v - m).exp()).sum();
                    let mut a: Vec<f64> = s.iter().map(|v| (v - m).exp() / z).collect();
                    if let Perturb::AttnRow {
                        layer,
                        head,
                        row,
                        delta,
                        t,
                    } = p
                    {
                        if *layer == l && *head == h && *row == i {
                            for (a, d) in a.iter_mut().zip(delta) {
                                *a += t * d;
                            }
                        }
                    }
                    for j in 0..=i {
                        layer_a[h][i][j] = a[j];
                        for d in 0..hd {
                            o[h * hd + d] += a[j] * vs[j][g * hd + d];
                        }
                    }
                }
                if let Perturb::AttnOut(pl, pos, k, delta) = *p {
                    if pl == l && pos == i {
                        o[k] += delta;
                    }
                }
                let pr = mv(&w[3], &o);
                for (a, b) in x[i].iter_mut().zip(&pr) {
                    *a += b;
                }
            }
            for xi in x.iter_mut() {
                let xn = rms(xi, &self.norms[l][1], eps);
                let (gt, up) = (mv(&w[4], &xn), mv(&w[5], &xn));
                let hm: Vec<f64> = gt
                    .iter()
                    .zip(&up)
                    .map(|(g, u)| g / (1.0 + (-g).exp()) * u)
                    .collect();
                for (a, b) in xi.iter_mut().zip(&mv(&w[6], &hm)) {
                    *a += b;
                }
            }
            all_a.push(layer_a);
            all_v.push(vs);
        }
        let mut loss = 0.0;
        for &t in targets {
            let logits = mv(&self.output, &rms(&x[t - 1], &self.out_norm, eps));
            let m = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let lz = m + logits.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
            loss += lz - logits[toks[t] as usize];
        }
        (loss / targets.len() as f64, all_a, all_v)
    }

    fn loss(&self, toks: &[u32], targets: &[usize], p: &Perturb) -> f64 {
        self.run(toks, targets, p).0
    }
}

fn targets_of(r: &[Range<usize>]) -> Vec<usize> {
    r.iter().flat_map(|r| r.clone()).collect()
}

/// Mean of |a - b| / max(|b|, floor) over pairs.
fn mean_rel(pairs: &[(f64, f64)], floor: f64) -> f64 {
    pairs
        .iter()
        .map(|(a, b)| (a - b).abs() / b.abs().max(floor))
        .sum::<f64>()
        / pairs.len() as f64
}

#[test]
fn gradients_match_finite_differences() {
    let spec = SynthSpec::tiny(GgmlType::F32, 11);
    let (_d, m) = model(&spec);
    let r = Ref::new(&m);
    let prof = Profiler::new(&m, 8).unwrap();
    let n = 37;
    let toks = tokens(n, 5, spec.n_vocab);
    let resp = vec![20..30, 33..37];
    let tg = targets_of(&resp);
    let mut cap = Captured::default();
    let res = prof
        .profile_sample(&toks, &resp, 64, Some(&mut cap))
        .unwrap();
    let l0 = r.loss(&toks, &tg, &Perturb::None);
    assert!(
        (res.loss - l0).abs() < 1e-4 * l0.abs(),
        "loss {} vs reference {l0}",
        res.loss
    );
    let h = 1e-4;
    let c = &m.config;
    let mut hid = Vec::new();
    let mut att = Vec::new();
    for l in 0..c.n_layer {
        for (k, pos) in [0usize, 3, 8, 15, 19, 24, 29, 35].into_iter().enumerate() {
            let d = (k * 13 + l * 7) % c.n_embd;
            let fd = (r.loss(&toks, &tg, &Perturb::Hidden(l, pos, d, h))
                - r.loss(&toks, &tg, &Perturb::Hidden(l, pos, d, -h)))
                / (2.0 * h);
            hid.push((cap.d_hidden[l][pos * c.n_embd + d] as f64, fd));
            let o = (k * 5 + l * 3) % c.q_dim();
            let fd = (r.loss(&toks, &tg, &Perturb::AttnOut(l, pos, o, h))
                - r.loss(&toks, &tg, &Perturb::AttnOut(l, pos, o, -h)))
                / (2.0 * h);
            att.push((cap.d_attn_out[l][pos * c.q_dim() + o] as f64, fd));
        }
    }
    // The gradient must not be trivially zero where positions feed the response.
    let scale = hid.iter().map(|p| p.1.abs()).fold(0.0, f64::max);
    assert!(scale > 1e-3, "finite differences are all ~0: {hid:?}");
    // Positions at or after the last target have no influence: exactly zero both ways.
    let eh = mean_rel(&hid, 1e-2 * scale);
    let scale_o = att.iter().map(|p| p.1.abs()).fold(0.0, f64::max);
    let eo = mean_rel(&att, 1e-2 * scale_o);
    println!("dL/d(hidden): mean relative error {eh:.2e}; dL/dO: {eo:.2e}");
    assert!(
        eh < 1e-3,
        "dL/d(hidden) vs finite differences: {eh} {hid:?}"
    );
    assert!(eo < 1e-3, "dL/dO vs finite differences: {eo} {att:?}");
}

/// With block 1 and one query head per KV head, the profile's blocks are the entries' |E|.
#[test]
fn influence_matches_masking() {
    let mut spec = SynthSpec::tiny(GgmlType::F32, 3);
    spec.n_head_kv = spec.n_head;
    let (_d, m) = model(&spec);
    let r = Ref::new(&m);
    let prof = Profiler::new(&m, 1).unwrap();
    let n = 14;
    let toks = tokens(n, 9, spec.n_vocab);
    let resp = vec![9..14];
    let tg = targets_of(&resp);
    let res = prof.profile_sample(&toks, &resp, n, None).unwrap();
    let (l0, a, _) = r.run(&toks, &tg, &Perturb::None);
    let c = &m.config;
    let t = 1e-4;
    let mut path = Vec::new();
    let mut masked = Vec::new();
    for l in 0..c.n_layer {
        for h in 0..c.n_head {
            for i in 0..n {
                for j in 0..=i {
                    let row = &a[l][h][i];
                    let aij = row[j];
                    // The masking direction: A_ij -> 0, the rest scaled by 1 / (1 - A_ij).
                    let delta: Vec<f64> = (0..=i)
                        .map(|k| {
                            if k == j {
                                -aij
                            } else {
                                row[k] * aij / (1.0 - aij)
                            }
                        })
                        .collect();
                    let p = |t| Perturb::AttnRow {
                        layer: l,
                        head: h,
                        row: i,
                        delta: delta.clone(),
                        t,
                    };
                    let e_fd = (r.loss(&toks, &tg, &p(t)) - r.loss(&toks, &tg, &p(-t))) / (2.0 * t);
                    let got = res.influence.sums[l][h][packed_index(i, j)];
                    path.push((got, e_fd.abs()));
                    if i > 0 {
                        masked.push((e_fd, r.loss(&toks, &tg, &p(1.0)) - l0, aij));
                    }
                }
            }
        }
    }
    let scale = path.iter().map(|p| p.1).fold(0.0, f64::max);
    assert!(scale > 1e-4, "influences are all ~0");
    let e = mean_rel(&path, 1e-2 * scale);
    // First order vs actually masking the entry: the difference is second order in A_ij.
    let small: Vec<(f64, f64)> = masked
        .iter()
        .filter(|m| m.2 < 0.1)
        .map(|m| (m.0, m.1))
        .collect();
    let em = mean_rel(&small, 1e-2 * scale);
    println!(
        "|E| vs masking-direction finite differences: mean relative error {e:.2e} over {} entries; \
         E vs actual masked loss change (A_ij < 0.1, {} entries): {em:.2e}",
        path.len(),
        small.len()
    );
    assert!(e < 1e-3, "influence vs finite differences: {e}");
    assert!(em < 0.1, "first-order influence vs actual masking: {em}");
}

/// Tiled block sums (GQA groups, partial tiles, several samples) equal a naive N x N sum of
/// |E| built from the reference's attention and the (separately checked) dL/dO.
#[test]
fn influence_blocks_match_naive() {
    let spec = SynthSpec::tiny(GgmlType::Q8_0, 21);
    let (_d, m) = model(&spec);
    let r = Ref::new(&m);
    let block = 8;
    let prof = Profiler::new(&m, block).unwrap();
    let n = 45;
    let length = 64;
    let toks = tokens(n, 2, spec.n_vocab);
    let resp = vec![30..45];
    let tg = targets_of(&resp);
    let mut cap = Captured::default();
    let res = prof
        .profile_sample(&toks, &resp, length, Some(&mut cap))
        .unwrap();
    let (_, a, vals) = r.run(&toks, &tg, &Perturb::None);
    let c = &m.config;
    let (hd, group) = (c.head_dim, c.group_size());
    let nb = length / block;
    let mut worst = 0f64;
    for l in 0..c.n_layer {
        let v = &vals[l];
        let mut naive = vec![vec![0f64; nb * (nb + 1) / 2]; c.n_head_kv];
        for h in 0..c.n_head {
            let g = h / group;
            for i in 0..n {
                let do_i = &cap.d_attn_out[l][i * c.q_dim() + h * hd..i * c.q_dim() + (h + 1) * hd];
                let gs: Vec<f64> = (0..=i)
                    .map(|j| {
                        do_i.iter()
                            .zip(&v[j][g * hd..(g + 1) * hd])
                            .map(|(a, b)| *a as f64 * b)
                            .sum()
                    })
                    .collect();
                let row = &a[l][h][i];
                let gbar: f64 = (0..=i).map(|k| gs[k] * row[k]).sum();
                for j in 0..=i {
                    let e = if i == 0 {
                        -gs[0] * row[0]
                    } else {
                        -row[j] * (gs[j] - gbar) / (1.0 - row[j] + 1e-6)
                    };
                    naive[g][packed_index(i / block, j / block)] += e.abs();
                }
            }
        }
        for g in 0..c.n_head_kv {
            let got = &res.influence.sums[l][g];
            assert_eq!(got.len(), naive[g].len());
            let scale = naive[g].iter().cloned().fold(0.0, f64::max);
            for (k, (x, y)) in got.iter().zip(&naive[g]).enumerate() {
                let err = (x - y).abs() / scale;
                worst = worst.max(err);
                assert!(err < 1e-4, "layer {l} head {g} block {k}: {x} vs naive {y}");
            }
            // Blocks beyond the sample's 45 tokens (of 64) are empty.
            assert_eq!(got[packed_index(7, 0)], 0.0);
        }
    }
    println!("block sums vs naive: worst error {worst:.2e} of the largest block");
}

fn record(id: &str, length: usize, toks: Vec<u32>, resp: [usize; 2]) -> CalibRecord {
    CalibRecord {
        id: id.into(),
        split: "calib".into(),
        length,
        task: "test".into(),
        sources: vec![],
        n_tokens: toks.len(),
        response: vec![resp],
        tokens: toks,
    }
}

/// A run stopped after some samples and resumed equals a run done in one go; data, lengths or
/// model that differ from the file's are refused.
#[test]
fn run_resumes_and_refuses_mismatches() {
    let spec = SynthSpec::tiny(GgmlType::F32, 5);
    let (dir, m) = model(&spec);
    let prof = Profiler::new(&m, 16).unwrap();
    let id = model_identity(&m);
    let recs = vec![
        record("a", 64, tokens(60, 1, 300), [40, 60]),
        record("b", 32, tokens(32, 2, 300), [20, 32]),
        record("c", 64, tokens(64, 3, 300), [50, 64]),
        record("d", 32, tokens(25, 4, 300), [10, 25]),
    ];
    let cfg = |out: &std::path::Path, cap| RunConfig {
        lengths: vec![64, 32],
        per_length: cap,
        data_name: "t.jsonl".into(),
        data_fingerprint: 42,
        out: out.to_path_buf(),
    };
    let once = dir.path().join("once.bin");
    let p1 = run::run(&prof, &id, &recs, &cfg(&once, None), |_| {}).unwrap();
    assert_eq!(p1.header.lengths[0].samples, 2);
    assert_eq!(p1.header.lengths[1].samples, 2);
    let resumed = dir.path().join("resumed.bin");
    run::run(&prof, &id, &recs, &cfg(&resumed, Some(1)), |_| {}).unwrap();
    let mut began = Vec::new();
    run::run(&prof, &id, &recs, &cfg(&resumed, None), |e| {
        if let run::RunEvent::Begin { id, .. } = e {
            began.push(id.to_string());
        }
    })
    .unwrap();
    assert_eq!(
        began,
        ["d", "c"],
        "the resumed run redoes only the missing samples"
    );
    let p2 = Profile::load(&resumed).unwrap();
    assert_eq!(p1.header, p2.header);
    for (a, b) in p1.sums.iter().zip(&p2.sums) {
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() <= 1e-5 * x.abs().max(1e-3), "{x} vs {y}");
        }
    }
    assert!(p1.sums[0].iter().any(|&v| v > 0.0));
    // Mismatches are errors naming the problem.
    let mut other = cfg(&resumed, None);
    other.data_fingerprint = 43;
    let e = run::run(&prof, &id, &recs, &other, |_| {}).unwrap_err();
    assert!(e.to_string().contains("other data"), "{e}");
    let mut other = cfg(&resumed, None);
    other.lengths = vec![64];
    let e = run::run(&prof, &id, &recs, &other, |_| {}).unwrap_err();
    assert!(e.to_string().contains("lengths"), "{e}");
    let mut other = cfg(&dir.path().join("x.bin"), None);
    other.lengths = vec![128];
    let e = run::run(&prof, &id, &recs, &other, |_| {}).unwrap_err();
    assert!(
        e.to_string()
            .contains("no calibration records for length 128"),
        "{e}"
    );
    // Bad samples are errors, not panics.
    let bad = vec![record("z", 32, vec![5, 299, 300], [1, 3])];
    let e = run::run(
        &prof,
        &id,
        &bad,
        &cfg(&dir.path().join("y.bin"), None),
        |_| {},
    );
    let mut c2 = cfg(&dir.path().join("y.bin"), None);
    c2.lengths = vec![32];
    let e2 = run::run(&prof, &id, &bad, &c2, |_| {}).unwrap_err();
    assert!(e.is_err());
    assert!(e2.to_string().contains("outside the vocabulary"), "{e2}");
}

/// `moa-profile calib`, `run` and `show` end to end on a synthetic model with a chat template:
/// deterministic conversations within their buckets, answers as the response range, a profile
/// with the sample counts, and errors (not panics) for bad input.
#[test]
fn cli_calib_run_show() {
    use std::process::Command;
    let dir = tempfile::tempdir().unwrap();
    let mp = dir.path().join("chat.gguf");
    let mut spec = SynthSpec::tiny(GgmlType::Q8_0, 10);
    spec.chat_template = Some(
        "{% for m in messages %}<|bos|>{{ m['role'] }}: {{ m['content'] }}<|eos|>{% endfor %}{% if add_generation_prompt %}<|bos|>assistant: {% endif %}".into(),
    );
    write_synthetic(&spec, &mp).unwrap();
    let docs = dir.path().join("docs");
    std::fs::create_dir(&docs).unwrap();
    for k in 0..8 {
        let text: String = (0..400)
            .map(|i| format!("word{} ", (i * 7 + k * 13) % 97))
            .collect();
        std::fs::write(docs.join(format!("doc{k}.txt")), text).unwrap();
    }
    let bin = env!("CARGO_BIN_EXE_moa-profile");
    let calib = |out: &str, val: &str| {
        let o = Command::new(bin)
            .args(["calib", "-m", mp.to_str().unwrap(), "--source"])
            .arg(&docs)
            .args([
                "--lengths",
                "256,512",
                "--per-length",
                "2",
                "--val-lengths",
                "384",
            ])
            .args([
                "--val-per-length",
                "1",
                "--max-new",
                "16",
                "--min-chars",
                "100",
                // The long requests leave no room in 256 tokens of this tiny vocabulary.
                "--tasks",
                "summarize,fact",
                "-t",
                "1",
            ])
            .args(["--val-fraction", "0.3", "-o"])
            .arg(dir.path().join(out))
            .arg("--val-out")
            .arg(dir.path().join(val))
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        std::fs::read_to_string(dir.path().join(out)).unwrap()
    };
    let a = calib("a.jsonl", "av.jsonl");
    let b = calib("b.jsonl", "bv.jsonl");
    assert_eq!(a, b, "calib is deterministic");
    let recs = moa::profile::calib::read_jsonl(&dir.path().join("a.jsonl")).unwrap();
    assert_eq!(recs.len(), 4);
    for r in &recs {
        assert!(
            r.n_tokens <= r.length && r.n_tokens > r.length / 2,
            "{}",
            r.n_tokens
        );
        assert_eq!(r.response[0][1], r.n_tokens);
        assert!(r.response[0][1] - r.response[0][0] <= 16);
    }
    let val = moa::profile::calib::read_jsonl(&dir.path().join("av.jsonl")).unwrap();
    assert_eq!((val.len(), val[0].split.as_str()), (1, "val"));
    let out = dir.path().join("p.bin");
    let o = Command::new(bin)
        .args(["run", "-m", mp.to_str().unwrap(), "--data"])
        .arg(dir.path().join("a.jsonl"))
        .args(["--lengths", "256,512", "-t", "1", "-o"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let p = Profile::load(&out).unwrap();
    assert_eq!(
        p.header
            .lengths
            .iter()
            .map(|e| e.samples)
            .collect::<Vec<_>>(),
        [2, 2]
    );
    let o = Command::new(bin).arg("show").arg(&out).output().unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("length    512: 2 samples"), "{text}");
    // Bad input: an error naming the problem.
    std::fs::write(dir.path().join("bad.jsonl"), "{\"id\": \"x\"}\n").unwrap();
    let o = Command::new(bin)
        .args(["run", "-m", mp.to_str().unwrap(), "--data"])
        .arg(dir.path().join("bad.jsonl"))
        .args(["-o"])
        .arg(dir.path().join("q.bin"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("bad.jsonl:1: missing field"),
        "{err}"
    );
}

/// `moa-profile grads` (the input of tests/py/autograd_check.py) writes the loss and the
/// per-layer dL/d(hidden) of the window it reports, equal to the library's captured gradients.
#[test]
fn cli_grads_dumps_captured_gradients() {
    use moa::profile::backward::Captured;
    use std::process::Command;
    let dir = tempfile::tempdir().unwrap();
    let mp = dir.path().join("m.gguf");
    let spec = SynthSpec::tiny(GgmlType::Q8_0, 4);
    write_synthetic(&spec, &mp).unwrap();
    let m = Arc::new(Model::load(&mp).unwrap());
    let toks = tokens(90, 8, m.config.n_vocab);
    let data = dir.path().join("c.jsonl");
    moa::profile::calib::write_jsonl(&data, &[record("r0", 128, toks.clone(), [60, 80])]).unwrap();
    let out = dir.path().join("g.bin");
    let o = Command::new(env!("CARGO_BIN_EXE_moa-profile"))
        .args(["grads", "-m", mp.to_str().unwrap(), "--data"])
        .arg(&data)
        // The CPU's gradients, compared exactly below.
        .args(["--max-tokens", "50", "--device", "cpu", "-o"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let raw = std::fs::read(&out).unwrap();
    let nl = raw.iter().position(|&b| b == b'\n').unwrap();
    let hdr: serde_json::Value = serde_json::from_slice(&raw[..nl]).unwrap();
    // The window ends where the response ends: tokens 30..80, response 30..50 in it.
    assert_eq!(hdr["n_tokens"], 50);
    assert_eq!(hdr["response"], serde_json::json!([[30, 50]]));
    let win = &toks[30..80];
    let prof = moa::profile::Profiler::new(&m, 64).unwrap();
    let mut cap = Captured::default();
    let res = prof
        .profile_sample(win, &[30..50], 64, Some(&mut cap))
        .unwrap();
    assert!((hdr["loss"].as_f64().unwrap() - res.loss).abs() < 1e-12);
    let vals: Vec<f32> = raw[nl + 1..]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    let want: Vec<f32> = cap.d_hidden.concat();
    assert_eq!(vals.len(), m.config.n_layer * 50 * m.config.n_embd);
    assert_eq!(vals, want);
    let bad = Command::new(env!("CARGO_BIN_EXE_moa-profile"))
        .args(["grads", "-m", mp.to_str().unwrap(), "--data"])
        .arg(&data)
        .args(["--index", "3", "-o"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&bad.stderr).contains("out of range"));
}

/// `key_token_range` finds the smallest run of answer tokens whose text spells the key (and
/// nothing when the answer lacks it); `calib --key-loss` drops the conversations whose answer
/// misses the asked number (a random tiny model never finds it) and says so.
#[test]
fn key_loss_ranges_and_drops() {
    use moa::profile::calib::key_token_range;
    use std::process::Command;
    let dir = tempfile::tempdir().unwrap();
    let mp = dir.path().join("chat.gguf");
    let mut spec = SynthSpec::tiny(GgmlType::Q8_0, 10);
    spec.chat_template = Some(
        "{% for m in messages %}<|bos|>{{ m['role'] }}: {{ m['content'] }}<|eos|>{% endfor %}{% if add_generation_prompt %}<|bos|>assistant: {% endif %}".into(),
    );
    write_synthetic(&spec, &mp).unwrap();
    let loaded = moa::runtime::load(&mp).unwrap();
    let tok = &loaded.tokenizer;
    for (text, key) in [
        ("The reference number is 48213.", "48213"),
        ("48213 is the number", "48213"),
        ("numbers 11111 and then 90817, end", "90817"),
    ] {
        let ids = tok.encode(text, false, false).unwrap();
        let r = key_token_range(tok, &ids, key).expect("key found");
        assert!(tok.decode(&ids[r.clone()]).contains(key), "{text}");
        assert!(
            !tok.decode(&ids[r.start + 1..r.end]).contains(key),
            "{text}"
        );
        assert!(
            !tok.decode(&ids[r.start..r.end - 1]).contains(key),
            "{text}"
        );
    }
    let ids = tok.encode("no number here 4821", false, false).unwrap();
    assert_eq!(key_token_range(tok, &ids, "48213"), None);

    let docs = dir.path().join("docs");
    std::fs::create_dir(&docs).unwrap();
    for k in 0..8 {
        let text: String = (0..400)
            .map(|i| format!("word{} ", (i * 7 + k * 13) % 97))
            .collect();
        std::fs::write(docs.join(format!("doc{k}.txt")), text).unwrap();
    }
    let o = Command::new(env!("CARGO_BIN_EXE_moa-profile"))
        .args(["calib", "-m", mp.to_str().unwrap(), "--source"])
        .arg(&docs)
        .args(["--lengths", "256", "--per-length", "2", "--val-lengths", ""])
        .args(["--max-new", "8", "--min-chars", "100", "--tasks", "fact"])
        .args(["--key-loss", "-t", "1", "-o"])
        .arg(dir.path().join("k.jsonl"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("length 256: kept 0 of 2"), "{err}");
    let recs = moa::profile::calib::read_jsonl(&dir.path().join("k.jsonl")).unwrap();
    assert!(recs.is_empty());
}
