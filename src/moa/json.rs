//! Plan files as JSON: our own schema (one rule per KV head, with the span constants), and the
//! import of the reference implementation's per-query-head `{"alphas": [[..]], "betas": [[..]]}`.
//!
//! Our schema (fields marked * are required; the others default as shown):
//!
//! ```text
//! { "version": 1*, "granularity": "kv_head", "n_layer": L*, "n_kv_heads": H*,
//!   "sink_tokens": 64, "min_span": 128, "span_align": 64, "density": null,
//!   "source": "", "lengths": [], "note": "",
//!   "rules": [[{"alpha": a, "beta": b}, ... H rules], ... L layers]* }
//! ```
//!
//! Unknown fields are errors (a misspelt constant must not be silently replaced by its default).
//! Python's `json` writes non-finite floats as the bare words `NaN` / `Infinity`; they are read
//! so that the error names the field that holds them.

use std::borrow::Cow;
use std::fmt::Write as _;
use std::path::Path;

use serde_json::{Map, Value as Json};

use super::metadata::{
    check_density, check_granularity, rule_error, PlanFileError, GRANULARITY_KV_HEAD, MOA_VERSION,
};
use super::plan::{Plan, PlanError, Rule, DEFAULT_ALIGN, DEFAULT_MIN_SPAN, DEFAULT_SINK};

/// The fields of our schema, in the order they are written.
const FIELDS: [&str; 12] = [
    "version",
    "granularity",
    "n_layer",
    "n_kv_heads",
    "sink_tokens",
    "min_span",
    "span_align",
    "density",
    "source",
    "lengths",
    "note",
    "rules",
];

/// Replaces the bare words `NaN`, `Infinity`, `-Infinity` outside strings by strings, so the
/// document parses and the reader can report which field holds a non-finite number.
fn quote_non_finite(text: &str) -> Cow<'_, str> {
    if !text.contains("NaN") && !text.contains("Infinity") {
        return Cow::Borrowed(text);
    }
    let b = text.as_bytes();
    let mut out = String::with_capacity(text.len() + 16);
    let (mut i, mut start) = (0, 0);
    let mut in_string = false;
    while i < b.len() {
        let c = b[i];
        if in_string {
            match c {
                b'\\' => i += 1,
                b'"' => in_string = false,
                _ => {}
            }
            i += 1;
            continue;
        }
        if c == b'"' {
            in_string = true;
            i += 1;
            continue;
        }
        let word_start = i == 0 || !(b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_');
        let mut matched = None;
        if word_start {
            for w in ["-Infinity", "Infinity", "NaN"] {
                let end = i + w.len();
                if b[i..].starts_with(w.as_bytes())
                    && (end == b.len() || !(b[end].is_ascii_alphanumeric() || b[end] == b'_'))
                {
                    matched = Some(w);
                    break;
                }
            }
        }
        match matched {
            Some(w) => {
                out.push_str(&text[start..i]);
                out.push('"');
                out.push_str(w);
                out.push('"');
                i += w.len();
                start = i;
            }
            None => i += 1,
        }
    }
    out.push_str(&text[start..]);
    Cow::Owned(out)
}

fn parse(text: &str, what: &str) -> Result<Json, PlanFileError> {
    serde_json::from_str(&quote_non_finite(text)).map_err(|err| PlanFileError::Json {
        what: what.into(),
        err,
    })
}

fn kind(v: &Json) -> &'static str {
    match v {
        Json::Null => "null",
        Json::Bool(_) => "a boolean",
        Json::Number(_) => "a number",
        Json::String(_) => "a string",
        Json::Array(_) => "an array",
        Json::Object(_) => "an object",
    }
}

fn wrong(key: &str, expected: &str, v: &Json) -> PlanFileError {
    PlanFileError::WrongType {
        key: key.into(),
        expected: expected.into(),
        found: match v {
            Json::String(s) => format!("the string {s:?}"),
            v => kind(v).into(),
        },
    }
}

