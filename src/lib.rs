//! moa: a runtime for quantized GGUF language models with Mixture-of-Attention-Spans.
//!
//! Data flows one way: [`gguf`] (the container: metadata, tensor views, writing) feeds the
//! formats in the `ggml-compat` crate, which later layers (model, graph, backends, MoA plans)
//! build on.
#![deny(unsafe_op_in_unsafe_fn)]

pub mod gguf;

pub use ggml_compat as formats;
pub mod backend;
pub mod chat;
pub mod eval;
pub mod generate;
pub mod graph;
pub mod inspect;
pub mod kv;
pub mod moa;
pub mod model;
pub mod perplexity;
pub mod profile;
pub mod runtime;
pub mod sampling;
pub mod tokenizer;
pub mod util;
