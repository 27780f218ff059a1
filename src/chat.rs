//! Chat templates: the Jinja template a GGUF file carries in `tokenizer.chat_template`, rendered
//! the way Hugging Face `transformers` renders it (`apply_chat_template`).
//!
//! The engine is minijinja, configured to behave like the Jinja2 environment transformers builds:
//!
//! - `trim_blocks` and `lstrip_blocks` on, a single trailing newline of the template dropped, no
//!   auto-escaping, lenient undefined values (print as nothing, test false, iterate as empty);
//! - `break`/`continue` (transformers enables Jinja2's `loopcontrols` extension);
//! - Python methods on strings, lists and dicts (`.strip()`, `.split()`, `.items()`, `.get()`,
//!   `.startswith()`, ...) through minijinja-contrib's `pycompat`;
//! - globals `raise_exception(message)` (aborts rendering with [`ChatError::Raised`]) and
//!   `strftime_now(format)` (the current time, C locale, in UTC: see below);
//! - `tojson` as transformers overrides it: Python's `json.dumps(x, ensure_ascii=False,
//!   indent=None, separators=None, sort_keys=False)`, so keys keep their insertion order, items
//!   are separated by `", "` and keys by `": "`, and `<`, `>`, `&`, `'` are not escaped;
//! - printed values look like Python's `str()`: `None`, `True`, `False`, `['a', 1]`,
//!   `{'k': 'v'}`, floats like Python's `repr` (the `string` filter does the same);
//! - the `{% generation %}` / `{% endgeneration %}` tags of transformers' assistant-mask
//!   extension are accepted and render their body unchanged.
//!
//! The render context is what transformers passes: `messages` (a list of `{role, content}`
//! dicts), `add_generation_prompt`, `tools` and `documents` (both `None`), `bos_token` and
//! `eos_token` (the token strings; from a GGUF file, `tokenizer.ggml.tokens[bos/eos id]`, or the
//! empty string when the file names none).
//!
//! Differences that remain: `strftime_now` uses UTC where Python uses the local time zone (the
//! same on machines whose zone is UTC); Python's `%`-formatting of strings and a few rarely used
//! filters are not available; Python's `repr` of strings escapes every non-printable character,
//! ours only control, format, private-use and non-space whitespace characters.

use std::fmt::Write as _;

use minijinja::value::{from_args, Kwargs, Rest, ValueKind, ValueOrKwargs};
use minijinja::{AutoEscape, Environment, Error, ErrorKind, UndefinedBehavior, Value};

use crate::gguf::Gguf;

/// The GGUF key holding the default chat template.
pub const CHAT_TEMPLATE_KEY: &str = "tokenizer.chat_template";

const TEMPLATE_NAME: &str = "chat_template";

/// One chat message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Message {
        Message {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// Why a chat template could not be loaded or rendered.
#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    /// The template does not parse.
    #[error("chat template syntax error at line {line}: {message}")]
    Syntax { line: usize, message: String },
    /// The template called `raise_exception(message)`.
    #[error("chat template raised an exception: {0}")]
    Raised(String),
    /// Rendering failed for another reason (bad operation, unknown filter, ...).
    #[error("chat template render error{}: {message}", at_line(*.line))]
    Render {
        line: Option<usize>,
        message: String,
    },
    /// The GGUF metadata holding the template or the special tokens is malformed.
    #[error("chat template metadata: {0}")]
    Metadata(String),
}

fn at_line(line: Option<usize>) -> String {
    line.map(|l| format!(" at line {l}")).unwrap_or_default()
}

/// The message carried by a `raise_exception` error through minijinja's error chain.
#[derive(Debug)]
struct RaisedException(String);

impl std::fmt::Display for RaisedException {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for RaisedException {}

fn describe(err: &Error) -> String {
    let mut msg = match err.detail() {
        Some(d) => format!("{}: {d}", err.kind()),
        None => err.kind().to_string(),
    };
    let mut src = std::error::Error::source(err);
    while let Some(e) = src {
        let _ = write!(msg, ": {e}");
        src = e.source();
    }
    msg
}

fn convert_render_error(err: Error) -> ChatError {
    let mut src: Option<&(dyn std::error::Error + 'static)> = Some(&err);
    while let Some(e) = src {
        if let Some(r) = e.downcast_ref::<RaisedException>() {
            return ChatError::Raised(r.0.clone());
        }
        src = e.source();
    }
    ChatError::Render {
        line: err.line(),
        message: describe(&err),
    }
}

/// A compiled chat template with its special tokens.
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    bos_token: String,
    eos_token: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("source", &self.source)
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .finish_non_exhaustive()
    }
}