/// A number (the strings `NaN`, `Infinity`, `-Infinity` stand for themselves) as f32.
fn number(key: &str, v: &Json) -> Result<f32, PlanFileError> {
    match v {
        Json::Number(n) => n
            .as_f64()
            .map(|x| x as f32)
            .ok_or_else(|| wrong(key, "a number", v)),
        Json::String(s) if s == "NaN" => Ok(f32::NAN),
        Json::String(s) if s == "Infinity" => Ok(f32::INFINITY),
        Json::String(s) if s == "-Infinity" => Ok(f32::NEG_INFINITY),
        v => Err(wrong(key, "a number", v)),
    }
}

fn unsigned(key: &str, v: &Json) -> Result<u32, PlanFileError> {
    match v.as_u64() {
        Some(n) => {
            u32::try_from(n).map_err(|_| PlanFileError::invalid(key, format!("{n} is too large")))
        }
        None => Err(wrong(key, "a non-negative integer", v)),
    }
}

fn array<'a>(key: &str, v: &'a Json) -> Result<&'a Vec<Json>, PlanFileError> {
    v.as_array().ok_or_else(|| wrong(key, "an array", v))
}

fn string(key: &str, v: &Json) -> Result<String, PlanFileError> {
    v.as_str()
        .map(str::to_string)
        .ok_or_else(|| wrong(key, "a string", v))
}

/// The JSON path of a rule error (`rules[1][0].beta`, `span_align`, ...).
fn json_key_of(e: &PlanError) -> String {
    match e {
        PlanError::WrongShape { .. } => "rules".into(),
        PlanError::NotFinite {
            layer, head, what, ..
        } => format!("rules[{layer}][{head}].{what}"),
        PlanError::BetaRange { layer, head, .. } => format!("rules[{layer}][{head}].beta"),
        PlanError::BadConstant { what, .. } => (*what).into(),
    }
}

/// One rule object `{"alpha": a, "beta": b}`.
fn rule(key: &str, v: &Json) -> Result<Rule, PlanFileError> {
    let o = v
        .as_object()
        .ok_or_else(|| wrong(key, "an object {\"alpha\": .., \"beta\": ..}", v))?;
    if let Some(k) = o.keys().find(|k| *k != "alpha" && *k != "beta") {
        return Err(PlanFileError::invalid(
            format!("{key}.{k}"),
            "unknown field (a rule has alpha and beta)",
        ));
    }
    let get = |f: &str| {
        let k = format!("{key}.{f}");
        o.get(f)
            .ok_or(PlanFileError::Missing { key: k.clone() })
            .and_then(|v| number(&k, v))
    };
    Ok(Rule {
        alpha: get("alpha")?,
        beta: get("beta")?,
    })
}

fn optional<'a>(o: &'a Map<String, Json>, key: &str) -> Option<&'a Json> {
    o.get(key).filter(|v| !v.is_null())
}

fn required<'a>(o: &'a Map<String, Json>, key: &str) -> Result<&'a Json, PlanFileError> {
    optional(o, key).ok_or_else(|| PlanFileError::Missing { key: key.into() })
}

/// Writes `s` as a JSON string.
fn js(s: &str) -> String {
    Json::String(s.into()).to_string()
}

/// An f32 as JSON: the shortest text that reads back as the same f32.
fn jf(x: f32) -> String {
    serde_json::to_string(&x).expect("finite floats serialize")
}

