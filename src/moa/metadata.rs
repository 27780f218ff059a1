//! The `moa.*` section of a GGUF file (../shared/docs/gguf-moa.md): a span plan as flat key/value
//! metadata, so a converted model still loads in every other GGUF reader. Reading validates every
//! key against the model's shape and names the key in each error.
//!
//! | key | type | meaning |
//! |---|---|---|
//! | `moa.version` | u32 | 1 |
//! | `moa.granularity` | string | `kv_head` (one rule per KV head) |
//! | `moa.sink_tokens` | u32 | always-visible leading tokens |
//! | `moa.min_span` | u32 | smallest span |
//! | `moa.span_align` | u32 | spans are rounded up to a multiple of this (a power of two) |
//! | `moa.alpha` | f32[] | `block_count * head_count_kv` values, layer-major |
//! | `moa.beta` | f32[] | same shape, each in [0, 1] |
//! | `moa.density` | f32 | mean density the plan was built for (absent when unknown) |
//! | `moa.plan.source` | string | `profiled`, `reference-json`, `uniform`, ... |
//! | `moa.plan.lengths` | u32[] | lengths the plan was profiled or constrained at |
//! | `moa.plan.note` | string | free text |

use std::path::PathBuf;

use crate::gguf::{Gguf, GgufBuilder, GgufError, Value, ValueType};

use super::plan::{Plan, PlanError, Rule};

/// Format version of the `moa.*` section written and read by this build.
pub const MOA_VERSION: u32 = 1;
/// Prefix of every key of the section.
pub const MOA_PREFIX: &str = "moa.";

pub const KEY_VERSION: &str = "moa.version";
pub const KEY_GRANULARITY: &str = "moa.granularity";
pub const KEY_SINK: &str = "moa.sink_tokens";
pub const KEY_MIN_SPAN: &str = "moa.min_span";
pub const KEY_ALIGN: &str = "moa.span_align";
pub const KEY_ALPHA: &str = "moa.alpha";
pub const KEY_BETA: &str = "moa.beta";
pub const KEY_DENSITY: &str = "moa.density";
pub const KEY_SOURCE: &str = "moa.plan.source";
pub const KEY_LENGTHS: &str = "moa.plan.lengths";
pub const KEY_NOTE: &str = "moa.plan.note";

/// Every key of the section, in the order [`Plan::to_metadata`] writes them.
pub const MOA_KEYS: [&str; 11] = [
    KEY_VERSION,
    KEY_GRANULARITY,
    KEY_SINK,
    KEY_MIN_SPAN,
    KEY_ALIGN,
    KEY_ALPHA,
    KEY_BETA,
    KEY_DENSITY,
    KEY_SOURCE,
    KEY_LENGTHS,
    KEY_NOTE,
];

/// The only granularity this build reads and writes.
pub const GRANULARITY_KV_HEAD: &str = "kv_head";

/// Errors reading or writing a plan (GGUF metadata, our JSON, the reference JSON). Every message
/// names the key or field involved.
#[derive(Debug, thiserror::Error)]
pub enum PlanFileError {
    #[error("{key}: missing")]
    Missing { key: String },
    #[error("{key}: expected {expected}, found {found}")]
    WrongType {
        key: String,
        expected: String,
        found: String,
    },
    #[error("{key}: {reason}")]
    Invalid { key: String, reason: String },
    #[error("{key}: {err}")]
    Plan { key: String, err: PlanError },
    #[error("{what}: invalid JSON: {err}")]
    Json {
        what: String,
        err: serde_json::Error,
    },
    #[error("{}: {err}", path.display())]
    Io { path: PathBuf, err: std::io::Error },
    /// An error in a plan file, with the file's path.
    #[error("{}: {err}", path.display())]
    InFile {
        path: PathBuf,
        err: Box<PlanFileError>,
    },
    #[error(transparent)]
    Gguf(#[from] GgufError),
}

impl PlanFileError {
    pub(crate) fn invalid(key: impl Into<String>, reason: impl Into<String>) -> PlanFileError {
        PlanFileError::Invalid {
            key: key.into(),
            reason: reason.into(),
        }
    }

