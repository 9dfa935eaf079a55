"""LLaVA: the shapes demo through both stages (the model really learns to answer about held-out
images), resume equivalence, checkpoint contents, chat about an image, data repeat, bad input."""

from __future__ import annotations

import itertools
import json
import os
import shutil
from pathlib import Path

import pytest
from conftest import run_cli


@pytest.fixture(scope="session")
def llava_ws(tmp_path_factory) -> Path:
    from engine.llava.demo import run_llava_demo

    ws = tmp_path_factory.mktemp("llava")
    assert run_llava_demo(ws) == 0
    return ws


def test_demo_learns_to_answer_about_held_out_images(llava_ws, capsys):
    scores = json.loads((llava_ws / "llava_demo_scores.json").read_text())
    print(f"held-out accuracy: before finetune {scores['before']:.1%}, after {scores['after']:.1%}")
    from engine.llava.demo import LEARNED_ACCURACY, LEARNED_GAIN

    assert scores["after"] >= LEARNED_ACCURACY
    assert scores["before"] <= scores["after"] - LEARNED_GAIN     # the pretrain-only model does clearly worse


def test_checkpoints_hold_projector_and_both_adapters_in_safetensors(llava_ws):
    from engine.train.runs import RunDirectory

    pre = RunDirectory(llava_ws / "work_dirs" / "llava_pretrain").latest_checkpoint()
    ft = RunDirectory(llava_ws / "work_dirs" / "llava_finetune").latest_checkpoint()
    assert (pre / "projector.safetensors").is_file() and not (pre / "llm_adapter").exists()
    for f in ("projector.safetensors", "llm_adapter/adapter_model.safetensors",
              "visual_encoder_adapter/adapter_model.safetensors", "llava.json"):
        assert (ft / f).is_file(), f
    info = json.loads((ft / "llava.json").read_text())
    assert info["stage"] == "finetune" and info["n_image_tokens"] == 16 and info["vision_hidden"] == 64
    assert json.loads((ft / "llm_adapter/adapter_config.json").read_text())["r"] == 32
    assert json.loads((ft / "visual_encoder_adapter/adapter_config.json").read_text())["r"] == 16
    evals = [json.loads(x) for x in (ft.parent / "evals.jsonl").read_text().splitlines()]
    assert evals[-1]["image"].endswith("heldout_0000.png") and evals[-1]["answer"]


def test_resume_continues_the_same_loss_curve(llava_ws):
    from engine.train.runs import RunDirectory

    ws = llava_ws
    common = ["--set", "max_steps=6", "--set", "save_steps=3", "--set", "save_total_limit=-1",
              "--set", f"llava.pretrained_pth={ws / 'work_dirs' / 'llava_pretrain'}",
              "--set", "evaluation_inputs=[]"]
    old = os.getcwd()
    os.chdir(ws)
    try:
        assert run_cli("train", "configs/llava_finetune.yaml", "--work-dir", "work_dirs/full", *common) == 0
        part = ws / "work_dirs" / "part"
        shutil.copytree(ws / "work_dirs" / "full", part)
        shutil.rmtree(part / "checkpoint-6")
        assert run_cli("train", "configs/llava_finetune.yaml", "--work-dir", str(part),
                       "--resume", str(part / "checkpoint-3"), *common) == 0
    finally:
        os.chdir(old)
    full, resumed = RunDirectory(ws / "work_dirs" / "full"), RunDirectory(part)
    assert [m["step"] for m in resumed.metrics()] == [1, 2, 3, 4, 5, 6]
    assert [m["loss"] for m in resumed.metrics()] == pytest.approx([m["loss"] for m in full.metrics()], abs=1e-5)
    from safetensors.torch import load_file

    a = load_file(str(full.latest_checkpoint() / "projector.safetensors"))
    b = load_file(str(resumed.latest_checkpoint() / "projector.safetensors"))
    assert all((a[k] - b[k]).abs().max() < 1e-5 for k in a)


def test_chat_about_an_image(llava_ws, capsys):
    ws = llava_ws
    item = json.loads((ws / "data/shapes/heldout.json").read_text())[0]
    capsys.readouterr()
    assert run_cli("chat", ws / "models/tiny-chat-vl", "--visual-encoder", ws / "models/tiny-clip",
                   "--llava", ws / "work_dirs/llava_finetune", "--image", ws / "data/shapes/images" / item["image"],
                   "--prompt", "What colour is the shape?") == 0
    assert capsys.readouterr().out.strip() == item["colour"]
    assert run_cli("chat", ws / "models/tiny-chat-vl", "--visual-encoder", ws / "models/tiny-clip",
                   "--llava", ws / "work_dirs/llava_finetune", "--image", ws / "nope.png", "--prompt", "x") == 2
    assert capsys.readouterr().err.strip() == f"error: {ws / 'nope.png'}: no such image"