impl Plan {
    /// Reads a plan in our JSON schema (see the module documentation), validated (constants and
    /// rules; the shape against a model is [`Plan::validate`]).
    pub fn from_json_str(text: &str) -> Result<Plan, PlanFileError> {
        let doc = parse(text, "plan")?;
        let o = doc
            .as_object()
            .ok_or_else(|| wrong("plan", "a JSON object", &doc))?;
        if let Some(k) = o.keys().find(|k| !FIELDS.contains(&k.as_str())) {
            return Err(PlanFileError::invalid(
                k.as_str(),
                format!("unknown field (known: {})", FIELDS.join(", ")),
            ));
        }
        let version = unsigned("version", required(o, "version")?)?;
        if version != MOA_VERSION {
            return Err(PlanFileError::invalid(
                "version",
                format!("unsupported version {version} (this build reads version {MOA_VERSION})"),
            ));
        }
        if let Some(g) = optional(o, "granularity") {
            check_granularity("granularity", &string("granularity", g)?)?;
        }
        let n_layer = unsigned("n_layer", required(o, "n_layer")?)? as usize;
        let n_head_kv = unsigned("n_kv_heads", required(o, "n_kv_heads")?)? as usize;
        if n_layer == 0 {
            return Err(PlanFileError::invalid("n_layer", "must be positive"));
        }
        if n_head_kv == 0 {
            return Err(PlanFileError::invalid("n_kv_heads", "must be positive"));
        }
        let constant = |key: &str, default: u32| match optional(o, key) {
            None => Ok(default),
            Some(v) => unsigned(key, v),
        };
        let sink = constant("sink_tokens", DEFAULT_SINK)?;
        let min_span = constant("min_span", DEFAULT_MIN_SPAN)?;
        let align = constant("span_align", DEFAULT_ALIGN)?;
        let density = match optional(o, "density") {
            None => None,
            Some(v) => {
                let d = number("density", v)?;
                check_density("density", d)?;
                Some(d)
            }
        };
        let text_field = |key: &str| match optional(o, key) {
            None => Ok(String::new()),
            Some(v) => string(key, v),
        };
        let source = text_field("source")?;
        let note = text_field("note")?;
        let mut lengths = Vec::new();
        if let Some(v) = optional(o, "lengths") {
            for (i, x) in array("lengths", v)?.iter().enumerate() {
                let k = format!("lengths[{i}]");
                let n = unsigned(&k, x)?;
                if n == 0 {
                    return Err(PlanFileError::invalid(k, "must be positive"));
                }
                lengths.push(n);
            }
        }
        let layers = array("rules", required(o, "rules")?)?;
        if layers.len() != n_layer {
            return Err(PlanFileError::invalid(
                "rules",
                format!("has {} layers, n_layer is {n_layer}", layers.len()),
            ));
        }
        let mut rules = Vec::with_capacity(n_layer * n_head_kv);
        for (l, layer) in layers.iter().enumerate() {
            let k = format!("rules[{l}]");
            let heads = array(&k, layer)?;
            if heads.len() != n_head_kv {
                return Err(PlanFileError::invalid(
                    k,
                    format!("has {} rules, n_kv_heads is {n_head_kv}", heads.len()),
                ));
            }
            for (h, r) in heads.iter().enumerate() {
                rules.push(rule(&format!("rules[{l}][{h}]"), r)?);
            }
        }
        let plan = Plan {
            n_layer,
            n_head_kv,
            rules,
            sink,
            min_span,
            align,
            density,
            source,
            lengths,
            note,
        };
        plan.validate_rules()
            .map_err(|e| rule_error("", json_key_of(&e), e))?;
        Ok(plan)
    }

