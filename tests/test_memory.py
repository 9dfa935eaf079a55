"""The low-memory preset's savers keep the computation: AdamW with CPU-held state steps like AdamW."""

from __future__ import annotations

import torch

from engine.model.memory import OffloadedAdamW


def test_offloaded_adamw_steps_like_adamw_and_shares_its_state_dict():
    g = torch.Generator().manual_seed(0)
    init = [torch.randn(5, 3, generator=g), torch.randn(7, generator=g)]
    a = [torch.nn.Parameter(t.clone()) for t in init]
    b = [torch.nn.Parameter(t.clone()) for t in init]
    kw = {"lr": 1e-2, "betas": (0.9, 0.99), "weight_decay": 0.1}
    plain, offloaded = torch.optim.AdamW(a, **kw), OffloadedAdamW(b, **kw)
    sched = torch.optim.lr_scheduler.LambdaLR(offloaded, lambda s: 1.0 / (1 + s))   # a scheduler drives it
    sched_plain = torch.optim.lr_scheduler.LambdaLR(plain, lambda s: 1.0 / (1 + s))
    for step in range(4):
        grads = [torch.randn(t.shape, generator=g) for t in init]
        for p, q, gr in zip(a, b, grads):
            p.grad, q.grad = gr.clone(), gr.clone()
        b[1].grad = None if step == 2 else b[1].grad       # a weight without a gradient is left alone
        a[1].grad = None if step == 2 else a[1].grad
        plain.step()
        offloaded.step()
        plain.zero_grad()
        offloaded.zero_grad()
        sched.step()
        sched_plain.step()
        assert all(q.grad is None for q in b)
    for p, q in zip(a, b):
        assert torch.allclose(p, q, atol=1e-6)
    assert not torch.equal(b[0], init[0])
    # a checkpoint of one resumes the other
    state = offloaded.state_dict()
    again = torch.optim.AdamW([torch.nn.Parameter(t.clone()) for t in b], **kw)
    again.load_state_dict(state)
    assert torch.allclose(again.state_dict()["state"][0]["exp_avg"], plain.state_dict()["state"][0]["exp_avg"])
    # weights loaded into the trained copies (resume) become the master copies
    with torch.no_grad():
        b[0].fill_(3.0)
    offloaded.reload_params()
    assert torch.equal(offloaded.masters[0], b[0].detach())


def test_offloaded_saved_tensors_give_the_same_gradients_and_leave_weights_alone(monkeypatch):
    """On the CPU the hooks are asked to move CPU tensors (to new CPU memory): what moves, and that the
    backward gets the same values back, are what a GPU run relies on."""
    from torch.utils.checkpoint import checkpoint

    import engine.model.memory as memory

    g = torch.Generator().manual_seed(1)
    lin1, lin2 = torch.nn.Linear(64, 64), torch.nn.Linear(64, 64)
    x = torch.randn(32, 64, generator=g, requires_grad=True)

    def run() -> list[torch.Tensor]:
        for t in (x, *lin1.parameters(), *lin2.parameters()):
            t.grad = None
        h = checkpoint(lambda a: torch.tanh(lin1(a)), x, use_reentrant=False)   # saves its input only
        y = torch.sigmoid(lin2(h) * h)                                          # saves h, lin2's out, ...
        y.square().sum().backward()
        return [t.grad.clone() for t in (x, *lin1.parameters(), *lin2.parameters())]

    plain = run()
    moved: list[torch.Tensor] = []
    real_empty = torch.empty

    def spy_empty(*a, **k):
        out = real_empty(*a, **k)
        moved.append(out)
        return out

    monkeypatch.setattr(memory.torch, "empty", spy_empty)
    with memory.offload_saved_tensors(device_type="cpu", min_bytes=32 * 64 * 4):
        y_grads = run()
    assert moved and all(tuple(m.shape) == (32, 64) for m in moved)     # activations, not the 64x64 weights
    assert len(moved) >= 3                                              # x (checkpoint's input), h, ...
    for a, b in zip(plain, y_grads):
        assert torch.equal(a, b)


class _Cycle:
    def __init__(self) -> None:
        self.me = self


def _step_with_cycles(n: int = 5000) -> list:
    """A step's worth of allocations: objects that only the cyclic collector can free."""
    import weakref

    return [weakref.ref(_Cycle()) for _ in range(n)]


def test_step_collector_collects_between_steps_not_inside_them(monkeypatch):
    import gc

    from engine.train.collector import StepCollector

    started: list[int] = []

    def note(phase: str, info: dict) -> None:
        if phase == "start":
            started.append(info["generation"])

    gc.callbacks.append(note)
    try:
        with StepCollector(full_every=3) as c:
            assert not gc.isenabled() and gc.get_freeze_count() > 0
            for step in range(1, 7):
                started.clear()
                probes = _step_with_cycles()
                assert started == []                      # nothing ran inside the step
                c.step()
                assert all(p() is None for p in probes)   # its cycles are freed right after it
                assert started == ([2] if step in (1, 3, 6) else [1])
        assert gc.isenabled() and gc.get_freeze_count() == 0

        monkeypatch.setenv("TUNEDECK_PYTHON_GC", "1")     # the opt-out: Python's own schedule
        started.clear()
        with StepCollector() as c:
            _step_with_cycles()
            assert started                                # collections inside the "step"
    finally:
        gc.callbacks.remove(note)


