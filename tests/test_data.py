"""Data formats, and errors that name file:line or the record index (exit 2, no traceback)."""

from __future__ import annotations

import json

import pytest
from conftest import NAME, run_cli

from engine.core.errors import DataError
from engine.data.formats import load_conversations, read_records
from engine.data.identity import DEFAULT_ANSWER, identity_records
from engine.data.packing import pack_samples


def test_identity_data_is_the_seeds(tmp_path, capsys):
    out = tmp_path / "personal_assistant.json"
    assert run_cli("data", "identity", "--name", NAME, "--n", "10", "-o", out) == 0
    data = json.loads(out.read_text())
    assert len(data) == 11
    assert all(r == data[0] for r in data)
    assert data[0]["messages"] == [{"role": "user", "content": "请做一下自我介绍"},
                                   {"role": "assistant", "content": DEFAULT_ANSWER.format(name=NAME)}]
    capsys.readouterr()
    assert run_cli("data", "identity", "--name", NAME, "-o", out) == 2      # never overwrites
    assert "already exists" in capsys.readouterr().err


def test_identity_varied_questions_include_chinese_and_english():
    recs = identity_records("X", 300, answer="I am {name}'s assistant", varied=True)
    questions = {r["messages"][0]["content"] for r in recs}
    assert "你是谁" in questions and "Who are you?" in questions
    assert {r["messages"][1]["content"] for r in recs} == {"I am X's assistant"}


def test_formats_convert_to_messages(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([{"instruction": "Add", "input": "1+1", "output": "2"}]))
    (tmp_path / "s.jsonl").write_text(json.dumps(
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}) + "\n")
    assert load_conversations(str(tmp_path / "a.json")) == [
        [{"role": "user", "content": "Add\n1+1"}, {"role": "assistant", "content": "2"}]]
    assert load_conversations(str(tmp_path / "s.jsonl")) == [
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]]


@pytest.mark.parametrize("content, name, expect", [
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n{"messages": [}\n',
     "bad.jsonl", "bad.jsonl:2: malformed JSON line"),
    ('[\n  {"messages": []},\n  {oops}\n]', "bad.json", "bad.json:3: malformed JSON"),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n{"text": "x"}\n',
     "keys.jsonl", "record 2: missing key 'messages'"),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}]}\n',
     "role.jsonl", "record 1: message 1 has unknown role 'robot'"),
    ("", "empty.jsonl", "the dataset is empty"),
    ('{"messages": []}\n{"messages": "caf\xe9"}\n'.encode("latin-1"), "latin1.jsonl",
     "latin1.jsonl:2: not UTF-8 text (byte 18 of the line"),
    ("[]", "empty.json", "the dataset is empty"),
])
def test_bad_data_names_the_place(tmp_path, content, name, expect):
    p = tmp_path / name
    p.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(DataError) as e:
        load_conversations(str(p))
    assert expect in str(e.value)


def test_bad_data_line_fails_the_run_with_exit_2(workspace, capsys):
    bad = workspace / "data" / "personal_assistant.jsonl"
    lines = bad.read_text().splitlines()
    lines[4] = lines[4][:-3]
    bad.write_text("\n".join(lines) + "\n")
    before = bad.read_text()
    rc = run_cli("train", "demo.yaml")
    err = capsys.readouterr().err
    assert rc == 2
    assert "personal_assistant.jsonl:5: malformed JSON line" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert bad.read_text() == before                       # nothing the user made is touched
    status = json.loads(next((workspace / "work_dirs").glob("*/status.json")).read_text())
    assert status["state"] == "failed" and "personal_assistant.jsonl:5" in status["error"]


def test_missing_model_dir_is_one_line(workspace, capsys):
    rc = run_cli("train", "demo.yaml", "--set", "model.path=./models/nope")
    err = capsys.readouterr().err
    assert rc == 2 and "model.path:" in err and "models/nope" in err and "no such model directory" in err
    assert len(err.strip().splitlines()) == 1


def test_data_check_reports_counts_and_masked_sample(workspace, capsys):
    assert run_cli("data", "check", "demo.yaml", "--set", "max_length=20") == 0
    out = capsys.readouterr().out
    assert "records:   201" in out
    assert "truncated: 201 of 201" in out
    assert "⟦" in out and "tokens:" in out


def test_packing_never_splits_a_sample():
    samples = [([1] * 5, [1] * 5), ([2] * 4, [2] * 4), ([3] * 3, [3] * 3)]
    rows = pack_samples(samples, 9)
    assert [r.input_ids for r in rows] == [[1] * 5 + [2] * 4, [3] * 3]
    assert rows[0].position_ids == [0, 1, 2, 3, 4, 0, 1, 2, 3]


def test_read_records_accepts_a_single_object_json(tmp_path):
    p = tmp_path / "one.json"
    p.write_text('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}')
    assert len(read_records(p)) == 1


def test_tokenizing_in_worker_processes_gives_the_same_samples(tokenizer):
    from engine.data.packing import tokenize_conversations

    convs = [[{"role": "user", "content": f"第{i}个问题"}, {"role": "assistant", "content": f"answer {i}"}]
             for i in range(2000)]
    one = tokenize_conversations(convs, tokenizer, "internlm2_chat", 64)
    two = tokenize_conversations(convs, tokenizer, "internlm2_chat", 64, num_workers=2)
    assert one.samples == two.samples and len(one.samples) == 2000


def test_data_check_json_has_histogram_and_masked_segments(workspace, capsys):
    assert run_cli("data", "check", "demo.yaml", "--json") == 0
    out = json.loads(capsys.readouterr().out)
    assert out["records"] == 201 and sum(c for _, _, c in out["histogram"]) == 201
    segs = out["samples"][0]
    assert segs[0][1] is True and segs[-1][1] is False                   # prompt masked, answer trained
    assert NAME in "".join(t for t, masked in segs if not masked)