    /// Reads a plan file (our schema); errors name the file and the field.
    pub fn load_json(path: impl AsRef<Path>) -> Result<Plan, PlanFileError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| PlanFileError::io(path, e))?;
        Plan::from_json_str(&text).map_err(|e| match e {
            PlanFileError::Json { err, .. } => PlanFileError::Json {
                what: path.display().to_string(),
                err,
            },
            e => PlanFileError::InFile {
                path: path.to_path_buf(),
                err: Box::new(e),
            },
        })
    }

    /// The plan in our schema: one line per layer of rules.
    pub fn to_json_string(&self) -> String {
        let mut s = String::from("{\n");
        let lengths: Vec<String> = self.lengths.iter().map(u32::to_string).collect();
        let density = self.density.map(jf).unwrap_or_else(|| "null".into());
        let _ = write!(
            s,
            "  \"version\": {MOA_VERSION},\n  \"granularity\": {},\n  \"n_layer\": {},\n  \"n_kv_heads\": {},\n  \
             \"sink_tokens\": {},\n  \"min_span\": {},\n  \"span_align\": {},\n  \"density\": {density},\n  \
             \"source\": {},\n  \"lengths\": [{}],\n  \"note\": {},\n  \"rules\": [\n",
            js(GRANULARITY_KV_HEAD),
            self.n_layer,
            self.n_head_kv,
            self.sink,
            self.min_span,
            self.align,
            js(&self.source),
            lengths.join(", "),
            js(&self.note),
        );
        for l in 0..self.n_layer {
            let row: Vec<String> = self.rules[l * self.n_head_kv..(l + 1) * self.n_head_kv]
                .iter()
                .map(|r| format!("{{\"alpha\": {}, \"beta\": {}}}", jf(r.alpha), jf(r.beta)))
                .collect();
            let comma = if l + 1 < self.n_layer { "," } else { "" };
            let _ = writeln!(s, "    [{}]{comma}", row.join(", "));
        }
        s.push_str("  ]\n}\n");
        s
    }

    /// Writes the plan as JSON; `atomic` writes a temporary file beside `path` and renames it.
    pub fn save_json(&self, path: impl AsRef<Path>, atomic: bool) -> Result<(), PlanFileError> {
        let path = path.as_ref();
        let text = self.to_json_string();
        let r = if atomic {
            crate::util::write_file_atomic(path, text.as_bytes())
        } else {
            std::fs::write(path, text)
        };
        r.map_err(|e| PlanFileError::io(path, e))
    }

    /// Imports a plan in the reference implementation's format, `{"alphas": [L][Hq], "betas":
    /// [L][Hq]}` with one rule per query head (other fields are ignored; rows of `n_head_kv`
    /// rules are taken as already per KV head). For grouped-query attention each KV group (query
    /// heads `g*group .. (g+1)*group`) gets the member rule whose span is largest at the longest
    /// of `lengths_for_choice`, ties broken at the next longest, then by the lowest head index.
    /// The report gives the density before (per query head) and after the collapse.
    pub fn from_reference_json(
        text: &str,
        n_layer: usize,
        n_head: usize,
        n_head_kv: usize,
        lengths_for_choice: &[usize],
    ) -> Result<(Plan, ImportReport), PlanFileError> {
        if n_layer == 0 || n_head == 0 || n_head_kv == 0 || !n_head.is_multiple_of(n_head_kv) {
            return Err(PlanFileError::invalid(
                "model",
                format!("{n_layer} layers, {n_head} query heads over {n_head_kv} KV heads is not a valid attention shape"),
            ));
        }
        let mut lengths: Vec<usize> = lengths_for_choice.to_vec();
        if lengths.is_empty() || lengths.contains(&0) {
            return Err(PlanFileError::invalid(
                "lengths",
                "at least one positive length is needed to compare spans",
            ));
        }
        lengths.sort_unstable_by(|a, b| b.cmp(a));
        lengths.dedup();

        let doc = parse(text, "reference plan")?;
        let o = doc.as_object().ok_or_else(|| {
            wrong(
                "reference plan",
                "a JSON object {\"alphas\": .., \"betas\": ..}",
                &doc,
            )
        })?;
        let table = |key: &str| -> Result<Vec<Vec<f32>>, PlanFileError> {
            let v = o
                .get(key)
                .ok_or_else(|| PlanFileError::Missing { key: key.into() })?;
            let rows = array(key, v)?;
            if rows.len() != n_layer {
                return Err(PlanFileError::invalid(
                    key,
                    format!("has {} layers, the model has {n_layer}", rows.len()),
                ));
            }
            rows.iter()
                .enumerate()
                .map(|(l, row)| {
                    let k = format!("{key}[{l}]");
                    let row = array(&k, row)?;
                    if row.len() != n_head && row.len() != n_head_kv {
                        return Err(PlanFileError::invalid(
                            k,
                            format!("has {} heads, the model has {n_head} query heads ({n_head_kv} KV heads)", row.len()),
                        ));
                    }
                    row.iter().enumerate().map(|(h, x)| number(&format!("{key}[{l}][{h}]"), x)).collect()
                })
                .collect()
        };
        let alphas = table("alphas")?;
        let betas = table("betas")?;
        let width = alphas[0].len();
        for (l, (a, b)) in alphas.iter().zip(&betas).enumerate() {
            if a.len() != width || b.len() != width {
                return Err(PlanFileError::invalid(
                    format!("betas[{l}]"),
                    format!("alphas[{l}] has {} heads and betas[{l}] {}, expected {width} (as alphas[0])", a.len(), b.len()),
                ));
            }
        }
        // Validate per source head, so errors name the reference's own indices.
        let per_head: Vec<Rule> = alphas
            .iter()
            .flatten()
            .zip(betas.iter().flatten())
            .map(|(&alpha, &beta)| Rule { alpha, beta })
            .collect();
        let source_plan = Plan::new(n_layer, width, per_head, "reference-json");
        source_plan.validate_rules().map_err(|e| {
            let key = match &e {
                PlanError::NotFinite {
                    layer, head, what, ..
                } => format!("{what}s[{layer}][{head}]"),
                PlanError::BetaRange { layer, head, .. } => format!("betas[{layer}][{head}]"),
                _ => "reference plan".into(),
            };
            PlanFileError::Plan { key, err: e }
        })?;

        let group = width / n_head_kv;
        let mut rules = Vec::with_capacity(n_layer * n_head_kv);
        let mut groups_mixed = 0;
        let mut heads_narrowed = 0;
        for l in 0..n_layer {
            for g in 0..n_head_kv {
                let members =
                    &source_plan.rules[l * width + g * group..l * width + (g + 1) * group];
                let key = |r: &Rule| -> Vec<usize> {
                    lengths
                        .iter()
                        .map(|&n| source_plan.span_of(*r, n))
                        .collect()
                };
                let mut best = members[0];
                for m in &members[1..] {
                    if key(m) > key(&best) {
                        best = *m;
                    }
                }
                if members.iter().any(|m| m != &members[0]) {
                    groups_mixed += 1;
                }
                // A member wider than the chosen rule at a shorter length loses span there.
                let chosen = key(&best);
                heads_narrowed += members
                    .iter()
                    .filter(|m| key(m).iter().zip(&chosen).any(|(a, b)| a > b))
                    .count();
                rules.push(best);
            }
        }
        let mut plan = Plan::new(n_layer, n_head_kv, rules, "reference-json");
        plan.lengths = lengths.iter().rev().map(|&n| n as u32).collect();
        plan.note = if group > 1 {
            format!(
                "imported from a per-query-head plan ({n_head} query heads); each group of {group} query heads \
                 takes the member rule with the largest span at N = {}",
                lengths.iter().map(usize::to_string).collect::<Vec<_>>().join(", then ")
            )
        } else {
            "imported from a reference plan (one rule per head)".into()
        };
        let mut ascending = lengths.clone();
        ascending.reverse();
        let report = ImportReport {
            n_layer,
            n_head: width,
            n_head_kv,
            group,
            density_query_heads: ascending
                .iter()
                .map(|&n| source_plan.density_at(n))
                .collect(),
            density_kv_heads: ascending.iter().map(|&n| plan.density_at(n)).collect(),
            lengths: ascending,
            groups_mixed,
            heads_narrowed,
        };
        Ok((plan, report))
    }
}