    pub(crate) fn io(path: impl Into<PathBuf>, err: std::io::Error) -> PlanFileError {
        PlanFileError::Io {
            path: path.into(),
            err,
        }
    }
}

/// The GGUF key of a rule error (`moa.alpha`, `moa.beta`, `moa.span_align`, ...).
fn gguf_key_of(e: &PlanError) -> String {
    match e {
        PlanError::WrongShape { .. } => KEY_ALPHA.into(),
        PlanError::NotFinite { what, .. } => format!("moa.{what}"),
        PlanError::BetaRange { .. } => KEY_BETA.into(),
        PlanError::BadConstant { what, .. } => format!("moa.{what}"),
    }
}

fn wrong_type(key: &str, expected: &str, v: &Value) -> PlanFileError {
    PlanFileError::WrongType {
        key: key.into(),
        expected: expected.into(),
        found: v.type_description(),
    }
}

fn required<'a>(g: &'a Gguf, key: &str) -> Result<&'a Value, PlanFileError> {
    g.get(key)
        .ok_or_else(|| PlanFileError::Missing { key: key.into() })
}

/// An unsigned integer key that fits in u32 (any integer type is accepted).
fn read_u32(g: &Gguf, key: &str) -> Result<u32, PlanFileError> {
    let v = required(g, key)?;
    let i = match v {
        Value::Bool(_) => None,
        v => v.as_integer(),
    }
    .ok_or_else(|| wrong_type(key, "an unsigned integer (UINT32)", v))?;
    u32::try_from(i).map_err(|_| PlanFileError::invalid(key, format!("{i} is not a UINT32")))
}

fn read_str<'a>(g: &'a Gguf, key: &str) -> Result<&'a str, PlanFileError> {
    let v = required(g, key)?;
    v.as_str()
        .ok_or_else(|| wrong_type(key, "a UTF-8 STRING", v))
}

/// A float array (FLOAT32, or FLOAT64 narrowed) of exactly `len` items.
fn read_f32_array(g: &Gguf, key: &str, len: usize, shape: &str) -> Result<Vec<f32>, PlanFileError> {
    let v = required(g, key)?;
    let (t, items) = match v {
        Value::Array(t @ (ValueType::F32 | ValueType::F64), items) => (*t, items),
        v => return Err(wrong_type(key, "ARRAY[FLOAT32]", v)),
    };
    if items.len() != len {
        return Err(PlanFileError::invalid(
            key,
            format!(
                "has {} values, the model needs {len} ({shape})",
                items.len()
            ),
        ));
    }
    items
        .iter()
        .map(|x| match x {
            Value::F32(f) => Ok(*f),
            Value::F64(f) => Ok(*f as f32),
            x => Err(wrong_type(key, &format!("items of type {t}"), x)),
        })
        .collect()
}

fn write_str(s: &str) -> Value {
    Value::string(s)
}

