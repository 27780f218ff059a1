//! The CPU backend: executes the graph with quantized weights read straight from the memory map,
//! ggml-compat dot kernels (AVX2 when available) and rayon threads. Every buffer (activations,
//! quantized activations, KV cache in the layout's f16 or q8_0 rows, logits, per-thread
//! attention scratch) is allocated once in [`CpuBackend::new`]; a forward step allocates nothing.

mod attention;
pub use attention::{attention_reference, AttnCase};
pub mod ggml_attn;
mod ggml_decode;
pub mod ggml_tile;
mod matmul;
pub mod ops;
pub mod simd;

use std::sync::{Arc, Mutex};

use ggml_compat::dot::{
    dot2_kernel, dot_kernel, dot_tile_kernel, vec_dot_type, Dot2Fn, DotFn, DotTileFn,
};
use ggml_compat::GgmlType;
use rayon::prelude::*;

use self::attention::{KvRows, LayerKv, Run, Scratch};
use self::matmul::{MatJob, MAX_JOBS};
use super::{validate_batch, Backend, BackendError, BackendOptions};
use crate::graph::{ActId, Batch, Op};
use crate::kv::KvLayout;
use crate::model::Model;

/// How a matrix weight is multiplied: its kernel and activation format.
#[derive(Clone, Copy)]
struct MatKernel {
    dot: DotFn,
    dot2: Option<Dot2Fn>,
    tile: Option<DotTileFn>,
    act_ty: GgmlType,
}

pub struct CpuBackend {
    model: Arc<Model>,
    pool: Arc<rayon::ThreadPool>,
    threads: usize,
    max_batch: usize,
    max_logits: usize,
    layout: KvLayout,
    /// One buffer per graph activation: `max_batch` rows of its width.
    acts: Vec<Vec<f32>>,
    /// Bumped whenever an op writes the activation (keys the quantized-activation cache).
    act_version: Vec<u64>,
    /// Vector weights (norms) dequantized to f32, by weight id.
    vectors: Vec<Option<Vec<f32>>>,
    kernels: Vec<Option<MatKernel>>,
    /// Quantized activation rows and what they hold: (activation, type, version).
    qbuf: Vec<u8>,
    qkey: Option<(ActId, GgmlType, u64)>,
    /// Logit rows' inputs gathered and quantized.
    logit_x: Vec<f32>,
    kv: Vec<LayerKv>,
    seq_len: Vec<usize>,
    /// The batch's new K and V rows in the cache's types (before they are stored).
    k_new: KvRows,
    v_new: KvRows,
    rope_cs: Vec<(f32, f32)>,
    scratch: Vec<Mutex<Scratch>>,
    logits: Vec<f32>,
    n_logits: usize,
    /// Scratch of the matrix products' task list.
    tasks: Vec<(usize, usize, usize)>,
}

/// Applies `f` to each `(dst row, src row)` pair, in parallel only when the batch is large enough
/// to pay for the fork (a decode step runs these small ops on one thread).
fn rows2(
    dst: &mut [f32],
    src: &[f32],
    width: usize,
    n: usize,
    f: impl Fn(&mut [f32], &[f32]) + Sync,
) {
    let (d, s) = (&mut dst[..n * width], &src[..n * width]);
    if n >= 16 {
        d.par_chunks_mut(width)
            .zip(s.par_chunks(width))
            .for_each(|(a, b)| f(a, b));
    } else {
        d.chunks_mut(width)
            .zip(s.chunks(width))
            .for_each(|(a, b)| f(a, b));
    }
}

/// Allocates a buffer or reports how much was asked.
fn alloc<T: Clone>(n: usize, value: T, what: &str) -> Result<Vec<T>, BackendError> {
    let mut v = Vec::new();
    v.try_reserve_exact(n)
        .map_err(|_| BackendError::OutOfMemory {
            what: what.into(),
            bytes: n * std::mem::size_of::<T>(),
        })?;
    v.resize(n, value);
    Ok(v)
}