/// The text of token `key` (`tokenizer.ggml.bos_token_id`, ...) or "" when the file names none.
fn special_token(g: &Gguf, key: &str) -> Result<String, ChatError> {
    let Some(v) = g.get(key) else {
        return Ok(String::new());
    };
    let id = v
        .as_integer()
        .filter(|_| !matches!(v, crate::gguf::Value::Bool(_)))
        .ok_or_else(|| {
            ChatError::Metadata(format!(
                "{key} is {}, expected an integer",
                v.type_description()
            ))
        })?;
    let (_, tokens) = g
        .get_array("tokenizer.ggml.tokens")
        .map_err(|e| ChatError::Metadata(format!("{key} is set but: {e}")))?;
    let tok = usize::try_from(id)
        .ok()
        .and_then(|i| tokens.get(i))
        .ok_or_else(|| {
            ChatError::Metadata(format!(
                "{key} = {id} is outside tokenizer.ggml.tokens ({} tokens)",
                tokens.len()
            ))
        })?;
    match tok {
        crate::gguf::Value::String(s) => Ok(s.to_string_lossy().into_owned()),
        other => Err(ChatError::Metadata(format!(
            "tokenizer.ggml.tokens[{id}] is {}, expected a STRING",
            other.type_description()
        ))),
    }
}

impl ChatTemplate {
    /// The template of a GGUF file (`tokenizer.chat_template`), with `bos_token` and `eos_token`
    /// taken from `tokenizer.ggml.{bos,eos}_token_id` and `tokenizer.ggml.tokens`. `None` when
    /// the file has no template.
    pub fn from_gguf(g: &Gguf) -> Result<Option<ChatTemplate>, ChatError> {
        let Some(v) = g.get(CHAT_TEMPLATE_KEY) else {
            return Ok(None);
        };
        let source = match v {
            crate::gguf::Value::String(s) => s.to_str().ok_or_else(|| {
                ChatError::Metadata(format!("{CHAT_TEMPLATE_KEY} is not valid UTF-8"))
            })?,
            other => {
                return Err(ChatError::Metadata(format!(
                    "{CHAT_TEMPLATE_KEY} is {}, expected a STRING",
                    other.type_description()
                )))
            }
        };
        let bos = special_token(g, "tokenizer.ggml.bos_token_id")?;
        let eos = special_token(g, "tokenizer.ggml.eos_token_id")?;
        ChatTemplate::new(source, &bos, &eos).map(Some)
    }

    /// Compiles a template. Syntax errors are reported here, with their line.
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<ChatTemplate, ChatError> {
        Self::build(source, bos_token, eos_token, None)
    }

    /// The same template with `strftime_now` fixed at `unix_seconds` (UTC), for reproducible
    /// output.
    pub fn with_fixed_time(self, unix_seconds: i64) -> Result<ChatTemplate, ChatError> {
        Self::build(
            &self.source,
            &self.bos_token,
            &self.eos_token,
            Some(unix_seconds),
        )
    }