impl Plan {
    /// The plan embedded in a GGUF file: `None` when the file has no `moa.version` key (and no
    /// other `moa.*` key), otherwise the validated plan or an error naming the offending key.
    /// The shape comes from `{arch}.block_count` and `{arch}.attention.head_count_kv` (falling
    /// back to `head_count`).
    pub fn from_gguf(g: &Gguf) -> Result<Option<Plan>, PlanFileError> {
        if g.get(KEY_VERSION).is_none() {
            if let Some((k, _)) = g.metadata.iter().find(|(k, _)| k.starts_with(MOA_PREFIX)) {
                return Err(PlanFileError::invalid(
                    KEY_VERSION,
                    format!("missing, but the file has other moa.* keys (e.g. {k})"),
                ));
            }
            return Ok(None);
        }
        let version = read_u32(g, KEY_VERSION)?;
        if version != MOA_VERSION {
            return Err(PlanFileError::invalid(
                KEY_VERSION,
                format!("unsupported version {version} (this build reads version {MOA_VERSION})"),
            ));
        }
        check_granularity(KEY_GRANULARITY, read_str(g, KEY_GRANULARITY)?)?;

        let arch = g.get_str("general.architecture")?;
        let block_count = format!("{arch}.block_count");
        let n_layer = g.get_u64(&block_count)? as usize;
        let kv_key = format!("{arch}.attention.head_count_kv");
        let n_head_kv = match g.get(&kv_key) {
            Some(_) => g.get_u64(&kv_key)? as usize,
            None => g.get_u64(&format!("{arch}.attention.head_count"))? as usize,
        };
        if n_layer == 0 || n_head_kv == 0 {
            return Err(PlanFileError::invalid(
                block_count,
                format!("the model has {n_layer} layers x {n_head_kv} KV heads"),
            ));
        }

        let sink = read_u32(g, KEY_SINK)?;
        let min_span = read_u32(g, KEY_MIN_SPAN)?;
        let align = read_u32(g, KEY_ALIGN)?;
        let n = n_layer * n_head_kv;
        let shape = format!("{n_layer} layers x {n_head_kv} KV heads");
        let alpha = read_f32_array(g, KEY_ALPHA, n, &shape)?;
        let beta = read_f32_array(g, KEY_BETA, n, &shape)?;
        let density = match g.get(KEY_DENSITY) {
            None => None,
            Some(v) => {
                let d = match v {
                    Value::F32(d) => *d,
                    Value::F64(d) => *d as f32,
                    v => return Err(wrong_type(KEY_DENSITY, "FLOAT32", v)),
                };
                check_density(KEY_DENSITY, d)?;
                Some(d)
            }
        };
        let source = match g.get(KEY_SOURCE) {
            None => String::new(),
            Some(_) => read_str(g, KEY_SOURCE)?.to_string(),
        };
        let note = match g.get(KEY_NOTE) {
            None => String::new(),
            Some(_) => read_str(g, KEY_NOTE)?.to_string(),
        };
        let lengths = match g.get(KEY_LENGTHS) {
            None => Vec::new(),
            Some(v) => {
                let (_, items) = v
                    .as_array()
                    .ok_or_else(|| wrong_type(KEY_LENGTHS, "ARRAY[UINT32]", v))?;
                let mut out = Vec::with_capacity(items.len());
                for (i, x) in items.iter().enumerate() {
                    let n = match x {
                        Value::Bool(_) => None,
                        x => x.as_integer(),
                    }
                    .and_then(|n| u32::try_from(n).ok())
                    .filter(|&n| n > 0)
                    .ok_or_else(|| {
                        PlanFileError::invalid(
                            format!("{KEY_LENGTHS}[{i}]"),
                            format!("{x:?} is not a positive UINT32"),
                        )
                    })?;
                    out.push(n);
                }
                out
            }
        };
        let plan = Plan {
            n_layer,
            n_head_kv,
            rules: alpha
                .into_iter()
                .zip(beta)
                .map(|(alpha, beta)| Rule { alpha, beta })
                .collect(),
            sink,
            min_span,
            align,
            density,
            source,
            lengths,
            note,
        };
        plan.validate_rules()
            .map_err(|e| rule_error(MOA_PREFIX, gguf_key_of(&e), e))?;
        Ok(Some(plan))
    }

