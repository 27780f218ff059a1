//! Descriptions of a GGUF file for people and machines (what `moa-inspect` prints): metadata with
//! types and values, arrays abbreviated on request, and the tensor table.

use std::fmt::Write as _;

use serde_json::{json, Map, Value as Json};

use crate::gguf::{Gguf, Value};

/// How many items of an array are shown when arrays are abbreviated.
pub const ARRAY_PREVIEW: usize = 8;

/// A metadata value as JSON: numbers, bools, strings (lossy UTF-8), nested lists. Non-finite
/// floats, which JSON cannot hold, become the strings "nan", "inf" and "-inf".
pub fn value_to_json(v: &Value, limit: Option<usize>) -> Json {
    let float = |f: f64| {
        if f.is_finite() {
            json!(f)
        } else if f.is_nan() {
            json!("nan")
        } else if f > 0.0 {
            json!("inf")
        } else {
            json!("-inf")
        }
    };
    match v {
        Value::U8(x) => json!(x),
        Value::I8(x) => json!(x),
        Value::U16(x) => json!(x),
        Value::I16(x) => json!(x),
        Value::U32(x) => json!(x),
        Value::I32(x) => json!(x),
        Value::U64(x) => json!(x),
        Value::I64(x) => json!(x),
        Value::F32(x) => float(*x as f64),
        Value::F64(x) => float(*x),
        Value::Bool(x) => json!(x),
        Value::String(s) => json!(s.to_string_lossy()),
        Value::Array(_, items) => {
            let n = limit.map_or(items.len(), |l| l.min(items.len()));
            Json::Array(items[..n].iter().map(|i| value_to_json(i, limit)).collect())
        }
    }
}

/// The whole header as JSON. With `full == false`, arrays show their first [`ARRAY_PREVIEW`]
/// items and carry `"truncated": true`.
pub fn to_json(path: &str, g: &Gguf, full: bool) -> Json {
    let limit = if full { None } else { Some(ARRAY_PREVIEW) };
    let metadata: Vec<Json> = g
        .metadata
        .iter()
        .enumerate()
        .map(|(i, (k, v))| {
            let mut m = Map::new();
            m.insert("index".into(), json!(i));
            m.insert("key".into(), json!(k));
            m.insert("type".into(), json!(v.value_type().name()));
            if let Value::Array(t, items) = v {
                m.insert("element_type".into(), json!(t.name()));
                m.insert("len".into(), json!(items.len()));
                if !full && items.len() > ARRAY_PREVIEW {
                    m.insert("truncated".into(), json!(true));
                }
            }
            m.insert("value".into(), value_to_json(v, limit));
            Json::Object(m)
        })
        .collect();
    let tensors: Vec<Json> = g
        .tensors
        .iter()
        .enumerate()
        .map(|(i, t)| {
            json!({
                "index": i,
                "name": t.name,
                "type": t.ty.name(),
                "type_id": t.ty.id(),
                "shape": t.dims,
                "n_elements": t.n_elements(),
                "offset": t.offset,
                "data_offset": g.data_offset + t.offset,
                "n_bytes": t.n_bytes,
            })
        })
        .collect();
    json!({
        "file": path,
        "version": g.version,
        "alignment": g.alignment,
        "file_size": g.file_size,
        "data_offset": g.data_offset,
        "n_kv": g.metadata.len(),
        "n_tensors": g.tensors.len(),
        "metadata": metadata,
        "tensors": tensors,
    })
}

fn value_to_text(v: &Value, full: bool) -> String {
    match v {
        Value::String(s) => format!("{:?}", s.to_string_lossy()),
        Value::Array(_, items) => {
            let n = if full {
                items.len()
            } else {
                items.len().min(ARRAY_PREVIEW)
            };
            let mut s = String::from("[");
            for (i, item) in items[..n].iter().enumerate() {
                if i > 0 {
                    s.push_str(", ");
                }
                s.push_str(&value_to_text(item, full));
            }
            if n < items.len() {
                let _ = write!(s, ", ... ({} more)", items.len() - n);
            }
            s.push(']');
            s
        }
        Value::F32(x) => x.to_string(),
        other => value_to_json(other, None).to_string(),
    }
}

/// The header as text, in the spirit of gguf-py's `gguf_dump`.
pub fn to_text(path: &str, g: &Gguf, full: bool) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "* File: {path}");
    let _ = writeln!(
        s,
        "* GGUF v{}, {} bytes, alignment {}, data section at offset {}",
        g.version, g.file_size, g.alignment, g.data_offset
    );
    let _ = writeln!(s, "\n* Metadata: {} key/value pairs", g.metadata.len());
    let _ = writeln!(s, "{:>5}  {:<16} {:>8}  key = value", "#", "type", "count");
    for (i, (k, v)) in g.metadata.iter().enumerate() {
        let (ty, count) = match v {
            Value::Array(t, items) => (format!("ARRAY[{}]", t.name()), items.len()),
            v => (v.value_type().name().to_string(), 1),
        };
        let _ = writeln!(
            s,
            "{:>5}  {:<16} {:>8}  {} = {}",
            i + 1,
            ty,
            count,
            k,
            value_to_text(v, full)
        );
    }
    let _ = writeln!(s, "\n* Tensors: {}", g.tensors.len());
    let name_w = g
        .tensors
        .iter()
        .map(|t| t.name.len())
        .max()
        .unwrap_or(4)
        .max(4);
    let _ = writeln!(
        s,
        "{:>5}  {:<name_w$}  {:<7}  {:<24}  {:>12}  {:>12}",
        "#", "name", "type", "shape", "offset", "bytes"
    );
    for (i, t) in g.tensors.iter().enumerate() {
        let shape = format!("{:?}", t.dims);
        let _ = writeln!(
            s,
            "{:>5}  {:<name_w$}  {:<7}  {:<24}  {:>12}  {:>12}",
            i + 1,
            t.name,
            t.ty.name(),
            shape,
            t.offset,
            t.n_bytes
        );
    }
    let total: u64 = g.tensors.iter().map(|t| t.n_bytes).sum();
    let params: u64 = g.tensors.iter().map(|t| t.n_elements()).sum();
    let _ = writeln!(
        s,
        "\n* {} parameters, {} bytes of tensor data",
        params, total
    );
    s
}