    fn build(
        source: &str,
        bos_token: &str,
        eos_token: &str,
        fixed_time: Option<i64>,
    ) -> Result<ChatTemplate, ChatError> {
        let mut env = Environment::new();
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .keep_trailing_newline(false)
            .build()
            .map_err(|e| ChatError::Render {
                line: None,
                message: describe(&e),
            })?;
        env.set_syntax(syntax);
        env.set_auto_escape_callback(|_| AutoEscape::None);
        env.set_undefined_behavior(UndefinedBehavior::Lenient);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.set_formatter(|out, _state, value| {
            let mut s = String::new();
            py_str(&mut s, value);
            out.write_str(&s).map_err(Error::from)
        });
        env.add_filter("tojson", tojson_filter);
        env.add_filter("string", |v: &Value| {
            let mut s = String::new();
            py_str(&mut s, v);
            s
        });
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", move |format: &str| -> String {
            let secs = fixed_time.unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs() as i64)
                    .unwrap_or(0)
            });
            strftime_utc(format, secs)
        });
        let prepared = rewrite_generation_tags(source);
        env.add_template_owned(TEMPLATE_NAME, prepared)
            .map_err(|e| ChatError::Syntax {
                line: e.line().unwrap_or(0),
                message: describe(&e),
            })?;
        Ok(ChatTemplate {
            env,
            source: source.to_owned(),
            bos_token: bos_token.to_owned(),
            eos_token: eos_token.to_owned(),
        })
    }

    /// Renders a conversation. With `add_generation_prompt` the template appends the header
    /// that starts the assistant's reply.
    pub fn render(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<String, ChatError> {
        let msgs: Vec<Value> = messages
            .iter()
            .map(|m| {
                Value::from_pairs([
                    ("role", Value::from(m.role.as_str())),
                    ("content", Value::from(m.content.as_str())),
                ])
            })
            .collect();
        let ctx = Value::from_pairs([
            ("messages", Value::from(msgs)),
            ("add_generation_prompt", Value::from(add_generation_prompt)),
            ("tools", Value::from(())),
            ("documents", Value::from(())),
            ("bos_token", Value::from(self.bos_token.as_str())),
            ("eos_token", Value::from(self.eos_token.as_str())),
        ]);
        let tmpl = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(convert_render_error)?;
        tmpl.render(ctx).map_err(convert_render_error)
    }

    /// The template text as given.
    pub fn source(&self) -> &str {
        &self.source
    }

    pub fn bos_token(&self) -> &str {
        &self.bos_token
    }

    pub fn eos_token(&self) -> &str {
        &self.eos_token
    }
}

fn raise_exception(message: Option<Value>) -> Result<Value, Error> {
    let msg = match message {
        Some(v) => {
            let mut s = String::new();
            py_str(&mut s, &v);
            s
        }
        None => String::new(),
    };
    Err(Error::new(ErrorKind::InvalidOperation, msg.clone()).with_source(RaisedException(msg)))
}

/// Replaces transformers' `{% generation %}` / `{% endgeneration %}` tags by an equivalent
/// `{% if true %}` / `{% endif %}`, keeping their whitespace-control markers.
fn rewrite_generation_tags(source: &str) -> String {
    if !source.contains("generation") {
        return source.to_owned();
    }
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(start) = rest.find("{%") {
        out.push_str(&rest[..start]);
        let tag = &rest[start..];
        let replaced = (|| {
            let body = &tag[2..];
            let (lmark, body) = match body.as_bytes().first() {
                Some(b'-') => ("-", &body[1..]),
                Some(b'+') => ("+", &body[1..]),
                _ => ("", body),
            };
            let trimmed = body.trim_start();
            let (word, repl) = if trimmed.starts_with("endgeneration") {
                ("endgeneration", "endif")
            } else if trimmed.starts_with("generation") {
                ("generation", "if true")
            } else {
                return None;
            };
            let after = trimmed[word.len()..].trim_start();
            let (rmark, after) = match after.as_bytes().first() {
                Some(b'-') => ("-", &after[1..]),
                Some(b'+') => ("+", &after[1..]),
                _ => ("", after),
            };
            if !after.starts_with("%}") {
                return None;
            }
            let consumed = tag.len() - after.len() + 2;
            Some((format!("{{%{lmark} {repl} {rmark}%}}"), consumed))
        })();
        match replaced {
            Some((text, consumed)) => {
                out.push_str(&text);
                rest = &tag[consumed..];
            }
            None => {
                out.push_str("{%");
                rest = &tag[2..];
            }
        }
    }
    out.push_str(rest);
    out
}

// ---------------------------------------------------------------------------------------------
// Python-like printing

/// Python's `str(value)`: strings as they are, everything else as `repr`.
fn py_str(out: &mut String, v: &Value) {
    match v.kind() {
        ValueKind::Undefined => {}
        ValueKind::String => out.push_str(v.as_str().unwrap_or_default()),
        _ => py_repr(out, v),
    }
}

