"""Chat templates: turn a conversation into token ids and training labels.

Labels are -100 everywhere except the assistant's replies and their end-of-turn
token. Two kinds of template:

* the tokenizer's own ``chat_template`` (Jinja, via ``apply_chat_template``); the
  assistant spans are found by rendering growing prefixes of the conversation;
* named templates (XTuner's names), rendered piece by piece so the boundary of
  every trained span is exact.

Torch-free: the TUI lists the names.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

IGNORE_INDEX = -100


@dataclass(frozen=True)
class ChatTemplate:
    name: str
    system: str                 # formatted with {system}
    user: str                   # formatted with {input}; ends with the assistant header
    suffix: str                 # end of an assistant turn (trained); "" = the tokenizer's eos
    sep: str                    # between turns, not trained
    stop_words: tuple[str, ...]
    bos: bool = True            # prepend the tokenizer's bos token when it has one
    help: str = ""


TEMPLATES: dict[str, ChatTemplate] = {
    t.name: t
    for t in [
        ChatTemplate(
            "default", "<|System|>:{system}\n", "<|User|>:{input}\n<|Bot|>:", "", "\n", (),
            help="XTuner's default: <|User|>:…<|Bot|>: and the tokenizer's eos."),
        ChatTemplate(
            "internlm2_chat", "<|im_start|>system\n{system}<|im_end|>\n",
            "<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n", "<|im_end|>", "\n",
            ("<|im_end|>",), help="InternLM2-chat (ChatML with <s>)."),
        ChatTemplate(
            "qwen_chat", "<|im_start|>system\n{system}<|im_end|>\n",
            "<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n", "<|im_end|>", "\n",
            ("<|im_end|>", "<|endoftext|>"), bos=False, help="Qwen / Qwen2 ChatML."),
        ChatTemplate(
            "llama3_chat", "<|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>",
            "<|start_header_id|>user<|end_header_id|>\n\n{input}<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n", "<|eot_id|>", "",
            ("<|eot_id|>",), help="Llama 3 / 3.1 / 3.2 instruct."),
    ]
}
TEMPLATE_NAMES: tuple[str, ...] = tuple(TEMPLATES)
ROLES = ("system", "user", "assistant")

# End-of-turn markers worth stopping at when a tokenizer template does not say.
_COMMON_STOPS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<|endoftext|>", "<end_of_turn>")


def resolve_template_name(name: str, tokenizer: Any) -> str:
    """``auto`` means the tokenizer's own template when it has one ('hf'), else 'default'."""
    if name == "auto":
        return "hf" if getattr(tokenizer, "chat_template", None) else "default"
    return name


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def _pieces(template: ChatTemplate, tokenizer: Any, messages: list[dict], add_generation_prompt: bool):
    """(text, trained) pieces of a conversation under a named template."""
    pieces: list[tuple[str, bool]] = []
    eos = tokenizer.eos_token or ""
    if template.bos and tokenizer.bos_token:
        pieces.append((tokenizer.bos_token, False))
    for i, m in enumerate(messages):
        role, content = m["role"], m["content"]
        if role == "system":
            if content:
                pieces.append((template.system.format(system=content), False))
        elif role == "user":
            pieces.append((template.user.format(input=content), False))
        elif role == "assistant":
            pieces.append((content, True))
            pieces.append((template.suffix or eos, True))
            if i != len(messages) - 1 and template.sep:
                pieces.append((template.sep, False))
    if add_generation_prompt and messages and messages[-1]["role"] != "user":
        raise ValueError("a generation prompt needs the conversation to end with a user message")
    return pieces


def encode_conversation(tokenizer: Any, template_name: str, messages: list[dict]) -> tuple[list[int], list[int]]:
    """Token ids and labels for a whole training conversation."""
    name = resolve_template_name(template_name, tokenizer)
    if name == "hf":
        return _encode_hf(tokenizer, messages)
    template = TEMPLATES[name]
    ids: list[int] = []
    labels: list[int] = []
    for text, trained in _pieces(template, tokenizer, messages, False):
        piece = _ids(tokenizer, text)
        ids += piece
        labels += piece if trained else [IGNORE_INDEX] * len(piece)
    return ids, labels


def encode_prompt(tokenizer: Any, template_name: str, messages: list[dict]) -> list[int]:
    """Token ids of a conversation ending in a user turn, ready for the assistant to answer."""
    name = resolve_template_name(template_name, tokenizer)
    if name == "hf":
        out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(out["input_ids"] if hasattr(out, "keys") else out)
    ids: list[int] = []
    for text, _ in _pieces(TEMPLATES[name], tokenizer, messages, True):
        ids += _ids(tokenizer, text)
    return ids