def test_data_repeat(tmp_path, capsys):
    src = tmp_path / "unique.json"
    src.write_text(json.dumps([{"id": 1}, {"id": 2}]))
    assert run_cli("data", "repeat", "-i", src, "-o", tmp_path / "rep.json", "-n", "3") == 0
    assert [r["id"] for r in json.loads((tmp_path / "rep.json").read_text())] == [1, 1, 1, 2, 2, 2]
    before = (tmp_path / "rep.json").read_text()
    assert run_cli("data", "repeat", "-i", src, "-o", tmp_path / "rep.json", "-n", "2") == 2
    assert (tmp_path / "rep.json").read_text() == before                   # nothing overwritten
    assert "already exists" in capsys.readouterr().err


def test_grouped_order_never_mixes_images_and_text_in_a_batch():
    from engine.llava.model import LlavaSample, grouped_order

    samples = [LlavaSample([0] * (5 + i % 7), [0] * (5 + i % 7), Path("x.png") if i % 3 else None)
               for i in range(100)]
    order = grouped_order(samples, 4, seed=0, shuffle=True)
    assert sorted(order) == list(range(100))                              # every sample once
    batches = [order[i:i + 4] for i in range(0, 100, 4)]
    mixed = [b for b in batches if len({samples[i].image is None for i in b}) > 1]
    assert len(mixed) <= 1                                               # only where a group's tail meets


_n_bad = itertools.count()


def _bad_train(ws: Path, capsys, *sets: str) -> str:
    old = os.getcwd()
    os.chdir(ws)
    try:
        capsys.readouterr()
        rc = run_cli("train", "configs/llava_finetune.yaml", "--work-dir", f"work_dirs/bad_{next(_n_bad)}",
                     "--set", f"llava.pretrained_pth={ws / 'work_dirs' / 'llava_pretrain'}", *sets)
    finally:
        os.chdir(old)
    err = capsys.readouterr().err.strip()
    errors = [line for line in err.splitlines() if line.startswith("error:")]   # besides loading progress bars
    assert rc == 2 and len(errors) == 1 and err.endswith(errors[0]) and "Traceback" not in err, err
    return errors[0]


def test_bad_input_ends_in_one_clear_line(llava_ws, capsys, tmp_path):
    ws = llava_ws
    img = ws / "data/shapes/images/train_0000.png"
    (tmp_path / "bad.png").write_bytes(b"not a png at all")
    cases = {
        "missing": [{"image": "gone.png", "conversations": [{"from": "human", "value": "<image>\nQ"},
                                                            {"from": "gpt", "value": "A"}]}],
        "unreadable": [{"image": str(tmp_path / "bad.png"),
                        "conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]}],
        "tag": [{"conversations": [{"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": "A"}]}],
    }
    for name, records in cases.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(records))
    err = _bad_train(ws, capsys, "--set", f"data_path={tmp_path / 'missing.json'}")
    assert f"{tmp_path / 'missing.json'}: record 1: image" in err and "gone.png: no such file" in err
    err = _bad_train(ws, capsys, "--set", f"data_path={tmp_path / 'unreadable.json'}")
    assert "record 1: image" in err and "bad.png: cannot read it" in err
    err = _bad_train(ws, capsys, "--set", f"data_path={tmp_path / 'tag.json'}")
    assert err.endswith("record 1: an <image> tag but no 'image' in the record")
    # a vision tower whose hidden size does not fit the pretrain projector
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    CLIPVisionModel(CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                                     num_hidden_layers=2, num_attention_heads=4)).save_pretrained(tmp_path / "vit32")
    err = _bad_train(ws, capsys, "--set", f"visual_encoder={tmp_path / 'vit32'}")
    assert "llava.pretrained_pth" in err and "maps 64 → 128 features, this model needs 32 → 128" in err
    # a pretrain checkpoint made for another LLM
    from engine.model.tiny import build_tiny_model

    build_tiny_model(tmp_path / "llm64", hidden=64, intermediate=128)
    err = _bad_train(ws, capsys, "--set", f"model.path={tmp_path / 'llm64'}")
    assert "maps 64 → 128 features, this model needs 64 → 64" in err
    assert not list((ws / "data/shapes").glob("*.tmp")) and img.is_file()            # nothing of the user's touched