/// Python's `repr(value)` for the values templates meet.
fn py_repr(out: &mut String, v: &Value) {
    match v.kind() {
        ValueKind::Undefined => {}
        ValueKind::None => out.push_str("None"),
        ValueKind::Bool => out.push_str(if v.is_true() { "True" } else { "False" }),
        ValueKind::Number => {
            if v.is_integer() {
                let _ = write!(out, "{v}");
            } else {
                match f64::try_from(v.clone()) {
                    Ok(f) => py_float(out, f),
                    Err(_) => {
                        let _ = write!(out, "{v}");
                    }
                }
            }
        }
        ValueKind::String => py_str_repr(out, v.as_str().unwrap_or_default()),
        ValueKind::Seq => {
            out.push('[');
            if let Ok(iter) = v.try_iter() {
                for (i, item) in iter.enumerate() {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    py_repr(out, &item);
                }
            }
            out.push(']');
        }
        ValueKind::Map => {
            out.push('{');
            if let Ok(iter) = v.try_iter() {
                for (i, key) in iter.enumerate() {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    py_repr(out, &key);
                    out.push_str(": ");
                    py_repr(out, &v.get_item(&key).unwrap_or_default());
                }
            }
            out.push('}');
        }
        _ => {
            let _ = write!(out, "{v}");
        }
    }
}

/// Python's `repr(float)`: shortest round-trip digits, exponent form outside [1e-4, 1e16).
fn py_float(out: &mut String, f: f64) {
    if f.is_nan() {
        out.push_str("nan");
        return;
    }
    if f.is_infinite() {
        out.push_str(if f > 0.0 { "inf" } else { "-inf" });
        return;
    }
    let sci = format!("{f:e}");
    let (mant, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    if f == 0.0 || (-4..16).contains(&exp) {
        let s = format!("{f}");
        out.push_str(&s);
        if !s.contains('.') {
            out.push_str(".0");
        }
    } else {
        let sign = if exp < 0 { '-' } else { '+' };
        let _ = write!(out, "{mant}e{sign}{:02}", exp.unsigned_abs());
    }
}

/// Characters Python's `str.isprintable()` rejects, as far as we can tell without Unicode
/// tables: controls, non-space whitespace, common format characters, private use.
fn py_non_printable(c: char) -> bool {
    let u = c as u32;
    c.is_control()
        || (c != ' ' && c.is_whitespace())
        || matches!(u,
            0xAD | 0x600..=0x605 | 0x61C | 0x6DD | 0x70F | 0x180E | 0x200B..=0x200F
            | 0x202A..=0x202E | 0x2060..=0x2064 | 0x2066..=0x206F | 0xFEFF | 0xFFF9..=0xFFFB
            | 0xE000..=0xF8FF | 0xE0001 | 0xE0020..=0xE007F | 0xF0000..)
}

fn py_str_repr(out: &mut String, s: &str) {
    let quote = if s.contains('\'') && !s.contains('"') {
        '"'
    } else {
        '\''
    };
    out.push(quote);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if py_non_printable(c) => {
                let u = c as u32;
                let _ = if u <= 0xff {
                    write!(out, "\\x{u:02x}")
                } else if u <= 0xffff {
                    write!(out, "\\u{u:04x}")
                } else {
                    write!(out, "\\U{u:08x}")
                };
            }
            c => out.push(c),
        }
    }
    out.push(quote);
}

// ---------------------------------------------------------------------------------------------
// tojson as Python's json.dumps

struct JsonOpts {
    ensure_ascii: bool,
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
}

