//! moa: a runtime for quantized GGUF language models with Mixture-of-Attention-Spans.
//!
//! Data flows one way: [`gguf`] (the container: metadata, tensor views, writing) feeds the
//! formats in the `ggml-compat` crate, which later layers (model, graph, backends, MoA plans)
//! build on.
#![deny(unsafe_op_in_unsafe_fn)]

pub mod gguf;

pub use ggml_compat as formats;
pub mod inspect;
pub mod util;
pub mod tokenizer;
pub mod chat;
pub mod sampling;
pub mod backend;
pub mod graph;
pub mod kv;
pub mod model;
pub mod generate;
pub mod perplexity;
pub mod runtime;