    /// The `moa.*` keys of this plan, in the documented order (`moa.density` omitted when
    /// unknown). The caller validates the plan first.
    pub fn to_metadata(&self) -> Vec<(String, Value)> {
        let f32s = |f: &dyn Fn(&Rule) -> f32| {
            Value::Array(
                ValueType::F32,
                self.rules.iter().map(|r| Value::F32(f(r))).collect(),
            )
        };
        let mut out = vec![
            (KEY_VERSION.to_string(), Value::U32(MOA_VERSION)),
            (KEY_GRANULARITY.into(), write_str(GRANULARITY_KV_HEAD)),
            (KEY_SINK.into(), Value::U32(self.sink)),
            (KEY_MIN_SPAN.into(), Value::U32(self.min_span)),
            (KEY_ALIGN.into(), Value::U32(self.align)),
            (KEY_ALPHA.into(), f32s(&|r| r.alpha)),
            (KEY_BETA.into(), f32s(&|r| r.beta)),
        ];
        if let Some(d) = self.density {
            out.push((KEY_DENSITY.into(), Value::F32(d)));
        }
        out.push((KEY_SOURCE.into(), write_str(&self.source)));
        out.push((
            KEY_LENGTHS.into(),
            Value::Array(
                ValueType::U32,
                self.lengths.iter().map(|&n| Value::U32(n)).collect(),
            ),
        ));
        out.push((KEY_NOTE.into(), write_str(&self.note)));
        out
    }

    /// Replaces the `moa.*` section of a file being written with this plan's keys.
    pub fn embed_into(&self, b: &mut GgufBuilder) {
        b.remove_prefix(MOA_PREFIX);
        for (k, v) in self.to_metadata() {
            b.set(&k, v);
        }
    }
}

/// A rule or constant error under `key`; constants read `{prefix}{name} = {value}: {reason}`.
pub(crate) fn rule_error(prefix: &str, key: String, e: PlanError) -> PlanFileError {
    match e {
        PlanError::BadConstant {
            what,
            value,
            reason,
        } => PlanFileError::invalid(format!("{prefix}{what} = {value}"), reason),
        e => PlanFileError::Plan { key, err: e },
    }
}

/// `kv_head` is accepted; `q_head` and anything else are errors naming `key`.
pub(crate) fn check_granularity(key: &str, g: &str) -> Result<(), PlanFileError> {
    match g {
        GRANULARITY_KV_HEAD => Ok(()),
        "q_head" => Err(PlanFileError::invalid(
            key,
            "\"q_head\" (one rule per query head) is not supported: moa plans have one rule per \
             KV head (\"kv_head\"); import per-query-head plans with --reference-json",
        )),
        other => Err(PlanFileError::invalid(
            key,
            format!("unknown granularity {other:?} (expected \"kv_head\")"),
        )),
    }
}

