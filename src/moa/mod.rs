//! Mixture of Attention Spans: span plans (one elastic rule per KV head), their `moa.*` GGUF
//! metadata and JSON files, reports, and the translation of a plan into KV cache capacities. The
//! cache and the span-aware attention that execute a plan live in [`crate::kv`] and the backends.

pub mod json;
pub mod metadata;
pub mod optimize;
pub mod plan;
pub mod profile_file;
pub mod report;

pub use json::ImportReport;
pub use metadata::{PlanFileError, MOA_KEYS, MOA_PREFIX, MOA_VERSION};
pub use plan::{Plan, PlanError, Rule};
