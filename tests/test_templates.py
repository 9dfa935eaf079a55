"""Labels are -100 everywhere except assistant replies and their end-of-turn token."""

from __future__ import annotations

import shutil

import pytest

from engine.data.templates import IGNORE_INDEX, TEMPLATE_NAMES, TEMPLATES, encode_conversation, encode_prompt

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")

CONV = [
    {"role": "system", "content": "You are helpful."},
    {"role": "user", "content": "你是谁"},
    {"role": "assistant", "content": "我是小助手"},
    {"role": "user", "content": "Who are you?"},
    {"role": "assistant", "content": "Your assistant."},
]


def trained_spans(tokenizer, ids, labels):
    spans, cur = [], []
    for t, lab in zip(ids, labels):
        if lab != IGNORE_INDEX:
            assert lab == t
            cur.append(t)
        elif cur:
            spans.append(tokenizer.decode(cur))
            cur = []
    if cur:
        spans.append(tokenizer.decode(cur))
    return spans


@pytest.mark.parametrize("name", TEMPLATE_NAMES)
def test_named_template_trains_only_assistant_turns(tokenizer, name):
    ids, labels = encode_conversation(tokenizer, name, CONV)
    assert len(ids) == len(labels)
    end = TEMPLATES[name].suffix or tokenizer.eos_token
    assert trained_spans(tokenizer, ids, labels) == ["我是小助手" + end, "Your assistant." + end]
    # the prompt for the next turn is exactly the training text up to the assistant reply
    prompt = encode_prompt(tokenizer, name, CONV[:4])
    assert ids[: len(prompt)] == prompt


@pytest.fixture(scope="module")
def chatml_tokenizer(tiny_model, tmp_path_factory):
    from transformers import AutoTokenizer

    d = tmp_path_factory.mktemp("chatml")
    for f in tiny_model.iterdir():
        if f.name.startswith(("tokenizer", "special")):
            shutil.copy(f, d / f.name)
    tok = AutoTokenizer.from_pretrained(str(tiny_model))
    tok.chat_template = CHATML
    tok.save_pretrained(str(d))
    return AutoTokenizer.from_pretrained(str(d))


def test_tokenizer_chat_template_is_used_by_auto(chatml_tokenizer):
    ids, labels = encode_conversation(chatml_tokenizer, "auto", CONV)
    rendered = chatml_tokenizer.apply_chat_template(CONV, tokenize=False)
    assert chatml_tokenizer.decode(ids) == rendered
    # assistant text and its <|im_end|>, not the newline after it
    assert trained_spans(chatml_tokenizer, ids, labels) == ["我是小助手<|im_end|>", "Your assistant.<|im_end|>"]


def test_auto_without_chat_template_is_default(tokenizer):
    ids, labels = encode_conversation(tokenizer, "auto", CONV[1:3])
    assert tokenizer.decode(ids).startswith("<s><|User|>:你是谁")
    assert trained_spans(tokenizer, ids, labels) == ["我是小助手</s>"]


@pytest.mark.parametrize("name", TEMPLATE_NAMES)
def test_every_named_template_as_jinja_renders_the_text_it_trains_on(name, tokenizer):
    """The chat template written into exports (GGUF, tokenizer_config) gives the very text training saw."""
    from engine.data.templates import _pieces, as_jinja

    for conv in (CONV, CONV[1:4], [{"role": "system", "content": ""}, *CONV[1:2]]):
        want = "".join(t for t, _ in _pieces(TEMPLATES[name], tokenizer, conv, False))
        got = tokenizer.apply_chat_template(conv, chat_template=as_jinja(name), tokenize=False)
        assert got == want