impl CpuBackend {
    pub fn new(model: Arc<Model>, opts: BackendOptions) -> Result<CpuBackend, BackendError> {
        let cfg = &model.config;
        let threads = opts.threads.max(1);
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .map(Arc::new)
            .map_err(|e| BackendError::OutOfMemory {
                what: format!("thread pool ({e})"),
                bytes: 0,
            })?;
        let max_batch = opts.max_batch.max(1);
        let max_logits = max_batch;
        let layout = opts.layout;
        assert_eq!(
            (layout.n_layer, layout.n_head_kv, layout.head_dim),
            (cfg.n_layer, cfg.n_head_kv, cfg.head_dim)
        );

        let graph = &model.graph;
        let mut acts = Vec::with_capacity(graph.acts.len());
        for a in &graph.acts {
            acts.push(alloc(max_batch * a.width, 0f32, a.name)?);
        }
        let n_w = model.weights.table.len();
        let mut vectors = vec![None; n_w];
        let mut kernels = vec![None; n_w];
        let mut qbytes = 0;
        for op in &graph.ops {
            match *op {
                Op::RmsNorm { w, .. } => vectors[w] = Some(model.weight_f32(w)?),
                Op::MatMul { w, .. } | Op::Logits { w, .. } => {
                    let wt = &model.weights.table[w];
                    let act_ty = vec_dot_type(wt.ty).expect("matrix types were validated at load");
                    let dot = dot_kernel(wt.ty).expect("kernel exists for validated types");
                    kernels[w] = Some(MatKernel {
                        dot,
                        dot2: dot2_kernel(wt.ty),
                        tile: dot_tile_kernel(wt.ty),
                        act_ty,
                    });
                    qbytes = qbytes.max(
                        act_ty
                            .bytes_for(wt.cols as u64)
                            .map_err(crate::model::ModelError::from)?
                            as usize,
                    );
                }
                _ => {}
            }
        }
        let types = layout.types();
        let mut kv = Vec::with_capacity(cfg.n_layer);
        for l in 0..cfg.n_layer {
            let n = layout.rows_per_layer(l) * cfg.head_dim;
            kv.push(LayerKv {
                k: KvRows::alloc(types.k, n, "KV cache (K)")?,
                v: KvRows::alloc(types.v, n, "KV cache (V)")?,
            });
        }
        let max_keys = layout.n_ctx + max_batch;
        let scratch = (0..threads)
            .map(|_| Mutex::new(Scratch::new(max_keys, cfg.head_dim, types.k)))
            .collect();
        Ok(CpuBackend {
            pool,
            threads,
            max_batch,
            max_logits,
            acts,
            act_version: vec![0; graph.acts.len()],
            vectors,
            kernels,
            qbuf: alloc(max_batch * qbytes, 0u8, "quantized activations")?,
            qkey: None,
            logit_x: alloc(max_logits * cfg.n_embd, 0f32, "logit inputs")?,
            kv,
            seq_len: vec![0; layout.n_seq],
            k_new: KvRows::alloc(types.k, max_batch * cfg.kv_dim(), "new keys")?,
            v_new: KvRows::alloc(types.v, max_batch * cfg.kv_dim(), "new values")?,
            rope_cs: alloc(max_batch * cfg.rope.n_rot / 2, (0f32, 0f32), "rope angles")?,
            scratch,
            logits: alloc(max_logits * cfg.n_vocab, 0f32, "logits")?,
            n_logits: 0,
            tasks: Vec::with_capacity(4096),
            layout,
            model,
        })
    }

    /// Quantizes the first `n` rows of activation `x` for weight kernel `k` unless already done.
    fn quantize_act(&mut self, x: ActId, k: MatKernel, n: usize) {
        let key = (x, k.act_ty, self.act_version[x]);
        if self.qkey != Some(key) {
            let width = self.model.graph.acts[x].width;
            matmul::quantize_rows(k.act_ty, &self.acts[x], width, n, &mut self.qbuf);
            self.qkey = Some(key);
        }
    }

    /// End of the run of `MatMul` ops starting at `i` that read the same activation in the same
    /// format (and do not overwrite it); `i` itself when `ops[i]` is not a `MatMul`.
    fn matmul_group_end(&self, ops: &[Op], i: usize) -> usize {
        let Op::MatMul { w: w0, x: x0, .. } = ops[i] else {
            return i;
        };
        let ty = self.kernels[w0].map(|k| k.act_ty);
        let mut j = i;
        while j < ops.len() && j - i < MAX_JOBS {
            match ops[j] {
                Op::MatMul { w, x, out }
                    if x == x0 && out != x0 && self.kernels[w].map(|k| k.act_ty) == ty =>
                {
                    j += 1
                }
                _ => break,
            }
        }
        j
    }