/// What importing a reference plan did.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ImportReport {
    pub n_layer: usize,
    /// Heads per layer in the source file (query heads, or KV heads if it was already per KV head).
    pub n_head: usize,
    pub n_head_kv: usize,
    /// Source heads per KV head (1: nothing collapsed).
    pub group: usize,
    /// Lengths the densities are given at, ascending.
    pub lengths: Vec<usize>,
    /// Mean density over the source heads (the reference's accounting, per query head).
    pub density_query_heads: Vec<f64>,
    /// Mean density of the collapsed plan, over KV heads (what the cache holds).
    pub density_kv_heads: Vec<f64>,
    /// Groups whose members had different rules (collapsing widened some of them).
    pub groups_mixed: usize,
    /// Source heads whose own rule is wider than their group's chosen rule at some (shorter)
    /// length: the collapse narrows them there.
    pub heads_narrowed: usize,
}

impl std::fmt::Display for ImportReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "reference plan: {} layers x {} heads -> {} KV heads (groups of {}; {} of {} groups had differing rules, widest kept)",
            self.n_layer,
            self.n_head,
            self.n_head_kv,
            self.group,
            self.groups_mixed,
            self.n_layer * self.n_head_kv
        )?;
        for (i, n) in self.lengths.iter().enumerate() {
            writeln!(
                f,
                "  N = {n:>6}: density per query head {:.4} -> per KV head after collapse {:.4}",
                self.density_query_heads[i], self.density_kv_heads[i]
            )?;
        }
        if self.heads_narrowed > 0 {
            writeln!(
                f,
                "  {} of {} heads are wider than their group's chosen rule at a shorter length (narrowed there)",
                self.heads_narrowed,
                self.n_layer * self.n_head
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Plan {
        let mut p = Plan::uniform(2, 3, 0.5);
        p.rules[1] = Rule {
            alpha: -1024.0,
            beta: 0.875,
        };
        p.rules[4] = Rule {
            alpha: 0.1,
            beta: 1.0 / 3.0,
        };
        p.lengths = vec![2048, 4096];
        p.source = "test \"quoted\"".into();
        p.note = "line\nbreak ✓".into();
        p
    }

    #[test]
    fn json_round_trip() {
        let p = sample();
        let text = p.to_json_string();
        assert_eq!(Plan::from_json_str(&text).unwrap(), p);
        let mut q = p.clone();
        q.density = None;
        assert!(q.to_json_string().contains("\"density\": null"));
        assert_eq!(Plan::from_json_str(&q.to_json_string()).unwrap(), q);
    }

    #[test]
    fn f32_values_survive_json_exactly() {
        // serde_json parses to f64 then we narrow; check that shortest-f32 text comes back exact.
        let mut x: u64 = 0x9E3779B97F4A7C15;
        for _ in 0..200_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let f = f32::from_bits(x as u32);
            if !f.is_finite() {
                continue;
            }
            let back = serde_json::from_str::<Json>(&jf(f))
                .unwrap()
                .as_f64()
                .unwrap() as f32;
            assert_eq!(back.to_bits(), f.to_bits(), "{f:e} -> {}", jf(f));
        }
    }

    #[test]
    fn minimal_document_uses_defaults() {
        let p = Plan::from_json_str(
            r#"{"version": 1, "n_layer": 1, "n_kv_heads": 2, "rules": [[{"alpha": 0, "beta": 0.5}, {"alpha": 512, "beta": 0}]]}"#,
        )
        .unwrap();
        assert_eq!(
            (p.sink, p.min_span, p.align, p.density),
            (64, 128, 64, None)
        );
        assert_eq!(
            p.rules[1],
            Rule {
                alpha: 512.0,
                beta: 0.0
            }
        );
    }

    fn err(edit: impl Fn(&mut Json)) -> String {
        let mut doc: Json = serde_json::from_str(&sample().to_json_string()).unwrap();
        edit(&mut doc);
        Plan::from_json_str(&doc.to_string())
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn errors_name_the_field() {
        let e = err(|d| d["rules"][1][0]["beta"] = 1.5.into());
        assert!(
            e.starts_with("rules[1][0].beta:") && e.contains("1.5"),
            "{e}"
        );
        let e = err(|d| {
            d["rules"]
                .as_array_mut()
                .unwrap()
                .pop()
                .map(|_| ())
                .unwrap()
        });
        assert!(e.starts_with("rules: has 1 layers"), "{e}");
        let e = err(|d| d["rules"][0].as_array_mut().unwrap().truncate(2));
        assert!(e.starts_with("rules[0]: has 2 rules"), "{e}");
        let e = err(|d| d["granularity"] = "q_head".into());
        assert!(
            e.starts_with("granularity:") && e.contains("not supported"),
            "{e}"
        );
        let e = err(|d| d["granularity"] = "blocks".into());
        assert!(
            e.starts_with("granularity:") && e.contains("\"blocks\""),
            "{e}"
        );
        let e = err(|d| d["span_align"] = 48.into());
        assert!(
            e.starts_with("span_align = 48: must be a power of two"),
            "{e}"
        );
        let e = err(|d| d["min_span"] = 32.into());
        assert!(
            e.starts_with("min_span = 32: must exceed sink_tokens"),
            "{e}"
        );
        let e = err(|d| d["version"] = 2.into());
        assert!(e.starts_with("version:"), "{e}");
        let e = err(|d| d["span_algn"] = 64.into());
        assert!(e.starts_with("span_algn: unknown field"), "{e}");
        let e = err(|d| d["rules"][0][1]["gamma"] = 1.into());
        assert!(e.starts_with("rules[0][1].gamma: unknown field"), "{e}");
        let e = err(|d| d["rules"][0][1]["alpha"] = "x".into());
        assert!(e.starts_with("rules[0][1].alpha: expected a number"), "{e}");
        let e = err(|d| d["density"] = 1.5.into());
        assert!(e.starts_with("density:"), "{e}");
        // Python's json.dump writes NaN as a bare word.
        let text = sample()
            .to_json_string()
            .replacen("\"alpha\": -1024.0", "\"alpha\": NaN", 1);
        let e = Plan::from_json_str(&text).unwrap_err().to_string();
        assert!(
            e.starts_with("rules[0][1].alpha:") && e.contains("NaN"),
            "{e}"
        );
        let text = sample()
            .to_json_string()
            .replacen("\"beta\": 0.875", "\"beta\": -Infinity", 1);
        let e = Plan::from_json_str(&text).unwrap_err().to_string();
        assert!(
            e.starts_with("rules[0][1].beta:") && e.contains("inf"),
            "{e}"
        );
        // A string that happens to contain NaN is left alone.
        let mut p = sample();
        p.note = "NaN Infinity \\\" NaN".into();
        assert_eq!(Plan::from_json_str(&p.to_json_string()).unwrap(), p);
        let e = Plan::from_json_str("{\"version\": 1,")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("plan: invalid JSON"), "{e}");
    }

    fn reference(alphas: &[Vec<f32>], betas: &[Vec<f32>]) -> String {
        serde_json::json!({"alphas": alphas, "betas": betas}).to_string()
    }

    #[test]
    fn reference_import_collapses_groups_to_the_widest_rule() {
        // 1 layer, 4 query heads over 2 KV heads.
        // group 0: (0, .125) spans 256/1024 at 2048/8192; (1024, 0) spans 1024/1024: tie at 8192,
        //          2048 decides -> (1024, 0).
        // group 1: (0, .5) 1024/4096 vs (-1024, .875) 768/6144 -> (-1024, .875).
        let text = reference(
            &[vec![0.0, 1024.0, 0.0, -1024.0]],
            &[vec![0.125, 0.0, 0.5, 0.875]],
        );
        let (p, r) = Plan::from_reference_json(&text, 1, 4, 2, &[2048, 8192]).unwrap();
        assert_eq!(
            p.rules,
            vec![
                Rule {
                    alpha: 1024.0,
                    beta: 0.0
                },
                Rule {
                    alpha: -1024.0,
                    beta: 0.875
                }
            ]
        );
        assert_eq!(p.source, "reference-json");
        assert_eq!(p.lengths, vec![2048, 8192]);
        assert_eq!(r.lengths, vec![2048, 8192]);
        // before: (256 + 1024 + 1024 + 768) / (4 * 2048); after: (1024 + 768) / (2 * 2048)
        assert_eq!(r.density_query_heads[0], 3072.0 / 8192.0);
        assert_eq!(r.density_kv_heads[0], 1792.0 / 4096.0);
        // before: (1024 + 1024 + 4096 + 6144) / (4 * 8192); after: (1024 + 6144) / (2 * 8192)
        assert_eq!(r.density_query_heads[1], 12288.0 / 32768.0);
        assert_eq!(r.density_kv_heads[1], 7168.0 / 16384.0);
        assert_eq!(r.groups_mixed, 2);
        // (0, .5) spans 1024 at 2048, more than the chosen (-1024, .875) with 768.
        assert_eq!(r.heads_narrowed, 1);
    }

    #[test]
    fn reference_import_errors() {
        let ok = |n| vec![vec![0.0f32; n]];
        let e = Plan::from_reference_json(&reference(&ok(3), &ok(4)), 1, 4, 2, &[4096])
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("alphas[0]: has 3 heads"), "{e}");
        let e = Plan::from_reference_json(
            &reference(&ok(4), &[vec![0.5, 0.5, 2.0, 0.5]]),
            1,
            4,
            2,
            &[4096],
        )
        .unwrap_err()
        .to_string();
        assert!(e.starts_with("betas[0][2]:"), "{e}");
        let e = Plan::from_reference_json(&reference(&ok(4), &ok(4)), 2, 4, 2, &[4096])
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("alphas: has 1 layers"), "{e}");
        let e = Plan::from_reference_json(
            "{\"alphas\": [[0, 0, 0, NaN]], \"betas\": [[0, 0, 0, 0]]}",
            1,
            4,
            2,
            &[4096],
        )
        .unwrap_err()
        .to_string();
        assert!(e.starts_with("alphas[0][3]:") && e.contains("NaN"), "{e}");
        let e = Plan::from_reference_json("{\"alphas\": [[0, 0, 0, 0]]}", 1, 4, 2, &[4096])
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("betas: missing"), "{e}");
    }
}