def stop_words(tokenizer: Any, template_name: str) -> list[str]:
    name = resolve_template_name(template_name, tokenizer)
    words = list(TEMPLATES[name].stop_words) if name in TEMPLATES else []
    if name == "hf":
        vocab = tokenizer.get_vocab()
        words += [w for w in _COMMON_STOPS if w in vocab]
    if tokenizer.eos_token and tokenizer.eos_token not in words:
        words.append(tokenizer.eos_token)
    return words


def stop_token_ids(tokenizer: Any, template_name: str) -> list[int]:
    """Single-token stop words as ids (multi-token ones are matched on text)."""
    out = []
    for w in stop_words(tokenizer, template_name):
        ids = _ids(tokenizer, w)
        if len(ids) == 1:
            out.append(ids[0])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in out:
        out.append(tokenizer.eos_token_id)
    return out


def _render_ids(tokenizer: Any, messages: list[dict], add_generation_prompt: bool) -> list[int]:
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def _encode_hf(tokenizer: Any, messages: list[dict]) -> tuple[list[int], list[int]]:
    """Labels for a tokenizer chat_template: assistant turn i is what rendering messages[:i+1]
    adds beyond rendering messages[:i] with the generation prompt; tokens after the turn's
    end-of-turn token (a trailing newline, say) stay masked."""
    full = _render_ids(tokenizer, messages, False)
    labels = [IGNORE_INDEX] * len(full)
    stops = set(stop_token_ids(tokenizer, "hf"))
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = len(_render_ids(tokenizer, messages[:i], True))
        end = len(_render_ids(tokenizer, messages[: i + 1], False))
        if full[:start] != _render_ids(tokenizer, messages[:i], True) or end > len(full):
            raise ValueError("the tokenizer's chat_template does not render conversations prefix by prefix; "
                             "pick a named prompt_template instead")
        span = list(range(start, end))
        last_stop = max((j for j in span if full[j] in stops), default=None)
        if last_stop is not None:
            span = [j for j in span if j <= last_stop]
        for j in span:
            labels[j] = full[j]
    return full, labels


def _around(text: str, field: str) -> tuple[str, str]:
    before, mark, after = text.partition("{" + field + "}")
    if not mark:
        raise ValueError(f"template piece {text!r} has no {{{field}}}")
    return before, after


def as_jinja(name: str) -> str:
    """A named template as a Jinja chat template (what tokenizer_config.json and GGUF carry) that
    renders a conversation to exactly the text ``_pieces`` gives it."""
    t = TEMPLATES[name]
    s_pre, s_post = _around(t.system, "system")
    u_pre, u_post = _around(t.user, "input")

    def lit(text: str) -> str:
        return "{{ " + json.dumps(text, ensure_ascii=False) + " }}" if text else ""

    end = lit(t.suffix) if t.suffix else "{{ eos_token }}"
    sep = ("{% if not loop.last %}" + lit(t.sep) + "{% endif %}") if t.sep else ""
    return ("{% if bos_token %}{{ bos_token }}{% endif %}" if t.bos else "") + (
        "{% for message in messages %}"
        "{% if message['role'] == 'system' %}{% if message['content'] %}"
        + lit(s_pre) + "{{ message['content'] }}" + lit(s_post) + "{% endif %}"
        "{% elif message['role'] == 'user' %}" + lit(u_pre) + "{{ message['content'] }}" + lit(u_post)
        + "{% elif message['role'] == 'assistant' %}{{ message['content'] }}" + end + sep
        + "{% endif %}{% endfor %}")


def as_ollama(name: str, eos_token: str) -> str:
    """A named template in Ollama's Go-template form, over .Messages (Ollama puts the Modelfile's SYSTEM
    there as the first message and adds the bos token itself)."""
    t = TEMPLATES[name]
    s_pre, s_post = _around(t.system, "system")
    u_pre, u_post = _around(t.user, "input")
    for piece in (t.system, t.user, t.suffix, t.sep):
        if "{{" in piece or '"""' in piece:
            raise ValueError(f"template {name!r} cannot be written as an Ollama TEMPLATE")
    # no {{- trim markers: they would eat the pieces' own newlines
    return ('{{ range .Messages }}'
            '{{ if eq .Role "system" }}{{ if .Content }}' + s_pre + '{{ .Content }}' + s_post + '{{ end }}'
            '{{ else if eq .Role "user" }}' + u_pre + '{{ .Content }}' + u_post
            + '{{ else if eq .Role "assistant" }}{{ .Content }}' + (t.suffix or eos_token) + t.sep
            + '{{ end }}{{ end }}')