/// `tojson(ensure_ascii=False, indent=None, separators=None, sort_keys=False)`, the signature
/// transformers gives it; arguments may be positional in that order or keywords.
fn tojson_filter(value: &Value, args: Rest<ValueOrKwargs>) -> Result<Value, Error> {
    let args = args.into_values();
    let (pos, kwargs): (&[Value], Kwargs) = from_args(&args)?;
    let names = ["ensure_ascii", "indent", "separators", "sort_keys"];
    if pos.len() > names.len() {
        return Err(Error::from(ErrorKind::TooManyArguments));
    }
    let mut vals: [Option<Value>; 4] = Default::default();
    for (i, v) in pos.iter().enumerate() {
        vals[i] = Some(v.clone());
    }
    for (i, name) in names.iter().enumerate() {
        if let Some(v) = kwargs.get::<Option<Value>>(name)? {
            if vals[i].is_some() {
                return Err(Error::new(
                    ErrorKind::InvalidOperation,
                    format!("tojson got multiple values for argument '{name}'"),
                ));
            }
            vals[i] = Some(v);
        }
    }
    kwargs.assert_all_used()?;
    let [ensure_ascii, indent, separators, sort_keys] = vals;
    let indent = match indent {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) => Some(if let Some(s) = v.as_str() {
            s.to_owned()
        } else if let Some(n) = v.as_i64() {
            " ".repeat(n.max(0) as usize)
        } else {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                "tojson indent must be an integer or a string",
            ));
        }),
    };
    let (item_sep, key_sep) = match separators {
        Some(v) if !v.is_none() => {
            let items: Vec<Value> = v.try_iter()?.collect();
            match items.as_slice() {
                [a, b] if a.as_str().is_some() && b.as_str().is_some() => (
                    a.as_str().unwrap_or_default().to_owned(),
                    b.as_str().unwrap_or_default().to_owned(),
                ),
                _ => {
                    return Err(Error::new(
                        ErrorKind::InvalidOperation,
                        "tojson separators must be a pair of strings",
                    ))
                }
            }
        }
        _ => (
            if indent.is_some() { "," } else { ", " }.to_owned(),
            ": ".to_owned(),
        ),
    };
    let opts = JsonOpts {
        ensure_ascii: ensure_ascii.is_some_and(|v| v.is_true()),
        indent,
        item_sep,
        key_sep,
        sort_keys: sort_keys.is_some_and(|v| v.is_true()),
    };
    let mut out = String::new();
    json_value(&mut out, value, &opts, 0)?;
    Ok(Value::from_safe_string(out))
}

fn json_newline(out: &mut String, opts: &JsonOpts, level: usize) {
    if let Some(ind) = &opts.indent {
        out.push('\n');
        for _ in 0..level {
            out.push_str(ind);
        }
    }
}

fn json_str(out: &mut String, s: &str, ensure_ascii: bool) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c if ensure_ascii && (c as u32) > 0x7e => {
                let mut buf = [0u16; 2];
                for unit in c.encode_utf16(&mut buf) {
                    let _ = write!(out, "\\u{unit:04x}");
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// A dict key as json.dumps writes it (non-string keys are converted to strings).
fn json_key(v: &Value) -> Result<String, Error> {
    Ok(match v.kind() {
        ValueKind::String => v.as_str().unwrap_or_default().to_owned(),
        ValueKind::None => "null".to_owned(),
        ValueKind::Bool => if v.is_true() { "true" } else { "false" }.to_owned(),
        ValueKind::Number => {
            let mut s = String::new();
            json_number(&mut s, v);
            s
        }
        _ => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                format!(
                    "tojson: keys must be str, int, float, bool or None, not {}",
                    v.kind()
                ),
            ))
        }
    })
}

fn json_number(out: &mut String, v: &Value) {
    if v.is_integer() {
        let _ = write!(out, "{v}");
        return;
    }
    match f64::try_from(v.clone()) {
        Ok(f) if f.is_nan() => out.push_str("NaN"),
        Ok(f) if f.is_infinite() => out.push_str(if f > 0.0 { "Infinity" } else { "-Infinity" }),
        Ok(f) => py_float(out, f),
        Err(_) => {
            let _ = write!(out, "{v}");
        }
    }
}

fn json_value(out: &mut String, v: &Value, opts: &JsonOpts, level: usize) -> Result<(), Error> {
    if level > 256 {
        return Err(Error::new(
            ErrorKind::InvalidOperation,
            "tojson: value nested too deeply",
        ));
    }
    match v.kind() {
        ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
        ValueKind::Number => json_number(out, v),
        ValueKind::String => json_str(out, v.as_str().unwrap_or_default(), opts.ensure_ascii),
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = v.try_iter()?.collect();
            if items.is_empty() {
                out.push_str("[]");
                return Ok(());
            }
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(&opts.item_sep);
                }
                json_newline(out, opts, level + 1);
                json_value(out, item, opts, level + 1)?;
            }
            json_newline(out, opts, level);
            out.push(']');
        }
        ValueKind::Map => {
            let mut entries = Vec::new();
            for key in v.try_iter()? {
                let val = v.get_item(&key)?;
                entries.push((json_key(&key)?, val));
            }
            if entries.is_empty() {
                out.push_str("{}");
                return Ok(());
            }
            if opts.sort_keys {
                entries.sort_by(|a, b| a.0.cmp(&b.0));
            }
            out.push('{');
            for (i, (key, val)) in entries.iter().enumerate() {
                if i > 0 {
                    out.push_str(&opts.item_sep);
                }
                json_newline(out, opts, level + 1);
                json_str(out, key, opts.ensure_ascii);
                out.push_str(&opts.key_sep);
                json_value(out, val, opts, level + 1)?;
            }
            json_newline(out, opts, level);
            out.push('}');
        }
        kind => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                format!("tojson: object of type {kind} is not JSON serializable"),
            ))
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// strftime (C locale, UTC)

