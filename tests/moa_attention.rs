//! Span-aware attention executes plans exactly: against the naive masked dense reference for
//! random plans (negative alpha, beta 0 and 1, spans at the minimum), random prompt lengths and
//! decode lengths across ring wrap-around; a plan covering the whole sequence equals dense
//! attention bit for bit; and KV bytes follow the formula.

mod common;

use std::sync::{Arc, OnceLock};

use common::reference::RefModel;
use moa::backend::cpu::CpuBackend;
use moa::backend::BackendOptions;
use moa::formats::GgmlType;
use moa::kv::{visible, KvLayout};
use moa::moa::{Plan, Rule};
use moa::model::synth::{write_synthetic, SynthSpec};
use moa::model::Model;
use proptest::prelude::*;

struct Fixture {
    _dir: tempfile::TempDir,
    model: Arc<Model>,
    reference: RefModel,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tiny.gguf");
        write_synthetic(&SynthSpec::tiny(GgmlType::F32, 21), &path).unwrap();
        let model = Arc::new(Model::load(&path).unwrap());
        let reference = RefModel::new(&model);
        Fixture {
            _dir: dir,
            model,
            reference,
        }
    })
}

/// A plan with small constants so rings wrap within short tests.
fn small_plan(rules: Vec<Rule>, n_layer: usize, n_kv: usize) -> Plan {
    let mut p = Plan::new(n_layer, n_kv, rules, "test");
    p.sink = 4;
    p.min_span = 8;
    p.align = 4;
    p
}

fn tokens(n: usize, seed: u64, vocab: u32) -> Vec<u32> {
    let mut x = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % vocab as u64) as u32
        })
        .collect()
}

fn arb_rule() -> impl Strategy<Value = Rule> {
    (
        prop_oneof![Just(-64.0f32), Just(0.0), Just(3.0), -40.0f32..40.0],
        prop_oneof![Just(0.0f32), Just(1.0), Just(0.25), 0.0f32..1.0],
    )
        .prop_map(|(alpha, beta)| Rule { alpha, beta })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]
    #[test]
    fn random_plans_match_masked_dense_reference(
        rules in proptest::collection::vec(arb_rule(), 4),
        prompt in 1usize..48,
        decode in 0usize..40,
        chunk in 1usize..20,
        seed in 0u64..1000,
    ) {
        let f = fixture();
        let c = &f.model.config;
        let plan = small_plan(rules, c.n_layer, c.n_head_kv);
        plan.validate(c).unwrap();
        let n = prompt + decode;
        let layout = plan.layout(c, 1, n);
        let caps: Vec<usize> = (0..c.n_layer * c.n_head_kv).map(|i| layout.capacity(i / c.n_head_kv, i % c.n_head_kv)).collect();
        let toks = tokens(n, seed, c.n_vocab as u32);
        let reference = f.reference.logits(&toks, |l, g, i, j| visible(caps[l * c.n_head_kv + g], plan.sink as usize, i, j));
        let mut be = CpuBackend::new(Arc::clone(&f.model), BackendOptions { max_batch: 32, threads: 2, layout }).unwrap();
        let ours = common::logits_all(&mut be, &toks, prompt, chunk);
        for (p, (a, b)) in ours.iter().zip(&reference).enumerate() {
            for (x, y) in a.iter().zip(b) {
                // Noise floor: q/k/v are rounded to f16 in both, and a value computed in f32 that
                // lands on the other side of an f16 rounding boundary than its f64 twin moves the
                // logits by up to ~3e-4. Widening any span by one key moves them by 8e-2..5e-1.
                prop_assert!((x - y).abs() <= 2e-3 * (1.0 + y.abs()), "position {}: {} vs {} (caps {:?})", p, x, y, caps);
            }
        }
    }
}

#[test]
fn plan_covering_the_sequence_equals_dense_exactly() {
    let f = fixture();
    let c = &f.model.config;
    let n = 90;
    let toks = tokens(n, 3, c.n_vocab as u32);
    let full = small_plan(
        vec![
            Rule {
                alpha: 0.0,
                beta: 1.0
            };
            c.n_layer * c.n_head_kv
        ],
        c.n_layer,
        c.n_head_kv,
    );
    let dense = KvLayout::dense(1, c.n_layer, c.n_head_kv, c.head_dim, n);
    let mut a = CpuBackend::new(
        Arc::clone(&f.model),
        BackendOptions {
            max_batch: 32,
            threads: 2,
            layout: full.layout(c, 1, n),
        },
    )
    .unwrap();
    let mut b = CpuBackend::new(
        Arc::clone(&f.model),
        BackendOptions {
            max_batch: 32,
            threads: 2,
            layout: dense,
        },
    )
    .unwrap();
    let la = common::logits_all(&mut a, &toks, 50, 16);
    let lb = common::logits_all(&mut b, &toks, 50, 16);
    let worst = la
        .iter()
        .zip(&lb)
        .flat_map(|(x, y)| x.iter().zip(y).map(|(p, q)| (p - q).abs()))
        .fold(0f32, f32::max);
    assert!(
        worst <= 1e-6,
        "full-span plan differs from dense by {worst}"
    );
}

#[test]
fn kv_bytes_follow_the_formula() {
    // The default model's attention shape: 30 layers, 3 KV heads of 64.
    let (n_layer, n_kv, hd, n) = (30, 3, 64, 8192);
    let plan = Plan::uniform(n_layer, n_kv, 0.5);
    let layout =
        KvLayout::with_capacities(1, n_layer, n_kv, hd, n, plan.sink as usize, plan.spans(n))
            .unwrap();
    let formula: usize = plan.spans(n).iter().map(|&c| c.min(n) * hd * 2 * 2).sum();
    assert_eq!(layout.bytes(2), formula);
    let ratio = layout.bytes(2) as f64 / layout.dense_bytes(2) as f64;
    assert!(
        ratio <= 0.52,
        "0.5 density at 8192 uses {ratio:.3} of dense"
    );
    println!(
        "uniform 0.5 at N=8192: {} of {} bytes ({ratio:.3})",
        layout.bytes(2),
        layout.dense_bytes(2)
    );
}