    /// Runs consecutive `MatMul` ops that read the same activation (in the same activation
    /// format) as one parallel region.
    fn matmul_group(&mut self, ops: &[Op], n: usize) {
        let Op::MatMul { w: w0, x, .. } = ops[0] else {
            unreachable!("matmul groups hold MatMul ops")
        };
        let k = self.kernels[w0].expect("kernel prepared");
        self.quantize_act(x, k, n);
        let model = Arc::clone(&self.model);
        let mut outs = [usize::MAX; MAX_JOBS];
        let mut weights = [w0; MAX_JOBS];
        let mut bufs: [Vec<f32>; MAX_JOBS] = Default::default();
        for (i, op) in ops.iter().enumerate() {
            if let Op::MatMul { w, out, .. } = *op {
                outs[i] = out;
                weights[i] = w;
                bufs[i] = std::mem::take(&mut self.acts[out]);
            }
        }
        {
            let mut bufs_iter = bufs.iter_mut();
            let mut jobs: [MatJob; MAX_JOBS] = std::array::from_fn(|i| {
                let buf = bufs_iter.next().expect("one buffer per job");
                let id = weights[i];
                let wt = &model.weights.table[id];
                let live = i < ops.len();
                let k = self.kernels[id].expect("kernel prepared");
                MatJob {
                    dot: k.dot,
                    dot2: k.dot2,
                    tile: k.tile,
                    w: if live { model.weight_bytes(id) } else { &[] },
                    rows: if live { wt.rows } else { 0 },
                    row_bytes: wt.row_bytes(),
                    cols: wt.cols,
                    out: &mut buf[..],
                }
            });
            let wt = &model.weights.table[w0];
            let arb = k
                .act_ty
                .bytes_for(wt.cols as u64)
                .expect("validated at load") as usize;
            matmul::matmul(&mut jobs[..ops.len()], &self.qbuf, arb, n, &mut self.tasks);
        }
        for i in 0..ops.len() {
            self.acts[outs[i]] = std::mem::take(&mut bufs[i]);
            self.act_version[outs[i]] += 1;
        }
    }

    fn run_op(&mut self, op: &Op, batch: &Batch) {
        let n = batch.len();
        let model = Arc::clone(&self.model);
        let cfg = &model.config;
        match *op {
            Op::Embed { table, out } => {
                let wt = &model.weights.table[table];
                let (bytes, rb, w) = (model.weight_bytes(table), wt.row_bytes(), wt.cols);
                self.acts[out][..n * w]
                    .par_chunks_mut(w)
                    .zip(batch.tokens)
                    .for_each(|(row, &tok)| {
                        ops::embed_row(wt.ty, bytes, rb, tok as usize, row);
                    });
                self.act_version[out] += 1;
            }
            Op::RmsNorm { x, w, eps, out } => {
                let width = model.graph.acts[x].width;
                let weight = self.vectors[w].as_ref().expect("norm prepared");
                let mut dst = std::mem::take(&mut self.acts[out]);
                rows2(&mut dst, &self.acts[x], width, n, |o, xi| {
                    ops::rms_norm(xi, weight, eps, o)
                });
                self.acts[out] = dst;
                self.act_version[out] += 1;
            }
            Op::MatMul { .. } => self.matmul_group(std::slice::from_ref(op), n),
            Op::Rope {
                x,
                n_heads,
                head_dim,
            } => {
                let width = n_heads * head_dim;
                let half = cfg.rope.n_rot / 2;
                let cs = &self.rope_cs;
                for (t, row) in self.acts[x][..n * width].chunks_mut(width).enumerate() {
                    ops::rope_row(row, head_dim, &cs[t * half..(t + 1) * half]);
                }
                self.act_version[x] += 1;
            }
            Op::Attention {
                layer,
                q,
                k,
                v,
                out,
            } => {
                let kv_dim = cfg.kv_dim();
                self.k_new.store_f32(0, &self.acts[k][..n * kv_dim]);
                self.v_new.store_f32(0, &self.acts[v][..n * kv_dim]);
                let q_dim = cfg.q_dim();
                let mut dst = std::mem::take(&mut self.acts[out]);
                for (seq, start, len) in batch.runs() {
                    let run = Run {
                        layout: &self.layout,
                        layer,
                        seq: seq as usize,
                        p0: batch.positions[start] as usize,
                        n: len,
                        n_head: cfg.n_head,
                        n_batch: n,
                        q: &self.acts[q][start * q_dim..(start + len) * q_dim],
                        k_new: self
                            .k_new
                            .view()
                            .range(start * kv_dim, (start + len) * kv_dim),
                        v_new: self
                            .v_new
                            .view()
                            .range(start * kv_dim, (start + len) * kv_dim),
                        out: &mut dst[start * q_dim..(start + len) * q_dim],
                    };
                    attention::attend_and_store(run, &mut self.kv[layer], &self.scratch);
                }
                self.acts[out] = dst;
                self.act_version[out] += 1;
            }
            Op::SwiGlu { gate, up } => {
                let width = model.graph.acts[gate].width;
                let mut g = std::mem::take(&mut self.acts[gate]);
                rows2(&mut g, &self.acts[up], width, n, ops::swiglu);
                self.acts[gate] = g;
                self.act_version[gate] += 1;
            }
            Op::Add { x, y } => {
                let width = model.graph.acts[x].width;
                let mut a = std::mem::take(&mut self.acts[x]);
                rows2(&mut a, &self.acts[y], width, n, ops::add);
                self.acts[x] = a;
                self.act_version[x] += 1;
            }
            Op::Logits { w, x } => {
                let width = model.graph.acts[x].width;
                let mut m = 0;
                for (t, _) in batch.want_logits.iter().enumerate().filter(|(_, &b)| b) {
                    self.logit_x[m * width..(m + 1) * width]
                        .copy_from_slice(&self.acts[x][t * width..(t + 1) * width]);
                    m += 1;
                }
                self.n_logits = m;
                if m == 0 {
                    return;
                }
                let k = self.kernels[w].expect("kernel prepared");
                matmul::quantize_rows(k.act_ty, &self.logit_x, width, m, &mut self.qbuf);
                self.qkey = None;
                let wt = &model.weights.table[w];
                let arb = k.act_ty.bytes_for(wt.cols as u64).unwrap() as usize;
                let mut job = [MatJob {
                    dot: k.dot,
                    dot2: k.dot2,
                    tile: k.tile,
                    w: model.weight_bytes(w),
                    rows: wt.rows,
                    row_bytes: wt.row_bytes(),
                    cols: wt.cols,
                    out: &mut self.logits[..],
                }];
                matmul::matmul(&mut job, &self.qbuf, arb, m, &mut self.tasks);
            }
        }
    }
}