const DAYS: [&str; 7] = [
    "Sunday",
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
];
const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];

struct Civil {
    year: i64,
    month: u32, // 1..=12
    day: u32,   // 1..=31
    yday: u32,  // 0..=365
    wday: u32,  // 0 = Sunday
    hour: u32,
    min: u32,
    sec: u32,
}

fn is_leap(y: i64) -> bool {
    (y % 4 == 0 && y % 100 != 0) || y % 400 == 0
}

fn civil_from_unix(secs: i64) -> Civil {
    let days = secs.div_euclid(86_400);
    let tod = secs.rem_euclid(86_400) as u32;
    // Days since 1970-01-01 to a proleptic Gregorian date (era-based computation).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    const CUM: [u32; 12] = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
    let yday = CUM[(month - 1) as usize] + day - 1 + u32::from(month > 2 && is_leap(year));
    Civil {
        year,
        month,
        day,
        yday,
        wday: (days + 4).rem_euclid(7) as u32,
        hour: tod / 3600,
        min: tod / 60 % 60,
        sec: tod % 60,
    }
}

/// `strftime` in the C locale for a UTC time. Supports the glibc `-` (no padding) and `_`
/// (space padding) flags; unknown directives are copied as they are.
fn strftime_utc(format: &str, secs: i64) -> String {
    let t = civil_from_unix(secs);
    let mut out = String::new();
    let mut chars = format.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let mut flag = None;
        if let Some(&f) = chars.peek() {
            if f == '-' || f == '_' || f == '0' {
                flag = Some(f);
                chars.next();
            }
        }
        let Some(d) = chars.next() else {
            out.push('%');
            if let Some(f) = flag {
                out.push(f);
            }
            break;
        };
        let num = |out: &mut String, v: i64, width: usize, pad: char| {
            let (width, pad) = match flag {
                Some('-') => (0, pad),
                Some('_') => (width, ' '),
                Some('0') => (width, '0'),
                _ => (width, pad),
            };
            let s = v.to_string();
            for _ in s.len()..width {
                out.push(pad);
            }
            out.push_str(&s);
        };
        let hour12 = |h: u32| {
            i64::from(match h % 12 {
                0 => 12,
                r => r,
            })
        };
        match d {
            'a' => out.push_str(&DAYS[t.wday as usize][..3]),
            'A' => out.push_str(DAYS[t.wday as usize]),
            'b' | 'h' => out.push_str(&MONTHS[t.month as usize - 1][..3]),
            'B' => out.push_str(MONTHS[t.month as usize - 1]),
            'c' => {
                let _ = write!(
                    out,
                    "{} {} {:>2} {:02}:{:02}:{:02} {}",
                    &DAYS[t.wday as usize][..3],
                    &MONTHS[t.month as usize - 1][..3],
                    t.day,
                    t.hour,
                    t.min,
                    t.sec,
                    t.year
                );
            }
            'C' => num(&mut out, t.year.div_euclid(100), 2, '0'),
            'd' => num(&mut out, t.day.into(), 2, '0'),
            'D' | 'x' => {
                let _ = write!(
                    out,
                    "{:02}/{:02}/{:02}",
                    t.month,
                    t.day,
                    t.year.rem_euclid(100)
                );
            }
            'e' => num(&mut out, t.day.into(), 2, ' '),
            'F' => {
                let _ = write!(out, "{}-{:02}-{:02}", t.year, t.month, t.day);
            }
            'H' => num(&mut out, t.hour.into(), 2, '0'),
            'I' => num(&mut out, hour12(t.hour), 2, '0'),
            'j' => num(&mut out, i64::from(t.yday) + 1, 3, '0'),
            'k' => num(&mut out, t.hour.into(), 2, ' '),
            'l' => num(&mut out, hour12(t.hour), 2, ' '),
            'm' => num(&mut out, t.month.into(), 2, '0'),
            'M' => num(&mut out, t.min.into(), 2, '0'),
            'n' => out.push('\n'),
            'p' => out.push_str(if t.hour < 12 { "AM" } else { "PM" }),
            'P' => out.push_str(if t.hour < 12 { "am" } else { "pm" }),
            'r' => {
                let _ = write!(
                    out,
                    "{:02}:{:02}:{:02} {}",
                    hour12(t.hour),
                    t.min,
                    t.sec,
                    if t.hour < 12 { "AM" } else { "PM" }
                );
            }
            'R' => {
                let _ = write!(out, "{:02}:{:02}", t.hour, t.min);
            }
            's' => {
                let _ = write!(out, "{secs}");
            }
            'S' => num(&mut out, t.sec.into(), 2, '0'),
            't' => out.push('\t'),
            'T' | 'X' => {
                let _ = write!(out, "{:02}:{:02}:{:02}", t.hour, t.min, t.sec);
            }
            'u' => num(
                &mut out,
                i64::from(if t.wday == 0 { 7 } else { t.wday }),
                1,
                '0',
            ),
            'U' => num(&mut out, i64::from((t.yday + 7 - t.wday) / 7), 2, '0'),
            'w' => num(&mut out, t.wday.into(), 1, '0'),
            'W' => num(
                &mut out,
                i64::from((t.yday + 7 - (t.wday + 6) % 7) / 7),
                2,
                '0',
            ),
            'y' => num(&mut out, t.year.rem_euclid(100), 2, '0'),
            'Y' => {
                let _ = write!(out, "{}", t.year);
            }
            // A naive datetime (what Python's datetime.now() returns) has no zone.
            'z' | 'Z' => {}
            '%' => out.push('%'),
            other => {
                out.push('%');
                if let Some(f) = flag {
                    out.push(f);
                }
                out.push(other);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msgs(pairs: &[(&str, &str)]) -> Vec<Message> {
        pairs.iter().map(|(r, c)| Message::new(*r, *c)).collect()
    }

    const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    const LLAMA3: &str = "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}";

    #[test]
    fn template_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<ChatTemplate>();
    }

    #[test]
    fn chatml() {
        let t = ChatTemplate::new(CHATML, "<s>", "</s>").unwrap();
        let m = msgs(&[("system", "Be brief."), ("user", "Hi")]);
        assert_eq!(
            t.render(&m, true).unwrap(),
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
        assert_eq!(
            t.render(&m, false).unwrap(),
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        );
        assert_eq!(t.render(&[], false).unwrap(), "");
    }

    #[test]
    fn llama3() {
        let t = ChatTemplate::new(LLAMA3, "<|begin_of_text|>", "<|eot_id|>").unwrap();
        let m = msgs(&[("system", "  S  "), ("user", "Q\n"), ("assistant", "A")]);
        assert_eq!(
            t.render(&m, true).unwrap(),
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nS<|eot_id|>\
             <|start_header_id|>user<|end_header_id|>\n\nQ<|eot_id|>\
             <|start_header_id|>assistant<|end_header_id|>\n\nA<|eot_id|>\
             <|start_header_id|>assistant<|end_header_id|>\n\n"
        );
    }

    #[test]
    fn trim_and_lstrip_blocks() {
        let src = "{% for m in messages %}\n    {% if m.role == 'user' %}\nU:{{ m.content }}\n    {% else %}\nA:{{ m.content }}\n    {% endif %}\n{% endfor %}\n";
        let t = ChatTemplate::new(src, "", "").unwrap();
        let m = msgs(&[("user", "x"), ("assistant", "y")]);
        assert_eq!(t.render(&m, false).unwrap(), "U:x\nA:y\n");
    }

    #[test]
    fn raise_exception_message() {
        let src = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}ok";
        let t = ChatTemplate::new(src, "", "").unwrap();
        assert_eq!(t.render(&msgs(&[("user", "a")]), false).unwrap(), "ok");
        match t.render(&msgs(&[("assistant", "a")]), false) {
            Err(ChatError::Raised(m)) => assert_eq!(
                m,
                "Conversation roles must alternate user/assistant/user/assistant/..."
            ),
            other => panic!("expected Raised, got {other:?}"),
        }
    }

    #[test]
    fn syntax_error_has_line() {
        let err =
            ChatTemplate::new("line one\n{% if x %}\nthree\n{% endfor %}", "", "").unwrap_err();
        match &err {
            ChatError::Syntax { line, message } => {
                assert_eq!(*line, 4, "{message}");
                assert!(message.contains("syntax error"), "{message}");
            }
            other => panic!("expected Syntax, got {other:?}"),
        }
        assert!(err.to_string().contains("line 4"), "{err}");
    }

    #[test]
    fn python_printing_and_tojson() {
        let src = "{{ none }}|{{ true }}|{{ [1, 'a', none] }}|{{ {'b': 1, 'a': 2.5} }}|{{ {'k': [1, 2], 'a': 'x<y>&\\'', 'u': 'é'} | tojson }}|{{ {'x': 1} | tojson(indent=2) }}|{{ [1] | tojson(separators=(',', ':')) }}|{{ {'b': 1, 'a': 2} | tojson(sort_keys=true) }}|{{ 'é' | tojson(ensure_ascii=true) }}|{{ 1e20 }}|{{ 0.0001 }}|{{ 1.5e-7 }}|{{ 3.0 }}";
        let t = ChatTemplate::new(src, "", "").unwrap();
        assert_eq!(
            t.render(&[], false).unwrap(),
            "None|True|[1, 'a', None]|{'b': 1, 'a': 2.5}|{\"k\": [1, 2], \"a\": \"x<y>&'\", \"u\": \"é\"}|{\n  \"x\": 1\n}|[1]|{\"a\": 2, \"b\": 1}|\"\\u00e9\"|1e+20|0.0001|1.5e-07|3.0"
        );
    }

    #[test]
    fn python_methods_and_loop_controls() {
        let src = "{% for m in messages %}{% if m.role == 'stop' %}{% break %}{% endif %}{{ m.content.strip().upper() }}{% if m.content.startswith(' ') %}!{% endif %},{% endfor %}{% for k, v in {'a': 1}.items() %}{{ k }}={{ v }}{% endfor %}";
        let t = ChatTemplate::new(src, "", "").unwrap();
        let m = msgs(&[
            ("user", " hi "),
            ("assistant", "yo"),
            ("stop", "x"),
            ("user", "no"),
        ]);
        assert_eq!(t.render(&m, false).unwrap(), "HI!,YO,a=1");
    }

    #[test]
    fn generation_tags_and_namespace() {
        let src = "{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}{% if m.role == 'assistant' %}{% generation %}[{{ m.content }}]{%- endgeneration %}{% endif %}{% endfor %}{{ ns.n }}{{ tools is none }}";
        let t = ChatTemplate::new(src, "", "").unwrap();
        let m = msgs(&[("user", "a"), ("assistant", "b")]);
        assert_eq!(t.render(&m, false).unwrap(), "[b]2True");
    }

    #[test]
    fn strftime() {
        // 2024-02-29 13:05:09 UTC, a Thursday.
        let secs = 1_709_211_909;
        assert_eq!(
            strftime_utc(
                "%Y-%m-%d %H:%M:%S %a %A %b %B %j %p %I %y %e %-d %w %u %U %W %%",
                secs
            ),
            "2024-02-29 13:05:09 Thu Thursday Feb February 060 PM 01 24 29 29 4 4 08 09 %"
        );
        assert_eq!(strftime_utc("%d %b %Y", 0), "01 Jan 1970");
        assert_eq!(strftime_utc("%c", 0), "Thu Jan  1 00:00:00 1970");
        assert_eq!(strftime_utc("%F %T", -1), "1969-12-31 23:59:59");
        let t = ChatTemplate::new("{{ strftime_now('%d %b %Y') }}", "", "")
            .unwrap()
            .with_fixed_time(secs)
            .unwrap();
        assert_eq!(t.render(&[], false).unwrap(), "29 Feb 2024");
    }

    #[test]
    fn render_errors_name_the_problem() {
        let t = ChatTemplate::new("a\n{{ messages[0].content + 1 }}", "", "").unwrap();
        let err = t.render(&msgs(&[("user", "x")]), false).unwrap_err();
        match &err {
            ChatError::Render { line, .. } => assert_eq!(*line, Some(2), "{err}"),
            other => panic!("expected Render, got {other:?}"),
        }
    }
}