/// A plan's target density: finite and in [0, 1].
pub(crate) fn check_density(key: &str, d: f32) -> Result<(), PlanFileError> {
    if !d.is_finite() || !(0.0..=1.0).contains(&d) {
        return Err(PlanFileError::invalid(
            key,
            format!("{d} is not a density in [0, 1]"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::GgufFile;

    fn file_with(plan_keys: Vec<(String, Value)>) -> GgufFile {
        let mut b = GgufBuilder::new();
        b.set("general.architecture", Value::string("llama"));
        b.set("llama.block_count", Value::U32(2));
        b.set("llama.attention.head_count", Value::U32(4));
        b.set("llama.attention.head_count_kv", Value::U32(2));
        for (k, v) in plan_keys {
            b.set(&k, v);
        }
        let mut bytes = Vec::new();
        b.write_to(&mut bytes).unwrap();
        GgufFile::from_bytes(bytes).unwrap()
    }

    fn sample() -> Plan {
        let mut p = Plan::uniform(2, 2, 0.5);
        p.rules[1] = Rule {
            alpha: -1024.0,
            beta: 0.875,
        };
        p.rules[2] = Rule {
            alpha: 0.1,
            beta: 1.0 / 3.0,
        };
        p.lengths = vec![2048, 4096];
        p.note = "test ✓".into();
        p
    }

    #[test]
    fn round_trip() {
        let p = sample();
        let f = file_with(p.to_metadata());
        assert_eq!(Plan::from_gguf(&f).unwrap().unwrap(), p);
        let mut q = p.clone();
        q.density = None;
        let md = q.to_metadata();
        assert!(md.iter().all(|(k, _)| k != KEY_DENSITY));
        assert_eq!(Plan::from_gguf(&file_with(md)).unwrap().unwrap(), q);
        assert_eq!(Plan::from_gguf(&file_with(vec![])).unwrap(), None);
    }

    fn err_with(edit: impl Fn(&mut Vec<(String, Value)>)) -> String {
        let mut md = sample().to_metadata();
        edit(&mut md);
        Plan::from_gguf(&file_with(md)).unwrap_err().to_string()
    }

    fn set(md: &mut [(String, Value)], key: &str, v: Value) {
        md.iter_mut().find(|(k, _)| k == key).unwrap().1 = v;
    }

    #[test]
    fn errors_name_the_key() {
        let e = err_with(|md| set(md, KEY_VERSION, Value::U32(2)));
        assert!(
            e.contains("moa.version") && e.contains("unsupported version 2"),
            "{e}"
        );
        let e = err_with(|md| set(md, KEY_GRANULARITY, Value::string("q_head")));
        assert!(e.contains("moa.granularity") && e.contains("q_head"), "{e}");
        let e = err_with(|md| set(md, KEY_GRANULARITY, Value::string("layer")));
        assert!(
            e.contains("moa.granularity") && e.contains("\"layer\""),
            "{e}"
        );
        let e = err_with(|md| set(md, KEY_ALIGN, Value::U32(48)));
        assert!(
            e.contains("moa.span_align") && e.contains("power of two"),
            "{e}"
        );
        let e = err_with(|md| {
            set(
                md,
                KEY_ALPHA,
                Value::Array(ValueType::F32, vec![Value::F32(0.0); 3]),
            )
        });
        assert!(
            e.contains("moa.alpha") && e.contains("has 3 values") && e.contains("4"),
            "{e}"
        );
        let e = err_with(|md| {
            set(
                md,
                KEY_BETA,
                Value::Array(
                    ValueType::F32,
                    vec![
                        Value::F32(0.5),
                        Value::F32(0.5),
                        Value::F32(1.5),
                        Value::F32(0.5),
                    ],
                ),
            )
        });
        assert!(
            e.contains("moa.beta") && e.contains("layer 1 head 0") && e.contains("1.5"),
            "{e}"
        );
        let e = err_with(|md| {
            set(
                md,
                KEY_ALPHA,
                Value::Array(ValueType::F32, vec![Value::F32(f32::NAN); 4]),
            )
        });
        assert!(e.contains("moa.alpha") && e.contains("NaN"), "{e}");
        let e = err_with(|md| {
            set(
                md,
                KEY_BETA,
                Value::Array(ValueType::U32, vec![Value::U32(0); 4]),
            )
        });
        assert!(e.contains("moa.beta") && e.contains("ARRAY[UINT32]"), "{e}");
        let e = err_with(|md| md.retain(|(k, _)| k != KEY_MIN_SPAN));
        assert!(e.contains("moa.min_span: missing"), "{e}");
        let e = err_with(|md| md.retain(|(k, _)| k != KEY_VERSION));
        assert!(e.contains("moa.version"), "{e}");
        let e = err_with(|md| set(md, KEY_DENSITY, Value::F32(2.0)));
        assert!(e.contains("moa.density"), "{e}");
        let e = err_with(|md| set(md, KEY_SINK, Value::U32(0)));
        assert!(e.contains("moa.sink_tokens"), "{e}");
        let e = err_with(|md| {
            set(
                md,
                KEY_LENGTHS,
                Value::Array(ValueType::I32, vec![Value::I32(-1)]),
            )
        });
        assert!(e.contains("moa.plan.lengths[0]"), "{e}");
    }
}