impl Backend for CpuBackend {
    fn describe(&self) -> String {
        let simd = match ggml_compat::dot::kernel_set() {
            ggml_compat::dot::KernelSet::Avx2 => "avx2",
            ggml_compat::dot::KernelSet::Scalar => "scalar",
        };
        format!("cpu ({simd}, {} threads)", self.threads)
    }

    fn forward(&mut self, batch: &Batch) -> Result<(), BackendError> {
        validate_batch(
            batch,
            |s| self.seq_len[s],
            &self.layout,
            self.max_batch,
            self.max_logits,
            self.model.config.n_vocab,
        )?;
        let model = Arc::clone(&self.model);
        let half = model.config.rope.n_rot / 2;
        for (t, &p) in batch.positions.iter().enumerate() {
            ops::rope_angles(
                &model.config.rope,
                p,
                &mut self.rope_cs[t * half..(t + 1) * half],
            );
        }
        self.qkey = None;
        // The pool is shared through an Arc so the ops can borrow `self` inside `install`.
        let pool = Arc::clone(&self.pool);
        pool.install(|| {
            let ops = &model.graph.ops;
            let mut i = 0;
            while i < ops.len() {
                let end = self.matmul_group_end(ops, i);
                if end > i + 1 || matches!(ops[i], Op::MatMul { .. }) {
                    self.matmul_group(&ops[i..end], batch.len());
                    i = end;
                } else {
                    self.run_op(&ops[i], batch);
                    i += 1;
                }
            }
        });
        for (seq, _, len) in batch.runs() {
            self.seq_len[seq as usize] += len;
        }
        Ok(())
    }

    fn logits(&self) -> &[f32] {
        &self.logits[..self.n_logits * self.model.config.n_vocab]
    }

    fn n_vocab(&self) -> usize {
        self.model.config.n_vocab
    }

    fn seq_len(&self, seq: usize) -> usize {
        self.seq_len[seq]
    }

    fn clear(&mut self, seq: usize) {
        self.seq_len[seq] = 0;
    }

    fn rewind(&mut self, seq: usize, len: usize) {
        self.seq_len[seq] = self.seq_len[seq].min(len);
    }

    fn kv_layout(&self) -> &KvLayout {
        &self.layout
    }

    fn kv_bytes(&self) -> usize {
        self.layout.bytes()
    }
}
