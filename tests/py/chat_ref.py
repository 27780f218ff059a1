#!/usr/bin/env python3
"""Reference chat-template rendering for moa's tests: Jinja2 set up the way Hugging Face
transformers' apply_chat_template sets it up, reading the template from a GGUF file with gguf-py.

Usage: chat_ref.py REQUEST.json

REQUEST is a JSON object:
  "gguf": path                  take the template from tokenizer.chat_template and bos/eos token
                                strings from tokenizer.ggml.tokens[tokenizer.ggml.{bos,eos}_token_id]
  or "template", "bos_token", "eos_token": the template and tokens as given
  "now": unix seconds (UTC) that strftime_now formats, or null for the current local time
  "cases": [{"messages": [[role, content], ...], "add_generation_prompt": bool}, ...]
                                each message becomes the dict {"role": role, "content": content}

Prints a JSON object: "template" (null when the file has none), "bos_token", "eos_token",
"syntax_error" ({"line", "message"} or null) and "results", one per case:
{"ok": text} or {"error": "raised" | exception class name, "message": text}.
"""
import json
import sys
from datetime import datetime, timezone

from jinja2.exceptions import TemplateError, TemplateSyntaxError
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment


class Raised(TemplateError):
    """What raise_exception() throws (transformers raises a plain TemplateError)."""


class GenerationTag(Extension):
    """{% generation %}...{% endgeneration %} renders its body (transformers' assistant mask
    tracker does the same, besides recording the span)."""

    tags = {"generation"}

    def parse(self, parser):
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # The filter transformers installs in place of Jinja2's (which escapes HTML and sorts keys).
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def raise_exception(message):
    raise Raised(message)


def make_env(now):
    def strftime_now(fmt):
        if now is None:
            return datetime.now().strftime(fmt)
        return datetime.fromtimestamp(now, tz=timezone.utc).replace(tzinfo=None).strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationTag, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env


def from_gguf(path):
    from gguf import GGUFReader

    r = GGUFReader(path)
    field = r.fields.get("tokenizer.chat_template")
    template = None if field is None else field.contents()

    def token(key):
        f = r.fields.get(key)
        if f is None:
            return ""
        return r.fields["tokenizer.ggml.tokens"].contents(int(f.contents()))

    return template, token("tokenizer.ggml.bos_token_id"), token("tokenizer.ggml.eos_token_id")


def main():
    with open(sys.argv[1], encoding="utf-8") as f:
        req = json.load(f)
    if "gguf" in req:
        template, bos, eos = from_gguf(req["gguf"])
    else:
        template, bos, eos = req["template"], req.get("bos_token", ""), req.get("eos_token", "")
    out = {"template": template, "bos_token": bos, "eos_token": eos, "syntax_error": None,
           "results": []}
    if template is not None:
        env = make_env(req.get("now"))
        try:
            compiled = env.from_string(template)
        except TemplateSyntaxError as e:
            out["syntax_error"] = {"line": e.lineno, "message": e.message}
            compiled = None
        if compiled is not None:
            for case in req.get("cases", []):
                try:
                    messages = [{"role": role, "content": content}
                                for role, content in case["messages"]]
                    text = compiled.render(messages=messages, tools=None, documents=None,
                                           add_generation_prompt=case["add_generation_prompt"],
                                           bos_token=bos, eos_token=eos)
                    out["results"].append({"ok": text})
                except Raised as e:
                    out["results"].append({"error": "raised", "message": str(e)})
                except Exception as e:  # noqa: BLE001 - any failure is reported, not fatal
                    out["results"].append({"error": type(e).__name__, "message": str(e)})
    json.dump(out, sys.stdout, ensure_ascii=False)


if __name__ == "__main__":
    main()
