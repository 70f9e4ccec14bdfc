"""Ollama Modelfile for an exported GGUF: the chat template in Ollama's Go-template syntax, stops, defaults.

    fmt = chat_format(tokenizer)                  # ChatFormat, or GgufExportError if not translatable
    fmt = alpaca_format(tokenizer)                # a model fine-tuned on Alpaca prompts (data.template: alpaca)
    text = modelfile_text("my-run.gguf", fmt, context_length=8192)

A model's chat template is Jinja; Ollama's is a Go template. We do not parse the Jinja: we render it
on probe conversations and accept it only when every rendering equals what our Go template produces
(with `render_chat` as its Python twin). ChatML (`<|im_start|>role\\n...<|im_end|>\\n`, used by SmolLM2 and
Qwen2) is recognised, including a default system prompt that the template inserts when a conversation
has none: Ollama does the same with the Modelfile's SYSTEM (its chat handler prepends SYSTEM when the
first message is not a system message). Any other template is refused with a message, never guessed.
A run trained on Alpaca prompts (`### Instruction: ... ### Response:`) gets that format instead, in
both syntaxes: ALPACA_OLLAMA_TEMPLATE for the Modelfile, ALPACA_JINJA_TEMPLATE for the GGUF's chat
template (llama-cli --jinja), each rendering a turn as data.render_prompt(..., "alpaca") does.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import FinetuneError

# Sampling defaults of the app's Chat tab, so the model answers in Ollama as it did in the app.
DEFAULT_TEMPERATURE = 0.7
DEFAULT_TOP_P = 0.9
# Ollama's own default context; never more than the model was built for.
MAX_DEFAULT_CONTEXT = 4096

CHATML_START, CHATML_END = "<|im_start|>", "<|im_end|>"

# Python twin: render_chat(messages, system=None) below.
CHATML_OLLAMA_TEMPLATE = (
    "{{- range .Messages }}<|im_start|>{{ .Role }}\n"
    "{{ .Content }}<|im_end|>\n"
    "{{ end }}<|im_start|>assistant\n"
)

_PROBES = (
    [{"role": "user", "content": "Hello there."}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is 2 + 2?"}],
    [{"role": "user", "content": "First line\nsecond line"}, {"role": "assistant", "content": "Noted."},
     {"role": "user", "content": "And then?"}],
    [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello! How can I help?"}, {"role": "user", "content": " spaced  out "}],
)


# A system prompt and the last user message, as data.render_prompt(messages, "alpaca", ...) writes them
# (Python twin: render_alpaca). Earlier turns are not part of the Alpaca format.
ALPACA_INSTRUCTION, ALPACA_RESPONSE = "### Instruction:\n", "\n\n### Response:\n"
ALPACA_OLLAMA_TEMPLATE = ("### Instruction:\n{{ if .System }}{{ .System }}\n\n{{ end }}{{ .Prompt }}"
                          "\n\n### Response:\n")
ALPACA_JINJA_TEMPLATE = (
    "{%- set ns = namespace(system='', user='') -%}"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'system' -%}{%- set ns.system = m['content'] -%}"
    "{%- elif m['role'] == 'user' -%}{%- set ns.user = m['content'] -%}{%- endif -%}"
    "{%- endfor -%}"
    # the last newline as an expression: Jinja drops a template's trailing newline
    "### Instruction:\n{% if ns.system %}{{ ns.system }}\n\n{% endif %}{{ ns.user }}\n\n### Response:{{ '\\n' }}"
)


class GgufExportError(FinetuneError):
    """A model, tokenizer or chat template that the GGUF / Ollama export cannot translate faithfully."""


@dataclass(frozen=True)
class ChatFormat:
    name: str                 # "chatml" or "alpaca"
    template: str             # Ollama Go template (Modelfile TEMPLATE)
    system: str | None        # default system prompt the model's template adds when none is given
    stop: tuple[str, ...]     # Modelfile PARAMETER stop values


def render_chat(messages: list[dict], system: str | None = None) -> str:
    """What CHATML_OLLAMA_TEMPLATE renders in Ollama for `messages` (with SYSTEM = `system`)."""
    if system is not None and (not messages or messages[0]["role"] != "system"):
        messages = [{"role": "system", "content": system}, *messages]
    turns = "".join(f"{CHATML_START}{m['role']}\n{m['content']}{CHATML_END}\n" for m in messages)
    return turns + f"{CHATML_START}assistant\n"


def _render_jinja(tokenizer, messages: list[dict]) -> str | None:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception:  # noqa: BLE001 - a template may raise on any probe (role order, missing keys)
        return None


def _default_system(rendered: str) -> str | None:
    """The system text a template put in front of a conversation that had none, if it did."""
    head = f"{CHATML_START}system\n"
    if not rendered.startswith(head) or f"{CHATML_END}\n" not in rendered:
        return None
    return rendered[len(head):rendered.index(f"{CHATML_END}\n")]


def chat_format(tokenizer) -> ChatFormat:
    """The Ollama equivalent of the tokenizer's chat template, or GgufExportError naming the problem."""
    if not getattr(tokenizer, "chat_template", None):
        raise GgufExportError("This model has no chat template, so there is no prompt format to write into "
                              "an Ollama Modelfile.",
                              "Export the GGUF without a Modelfile, or fine-tune a model that has a chat template.")
    renders = [_render_jinja(tokenizer, list(p)) for p in _PROBES]
    system = _default_system(renders[0] or "") if renders[0] != render_chat(list(_PROBES[0])) else None
    if any(r != render_chat(list(p), system) for p, r in zip(_PROBES, renders)):
        raise GgufExportError(
            "The model's chat template is not one this export can translate into Ollama's template syntax: "
            "only ChatML (<|im_start|>role ... <|im_end|>, as in SmolLM2 and Qwen2) is recognised.",
            "Export the GGUF without a Modelfile and write the Modelfile's TEMPLATE by hand, or use a "
            "ChatML model.")
    stops = [CHATML_START, CHATML_END]
    eos = getattr(tokenizer, "eos_token", None)
    if eos and eos not in stops:
        stops.append(eos)
    return ChatFormat("chatml", CHATML_OLLAMA_TEMPLATE, system, tuple(stops))