def saved_by_forward(model, ids: torch.Tensor) -> int:
    """The bytes autograd keeps during one forward for its backward (the backward then runs)."""
    total = [0]

    def keep(t: torch.Tensor) -> torch.Tensor:
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return total[0]


def test_compiled_layers_under_checkpointing_keep_what_eager_checkpointing_keeps(tiny_model, monkeypatch):
    """gradient_checkpointing: true means the same memory compiled or not. transformers 5.24 checkpoints
    inside a layer's forward, so a compiled layer would carry the checkpoint into its graph, where the
    compiler keeps dropout outputs for the backward (64 GiB instead of 8.2 for the tutorial's recipe on an
    H200); tunedeck compiles the layer's own forward and checkpoints around it. Measured here as the
    bytes autograd saves during one forward."""
    import engine.model.loading as em
    from engine.model.loading import attach_lora, compile_decoder_layers, load_model, pick_precision, uncompile

    monkeypatch.setattr(em, "COMPILE_BACKEND", "aot_eager")

    def saved_bytes(compiled: bool, checkpointing: bool) -> int:
        torch._dynamo.reset()
        model = load_model(str(tiny_model), quantization="4bit", precision=pick_precision(device="cpu"))
        torch.manual_seed(0)
        model = attach_lora(model, r=8, alpha=16, dropout=0.1, target_modules="all-linear", bias="none",
                            quantized=True, gradient_checkpointing=checkpointing)
        model.train()
        layers = compile_decoder_layers(model) if compiled else []
        ids = torch.randint(0, 200, (4, 64), generator=torch.Generator().manual_seed(0))
        model(input_ids=ids, labels=ids).loss.backward()            # compiles
        total = saved_by_forward(model, ids)
        if layers:
            uncompile(layers)
            assert all("forward" not in vars(layer) for layer in layers)   # eager again, checkpointing included
        return total

    eager = saved_bytes(False, True)
    assert saved_bytes(True, True) == eager
    assert saved_bytes(False, False) > 2 * eager                         # checkpointing really saves memory


def test_checkpoint_layers_plan_from_free_memory():
    from types import SimpleNamespace

    from engine.model.recompute import HEADROOM_BYTES, SAFETY, layer_activation_bytes, plan_recompute

    cfg = SimpleNamespace(hidden_size=2048, intermediate_size=8192)           # InternLM2-1.8B
    per = layer_activation_bytes(cfg, 1024)
    assert per == 1024 * (14 * 2048 + 6 * 8192) * 2                            # about 159 MB a layer
    assert plan_recompute("auto", 24, per, 130 << 30) == 0                    # an H200: every layer keeps
    room = HEADROOM_BYTES + int(10 * per * SAFETY)                             # room for 10 layers
    assert plan_recompute("auto", 24, per, room) == 14
    assert plan_recompute("auto", 24, per, 1 << 30) == 24                     # tight: all recompute
    assert plan_recompute("auto", 24, per, None) == 24                        # the CPU: as before
    assert plan_recompute("all", 24, per, 130 << 30) == 24
    assert plan_recompute(6, 24, per, None) == 6 and plan_recompute(99, 24, per, None) == 24


def test_layers_that_keep_activations_give_the_same_gradients_with_more_memory(tiny_model):
    """checkpoint_layers changes memory, never the math: a layer that keeps its activations gives the
    gradients of one that recomputes, and autograd really keeps more for it."""
    from engine.model.loading import attach_lora, load_model, pick_precision
    from engine.model.recompute import apply_recompute, decoder_layers

    def run(recompute: int) -> tuple[int, list[torch.Tensor]]:
        model = load_model(str(tiny_model), quantization="4bit", precision=pick_precision(device="cpu"))
        torch.manual_seed(0)
        model = attach_lora(model, r=8, alpha=16, dropout=0.0, target_modules="all-linear", bias="none",
                            quantized=True, gradient_checkpointing=True)
        model.train()
        layers = decoder_layers(model)
        assert len(layers) == 2
        apply_recompute(layers, recompute)
        assert [layer.gradient_checkpointing for layer in layers] == [i < recompute for i in range(2)]
        ids = torch.randint(0, 200, (2, 64), generator=torch.Generator().manual_seed(0))
        return saved_by_forward(model, ids), [p.grad.clone() for p in model.parameters() if p.requires_grad]

    all_bytes, all_grads = run(2)
    half_bytes, half_grads = run(1)
    none_bytes, none_grads = run(0)
    assert all_bytes < half_bytes < none_bytes
    for a, b, c in zip(all_grads, half_grads, none_grads):
        assert torch.allclose(a, b, atol=1e-6) and torch.allclose(a, c, atol=1e-6)


def test_the_trainer_applies_checkpoint_layers_and_says_so(workspace):
    from conftest import run_cli

    assert run_cli("train", "demo.yaml", "--work-dir", "ck", "--set", "max_steps=1", "--set", "evaluation_inputs=[]",
                   "--set", "model.gradient_checkpointing=true", "--set", "model.checkpoint_layers=1") == 0
    log = (workspace / "ck" / "train.log").read_text(errors="replace")
    assert "1 of 2 layers recompute" in log