def test_export_llava_loads_in_transformers_and_answers_the_same(llava_ws, tmp_path):
    import torch
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from engine.llava.model import answer, load_llava_for_inference

    ws = llava_ws
    llm, vit, ckpt = ws / "models/tiny-chat-vl", ws / "models/tiny-clip", ws / "work_dirs/llava_finetune"
    out = tmp_path / "hf"
    assert run_cli("export-llava", llm, vit, ckpt, out) == 0
    assert run_cli("export-llava", llm, vit, ckpt, out) == 2                  # never into a non-empty OUT
    model = LlavaForConditionalGeneration.from_pretrained(out)
    proc = AutoProcessor.from_pretrained(out)
    ours = load_llava_for_inference(str(llm), str(vit), ckpt, device="cpu")
    end = proc.tokenizer.convert_tokens_to_ids("<|im_end|>")
    compared = 0
    for item in json.loads((ws / "data/shapes/heldout.json").read_text())[:3]:
        image = Image.open(ws / "data/shapes/images" / item["image"]).convert("RGB")
        for q in ("What colour is the shape?", "What shape is it?", "Where is the shape?"):
            prompt = f"<s><|im_start|>user\n<image>\n{q}<|im_end|>\n<|im_start|>assistant\n"
            inputs = proc(text=prompt, images=image, return_tensors="pt")
            with torch.no_grad():
                gen = model.generate(**inputs, max_new_tokens=8, do_sample=False, eos_token_id=end)
            theirs = proc.tokenizer.decode(gen[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
            assert theirs == answer(*ours, q, image, max_new_tokens=8)
            compared += 1
    assert compared == 9


def test_serve_takes_image_parts_and_compares_pre_and_post_finetune(llava_ws):
    import base64

    from openai import OpenAI
    from starlette.testclient import TestClient

    from engine.llava.serve import LlavaHost
    from engine.serve.server import build_app

    ws = llava_ws
    host = LlavaHost(str(ws / "models/tiny-chat-vl"), str(ws / "models/tiny-clip"),
                     [("pre", str(ws / "work_dirs/llava_pretrain")), ("post", str(ws / "work_dirs/llava_finetune"))],
                     workspace=ws)
    item = json.loads((ws / "data/shapes/heldout.json").read_text())[1]
    uri = "data:image/png;base64," + base64.b64encode((ws / "data/shapes/images" / item["image"]).read_bytes()).decode()

    def ask(client, model, url, question="What shape is it?", **kw):
        return client.post("/v1/chat/completions", json={"model": model, "max_tokens": 8, "temperature": 0, **kw,
                                                         "messages": [{"role": "user", "content": [
                                                             {"type": "image_url", "image_url": {"url": url}},
                                                             {"type": "text", "text": question}]}]})

    with TestClient(build_app(host)) as c:
        post = ask(c, "post", uri).json()["choices"][0]["message"]["content"]
        pre = ask(c, "pre", uri).json()["choices"][0]["message"]["content"]
        assert post == item["shape"] and pre != post                  # before finetune: a caption, not the answer
        # the official client, streaming, a path under the workspace
        client = OpenAI(base_url=f"{c.base_url}/v1", api_key="x", http_client=c)
        path = f"data/shapes/images/{item['image']}"
        stream = client.chat.completions.create(model="post", stream=True, max_tokens=8, temperature=0, messages=[
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": path}},
                                         {"type": "text", "text": "Where is the shape?"}]}])
        assert "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices) == item["place"]
        bad = ask(c, "post", "/etc/hostname")
        assert bad.status_code == 400 and "only images under the workspace" in bad.json()["error"]["message"]
        bad = ask(c, "post", "data:image/png;base64,aGVsbG8=")
        assert bad.status_code == 400 and bad.json()["error"] == {
            "message": "messages.0.content.0.image_url: not a readable image", "type": "invalid_request_error",
            "param": "messages.0.content.0.image_url", "code": None}
        assert ask(c, "post", "https://example.com/a.png").status_code == 400


