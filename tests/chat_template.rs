//! Chat templates rendered by moa (minijinja) against the reference (`tests/py/chat_ref.py`:
//! Jinja2 configured as transformers configures it, template read with gguf-py): the real
//! models' templates and a set of inline templates, over several conversations. Outputs must be
//! byte-identical.

mod common;

use std::process::Command;

use moa::chat::{ChatError, ChatTemplate, Message};
use moa::gguf::GgufFile;
use serde_json::{json, Value as Json};

/// True when python3 has gguf-py and Jinja2; otherwise prints why the test skips.
fn python_ref() -> bool {
    if !common::python_gguf() {
        return false;
    }
    let ok = Command::new("python3")
        .args(["-c", "import jinja2"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !ok {
        println!("SKIP: python3 has no jinja2 (pip install jinja2)");
    }
    ok
}

fn m(role: &str, content: &str) -> Message {
    Message::new(role, content)
}

/// The conversations every template is rendered with, each with and without the generation
/// prompt.
fn conversations() -> Vec<Vec<Message>> {
    vec![
        vec![
            m("system", "You are a terse assistant."),
            m("user", "What is 2+2?"),
        ],
        vec![
            m("system", "Answer in French."),
            m("user", "Hello!"),
            m("assistant", "Bonjour !"),
            m("user", "How are you?"),
        ],
        vec![m("user", "No system prompt here.")],
        vec![
            m("user", "First question"),
            m("assistant", "First answer"),
            m("user", "Second question"),
            m("assistant", "Second answer"),
        ],
        vec![
            m(
                "user",
                "Héllo wörld — 你好 🌍 «quotes» 'single' \"double\" \\ back",
            ),
            m("assistant", "Ça va ? ✓\n\tindented line\r\n"),
            m("user", "  padded with spaces and a trailing newline  \n"),
        ],
        vec![m("user", "{{ not a template }} {% neither %}")],
        vec![],
    ]
}

struct Case {
    messages: Vec<Message>,
    add_generation_prompt: bool,
}

fn cases(convs: Vec<Vec<Message>>) -> Vec<Case> {
    let mut out = Vec::new();
    for c in convs {
        for agp in [true, false] {
            out.push(Case {
                messages: c.clone(),
                add_generation_prompt: agp,
            });
        }
    }
    out
}

/// Runs the reference on `source` (a `{"gguf": ..}` or `{"template": ..}` object) and the cases.
fn reference(source: Json, now: Option<i64>, cases: &[Case]) -> Json {
    let mut req = source;
    req["now"] = json!(now);
    req["cases"] = cases
        .iter()
        .map(|c| {
            json!({
                // [role, content] pairs: the script builds {"role", "content"} dicts in that order.
                "messages": c.messages.iter().map(|m| json!([m.role, m.content])).collect::<Vec<_>>(),
                "add_generation_prompt": c.add_generation_prompt,
            })
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("request.json");
    std::fs::write(&path, serde_json::to_vec(&req).unwrap()).unwrap();
    let out = common::run_py("chat_ref.py", &[path.to_str().unwrap()]);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("chat_ref.py output: {e}\n{out}"))
}

/// Renders every case with `t` and compares with the reference results.
fn compare(what: &str, t: &ChatTemplate, cases: &[Case], reference: &Json) -> usize {
    let results = reference["results"].as_array().expect("results");
    assert_eq!(results.len(), cases.len(), "{what}: result count");
    for (i, (case, want)) in cases.iter().zip(results).enumerate() {
        let got = t.render(&case.messages, case.add_generation_prompt);
        let ctx = || {
            format!(
                "{what}, case {i} (add_generation_prompt={}, messages={:?})",
                case.add_generation_prompt, case.messages
            )
        };
        match (&got, want.get("ok")) {
            (Ok(text), Some(Json::String(w))) => {
                assert_eq!(text, w, "{}: rendering differs", ctx())
            }
            (Err(ChatError::Raised(msg)), None) if want["error"] == "raised" => {
                assert_eq!(msg, want["message"].as_str().unwrap(), "{}", ctx())
            }
            // Both fail for another reason (e.g. indexing an empty list): the messages differ.
            (Err(ChatError::Render { .. }), None) if want["error"] != "raised" => {}
            _ => panic!("{}: moa gave {got:?}, reference gave {want}", ctx()),
        }
    }
    cases.len()
}

#[test]
fn smollm_template_matches_jinja2() {
    let Some(path) = common::model(common::SMOLLM) else {
        return;
    };
    if !python_ref() {
        return;
    }
    let file = GgufFile::open(&path).unwrap();
    let t = ChatTemplate::from_gguf(&file)
        .unwrap()
        .expect("SmolLM2 has a chat template");
    let cases = cases(conversations());
    let r = reference(json!({"gguf": path}), None, &cases);
    assert_eq!(t.source(), r["template"].as_str().unwrap());
    assert_eq!(t.bos_token(), r["bos_token"].as_str().unwrap());
    assert_eq!(t.eos_token(), r["eos_token"].as_str().unwrap());
    assert_eq!(t.bos_token(), "<|im_start|>");
    assert_eq!(t.eos_token(), "<|im_end|>");
    let n = compare("SmolLM2", &t, &cases, &r);
    println!("SmolLM2: {n} renderings identical to Jinja2");

    // Spot-check one rendering by hand: the default system prompt is inserted.
    assert_eq!(
        t.render(&[m("user", "Hi")], true).unwrap(),
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
         <|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    );
}

#[test]
fn gemma_template_matches_jinja2() {
    let Some(path) = common::model(common::GEMMA) else {
        return;
    };
    if !python_ref() {
        return;
    }
    let file = GgufFile::open(&path).unwrap();
    let t = ChatTemplate::from_gguf(&file).unwrap();
    let cases = cases(conversations());
    let r = reference(json!({"gguf": path}), None, &cases);
    match (&t, r["template"].as_str()) {
        (None, None) => {
            // This Gemma 3 file carries no tokenizer.chat_template; the Gemma-style inline
            // template below covers its turn format.
            println!("gemma-3-270m: no tokenizer.chat_template in the file (reference agrees)");
        }
        (Some(t), Some(src)) => {
            assert_eq!(t.source(), src);
            assert_eq!(t.bos_token(), r["bos_token"].as_str().unwrap());
            assert_eq!(t.eos_token(), r["eos_token"].as_str().unwrap());
            let n = compare("gemma-3", t, &cases, &r);
            println!("gemma-3: {n} renderings identical to Jinja2");
        }
        (t, src) => panic!(
            "moa says template {:?}, reference says {src:?}",
            t.as_ref().map(|t| t.source())
        ),
    }
}

const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

const LLAMA3: &str = "{{- bos_token }}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = \"\" %}
{%- endif %}
{{- \"<|start_header_id|>system<|end_header_id|>\\n\\n\" }}
{{- \"Cutting Knowledge Date: December 2023\\n\" }}
{{- \"Today Date: \" + strftime_now(\"%d %b %Y\") + \"\\n\\n\" }}
{{- system_message }}
{{- \"<|eot_id|>\" }}
{%- for message in messages %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
";

/// Gemma-style turns: the system prompt folded into the first user turn, `assistant` shown as
/// `model`, strict alternation enforced with raise_exception.
const GEMMA_STYLE: &str = "{{ bos_token }}
{%- if messages and messages[0]['role'] == 'system' -%}
    {%- set first_user_prefix = messages[0]['content'] | trim + '\n\n' -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = \"\" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}
    {%- endif -%}
    {%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else \"\") }}
    {{- message['content'] | trim }}
    {{- '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{ '<start_of_turn>model\n' }}
{%- endif -%}
";

/// Block tags laid out on their own indented lines: only correct with trim_blocks and
/// lstrip_blocks. Also macros, namespaces, filters, Python methods, loop controls, printing of
/// Python values and tojson.
const FEATURES: &str = "{% macro turn(role, text) %}
    <{{ role | upper }}>{{ text }}</{{ role }}>{{ eos_token }}
{% endmacro %}
{% set ns = namespace(users=0, last='') %}
{% for message in messages %}
    {% if message.role == 'user' %}
        {% set ns.users = ns.users + 1 %}
    {% endif %}
    {% set ns.last = message.role %}
    {{ turn(message.role, message.content.strip()) }}
    {% if message.content.startswith('{') %}
        {% continue %}
    {% endif %}
    {{ loop.index }}/{{ loop.length }}{% if loop.last %} last{% endif %}

{% endfor %}
users={{ ns.users }} last={{ ns.last }} roles={{ messages | map(attribute='role') | join(',') }}
words={{ (messages | selectattr('role', 'equalto', 'user') | map(attribute='content') | first | default('none')).split() | length }}
{{ messages | tojson }}
{{ messages[:1] | tojson(indent=2) }}
{{ {'b': 1, 'a': [true, none, 1.5, 'x']} | tojson(sort_keys=true) }}
{{ none }} {{ true }} {{ false }} {{ [1, 'two', none] }} {{ {'k': 'v', 'n': 3} }} {{ 1.0 }} {{ 10 // 3 }}
{% for k, v in {'x': 1, 'y': 2}.items() %}{{ k }}{{ v }}{% endfor %} {{ tools is none }} {{ undefined_thing is defined }}[{{ undefined_thing }}]
{% for message in messages %}{% if loop.index > 2 %}{% break %}{% endif %}{{ message.role[0] }}{% endfor %}
{% if add_generation_prompt %}
    {% generation %}<assistant>{% endgeneration %}
{% endif %}
";

const STRICT_ALTERNATION: &str = "{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{{ '[' + message['role'] + '] ' + message['content'] }}{% endfor %}";

#[test]
fn inline_templates_match_jinja2() {
    if !python_ref() {
        return;
    }
    // 2024-02-29 13:05:09 UTC
    let now = 1_709_211_909;
    let templates = [
        ("chatml", CHATML, "<s>", "</s>"),
        ("llama3", LLAMA3, "<|begin_of_text|>", "<|eot_id|>"),
        ("gemma-style", GEMMA_STYLE, "<bos>", "<eos>"),
        ("features", FEATURES, "<s>", "</s>"),
        ("strict", STRICT_ALTERNATION, "", ""),
    ];
    let mut convs = conversations();
    convs.push(vec![m("assistant", "starts with the assistant")]);
    convs.push(vec![m("system", "sys"), m("system", "twice")]);
    convs.push(vec![m("user", "{\"json\": true}"), m("assistant", "ok")]);
    let cases = cases(convs);
    let mut total = 0;
    for (name, src, bos, eos) in templates {
        let t = ChatTemplate::new(src, bos, eos)
            .unwrap()
            .with_fixed_time(now)
            .unwrap();
        let r = reference(
            json!({"template": src, "bos_token": bos, "eos_token": eos}),
            Some(now),
            &cases,
        );
        assert!(r["syntax_error"].is_null(), "{name}: {}", r["syntax_error"]);
        total += compare(name, &t, &cases, &r);
    }
    println!("inline templates: {total} renderings identical to Jinja2");
}

#[test]
fn strftime_matches_python() {
    if !python_ref() {
        return;
    }
    let fmt =
        "%Y-%m-%d %H:%M:%S|%a %A %b %B %h|%j %U %W %w %u|%p %I %y %C %e|%D %F %T %R %r|%c|%x %X|%%";
    let src = format!("{{{{ strftime_now('{fmt}') }}}}");
    let cases = [Case {
        messages: vec![],
        add_generation_prompt: false,
    }];
    for now in [
        0,
        951_782_400,   // 2000-02-29 00:00:00
        1_709_211_909, // 2024-02-29 13:05:09
        1_735_689_599, // 2024-12-31 23:59:59
        4_102_444_800, // 2100-01-01 00:00:00
        -86_401,       // 1969-12-30 23:59:59
    ] {
        let t = ChatTemplate::new(&src, "", "")
            .unwrap()
            .with_fixed_time(now)
            .unwrap();
        let r = reference(json!({"template": src}), Some(now), &cases);
        compare(&format!("strftime at {now}"), &t, &cases, &r);
    }
}

#[test]
fn syntax_errors_report_the_same_line_as_jinja2() {
    if !python_ref() {
        return;
    }
    for src in [
        "line one\n{% if x %}\nthree\n{% endfor %}",
        "{% for m in messages %}\n{{ m.content }\n{% endfor %}",
        "a\nb\n{{ 1 + }}",
    ] {
        let err = ChatTemplate::new(src, "", "").unwrap_err();
        let r = reference(json!({"template": src}), None, &[]);
        let want = r["syntax_error"]["line"].as_u64().expect("reference error") as usize;
        match err {
            ChatError::Syntax { line, ref message } => {
                assert_eq!(line, want, "{src:?}: {message} vs {}", r["syntax_error"])
            }
            other => panic!("{src:?}: expected a syntax error, got {other:?}"),
        }
    }
}