def render_alpaca(messages: list[dict]) -> str:
    """What ALPACA_OLLAMA_TEMPLATE (and ALPACA_JINJA_TEMPLATE) render for `messages`."""
    system = next((m["content"] for m in messages if m["role"] == "system"), "")
    user = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
    return ALPACA_INSTRUCTION + (f"{system}\n\n" if system else "") + user + ALPACA_RESPONSE


def alpaca_format(tokenizer) -> ChatFormat:
    """The Alpaca prompt format of a run trained with data.template: alpaca; it stops where a new
    instruction would start, or at the end-of-text token the training appended to every answer."""
    stops = [ALPACA_INSTRUCTION.strip()]
    eos = getattr(tokenizer, "eos_token", None)
    if eos:
        stops.append(eos)
    return ChatFormat("alpaca", ALPACA_OLLAMA_TEMPLATE, None, tuple(stops))


def _quoted_block(keyword: str, text: str) -> str:
    if '"""' in text:
        raise GgufExportError(f'The Modelfile {keyword} would contain """, which Ollama cannot parse.',
                              'Remove """ from the chat template or system prompt.')
    return f'{keyword} """{text}"""'


def modelfile_text(gguf_file_name: str, fmt: ChatFormat, context_length: int | None = None) -> str:
    """The Modelfile: FROM the GGUF next to it (a relative path), TEMPLATE, SYSTEM, stops and defaults."""
    lines = ["# Ollama: ollama create NAME -f THIS_FILE, then ollama run NAME (in this folder)",
             f"FROM ./{gguf_file_name}", "", _quoted_block("TEMPLATE", fmt.template)]
    if fmt.system:
        lines.append(_quoted_block("SYSTEM", fmt.system))
    lines.append("")
    for stop in fmt.stop:
        if '"' in stop:
            raise GgufExportError(f"The stop sequence {stop!r} contains a double quote, which a Modelfile "
                                  "cannot hold.", "Use a tokenizer whose end-of-turn token has no quote.")
        lines.append(f'PARAMETER stop "{stop}"')
    lines += [f"PARAMETER temperature {DEFAULT_TEMPERATURE}", f"PARAMETER top_p {DEFAULT_TOP_P}"]
    if context_length:
        lines.append(f"PARAMETER num_ctx {min(int(context_length), MAX_DEFAULT_CONTEXT)}")
    return "\n".join(lines) + "\n"