async def test_tui_compares_pre_and_post_finetune_about_an_image(llava_ws):
    from test_tui import built, wait_for
    from textual.widgets import Input, Select

    from tui.app import TunedeckApp

    ws = llava_ws
    item = json.loads((ws / "data/shapes/heldout.json").read_text())[2]
    app = TunedeckApp(ws)
    async with app.run_test(size=(120, 40)) as pilot:
        await built(pilot)
        await pilot.press("3")                       # the run view shows the evaluation image beside the answers
        runs = app.query_one("#runs-table")
        ft_row = next(i for i, p in enumerate(app.query_one("#runs-pane").rows) if p.name == "llava_finetune")
        runs.move_cursor(row=ft_row)
        await wait_for(pilot, lambda: app.query_one("#rv-eval-image").display, 10, "the evaluation image")
        assert "▀" in str(app.query_one("#rv-eval-image").render())
        assert "[heldout_0000.png]" in str(app.query_one("#rv-evals").render())
        await pilot.press("4")
        await pilot.pause()
        from tui.screens.chat import checkpoint_choices

        ckpt = next(v for label, v in checkpoint_choices(ws) if label.startswith("llava_finetune/"))
        app.query_one("#chat-ckpt", Select).value = ckpt
        await wait_for(pilot, lambda: str(app.query_one("#chat-status").render()).startswith("ready:"), 180,
                       "the LLaVA service to start")
        assert app.query_one("#chat-image-row").display
        app.query_one("#chat-image", Input).value = f"data/shapes/images/{item['image']}"
        await pilot.pause(0.3)
        assert "▀" in str(app.query_one("#chat-image-view").render())      # the image, in half blocks
        app.query_one("#chat-input", Input).focus()
        app.query_one("#chat-input", Input).value = "What colour is the shape?"
        await pilot.press("enter")
        right, left = app.query_one("#chat-right"), app.query_one("#chat-left")
        await wait_for(pilot, lambda: len(right.history) == 2 and len(left.history) == 2, 60, "both answers")
        assert right.history[1]["content"].strip() == item["colour"]
        assert left.history[1]["content"].strip() != item["colour"]      # pre-finetune: a caption
        assert str(left.border_title).startswith("pre-finetune")


def test_data_check_counts_images_and_their_positions(llava_ws, capsys):
    old = os.getcwd()
    os.chdir(llava_ws)
    try:
        capsys.readouterr()
        assert run_cli("data", "check", "configs/llava_finetune.yaml", "--json") == 0
        d = json.loads(capsys.readouterr().out)
        assert d["records"] == 1820 and d["images"] == 1800 and d["length"]["max"] == 34   # 16 image positions
        assert run_cli("data", "check", "configs/llava_finetune.yaml") == 0
        out = capsys.readouterr().out
        assert "records:   1820 (1800 with an image)" in out and "[image → 16 positions]" in out
    finally:
        os.chdir(old)


def test_requests_that_arrive_together_are_generated_together_with_their_own_adapters(llava_ws):
    """The two sides of a comparison (pre-finetune and finetuned, each with its own projector and
    adapters) in one generate: each row answers exactly as it does alone."""
    from engine.llava.serve import LlavaHost
    from engine.serve.generation import GenerationParams
    from engine.serve.scheduler import GenRequest

    ws = llava_ws
    host = LlavaHost(str(ws / "models/tiny-chat-vl"), str(ws / "models/tiny-clip"),
                     [("pre", str(ws / "work_dirs/llava_pretrain")), ("post", str(ws / "work_dirs/llava_finetune"))],
                     workspace=ws)
    item = json.loads((ws / "data/shapes/heldout.json").read_text())[1]
    calls = []
    real = host.model.llm.generate
    host.model.llm.generate = lambda *a, **k: calls.append(k.get("adapter_names")) or real(*a, **k)

    def request(model: str, item: dict, question: str) -> tuple[GenRequest, list]:
        msgs = [{"role": "user", "content": f"<image>\n{question}"}]
        ids, _, stop_ids = host.encode(model, msgs)
        out: list = []
        r = GenRequest(model, ids, GenerationParams(max_new_tokens=8), stop_ids, emit=out.append,
                       images=[host.open_image(f"data/shapes/images/{item['image']}")])
        return r, out

    def text(out: list) -> str:
        return "".join(x[1] for x in out if x[0] == "delta")

    asks = [("post", item, "What shape is it?"), ("pre", item, "What shape is it?"),
            ("post", item, "Where is the shape?")]
    alone = []
    for a in asks:
        r, out = request(*a)
        host.run_batch([r])
        alone.append(text(out))
    assert len(calls) == 3
    calls.clear()
    together = [request(*a) for a in asks]
    host.run_batch([r for r, _ in together])
    assert calls == [["post", "__base__", "post"]]                  # one generate, an adapter per row
    assert [text(out) for _, out in together] == alone
    assert alone[0] == item["shape"] and alone[2] == item["place"] and alone[1] != alone[0]
    assert all(out[-1][0] == "done" for _, out in together)
