"""Loading tokenizers and models (4-bit / 8-bit / full precision) and attaching LoRA."""

from __future__ import annotations

import functools
import json
import logging
import os
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from engine.core.errors import UserError
from engine.core.files import cache_dir, model_dir_problem

log = logging.getLogger("tunedeck.model")
# Transformers talks a lot at import and load time; the run log says what matters.
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


class _NoCpuKernelHubAdvice(logging.Filter):
    """bitsandbytes, imported on a CPU with AVX512-BF16, looks for its packed-layout kernel on a model
    hub and, not finding it, tells the user to install the `kernels` package. tunedeck never uses that
    layout (standard_4bit_layout), so the advice is wrong here and is kept out of every log."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward")


logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_NoCpuKernelHubAdvice())


@dataclass(frozen=True)
class Precision:
    device: str               # "cuda" | "cpu"
    amp: str                  # "bf16" | "fp16" | "fp32"
    weight_dtype: torch.dtype # dtype of frozen (non-quantized) weights

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.amp)


def pick_precision(mixed_precision: str = "auto", dtype: str = "auto", device: str | None = None) -> Precision:
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        return Precision("cpu", "fp32", torch.float32)
    bf16_ok = torch.cuda.is_bf16_supported()
    amp = mixed_precision
    if amp == "auto":
        amp = "bf16" if bf16_ok else "fp16"
    if amp == "bf16" and not bf16_ok:
        raise UserError("train.mixed_precision: 'bf16' is not supported by this GPU; use fp16 or auto")
    wd = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}.get(dtype)
    if wd is None:
        wd = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp, torch.float32)
    return Precision("cuda", amp, wd)


def check_model_dir(path: str, need_config: bool = True) -> None:
    p = Path(path)
    if p.is_dir() and not need_config:
        return
    if problem := model_dir_problem("model.path", path):
        raise UserError(problem)
    if p.exists():
        return
    looks_like_hub_id = path.count("/") == 1 and not path.startswith((".", "/", "~"))
    if not looks_like_hub_id:
        raise UserError(f"model.path: {path!r}: no such model directory")
    from engine.core.hub import cached_model, explicitly_offline, hub_reachable

    if not cached_model(path) and (explicitly_offline() or not hub_reachable()):
        raise UserError(f"model.path: {path!r}: no such local folder, not in the Hugging Face cache, and the hub "
                        "cannot be reached from here to download it; give the model's local folder")


def resolve_model(path: str, trust_remote_code: bool = False) -> tuple[str, bool]:
    """The folder transformers loads for ``path`` and whether remote code may run: an InternLM2
    checkpoint is converted to transformers' Llama layout (engine/internlm2.py) and its own code is
    never run, whatever trust_remote_code says."""
    from engine.model.internlm2 import native_path

    native = native_path(path, log=log.info) if Path(path).is_dir() else path
    return native, trust_remote_code and native == path


def load_tokenizer(path: str, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    check_model_dir(path, need_config=False)
    native, trust_remote_code = resolve_model(path, trust_remote_code)
    try:
        tok = AutoTokenizer.from_pretrained(native, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise UserError(f"model.path: {path!r}: cannot load a tokenizer ({load_error(e)})") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    tok.padding_side = "right"
    return tok


def load_error(e: BaseException) -> str:
    """One line for a failed load; when a model's own (remote) code failed, the file and line in it."""
    where = ""
    tb = e.__traceback__
    while tb is not None:
        fn = tb.tb_frame.f_code.co_filename
        if "transformers_modules" in fn:
            where = f"{Path(fn).name}:{tb.tb_lineno}"
        tb = tb.tb_next
    text = _one_line(e)
    return f"the model's own code, {where}: {text}" if where else text


LIGER_PATCHES = {"llama": "apply_liger_kernel_to_llama", "qwen2": "apply_liger_kernel_to_qwen2",
                 "mistral": "apply_liger_kernel_to_mistral", "qwen3": "apply_liger_kernel_to_qwen3"}


def apply_liger(path: str, mode: str, precision: Precision, trust_remote_code: bool, compiled: bool = False) -> bool:
    """Patch transformers' model classes with Liger's RMSNorm / RoPE / SwiGLU kernels before loading;
    True when applied. The loss stays ours (chunked), so Liger's cross-entropy is left off."""
    if mode == "off" or (mode == "auto" and (precision.device != "cuda" or compiled)):
        return False    # compiled layers: the compiler fuses these itself (Liger's kernels would split its graph)
    from transformers import AutoConfig

    path, trust_remote_code = resolve_model(path, trust_remote_code)
    model_type = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code).model_type
    reason = None
    if precision.device != "cuda":
        reason = "needs a CUDA GPU"
    elif model_type not in LIGER_PATCHES:
        reason = f"has no kernels for {model_type} models"
    else:
        try:
            import liger_kernel.transformers as lk
        except ImportError:
            reason = "is not installed (pip install liger-kernel)"
    if reason:
        if mode == "on":
            raise UserError(f"model.liger_kernels: 'on' but Liger {reason}; set auto or off")
        return False
    getattr(lk, LIGER_PATCHES[model_type])(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                           fused_linear_cross_entropy=False)
    return True


COMPILE_BACKEND = "inductor"     # tests trace with "aot_eager": the same graphs, no code generation


def use_compile_caches() -> None:
    """Inductor's and Triton's caches under tunedeck's cache folder (where they outlive /tmp), with the
    FX-graph and AOTAutograd caches on: a second run of the same model and shapes loads its compiled
    kernels instead of compiling them. Settings the user made in the environment win."""
    import torch._functorch.config
    import torch._inductor.config
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    # inductor writes its default (under /tmp) into the environment the first time anything asks for its
    # folder -- importing bitsandbytes does -- so a value equal to that default is torch's, not the user's
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR") in (None, os.path.abspath(default_cache_dir())):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_dir("compile", "inductor"))
    os.environ.setdefault("TRITON_CACHE_DIR", str(cache_dir("compile", "triton")))
    torch._inductor.config.fx_graph_cache = True
    torch._functorch.config.enable_autograd_cache = True
    # the layers hold autograd.Functions (bitsandbytes' 4-bit matmul, the fused LoRA): without this the
    # AOTAutograd cache is bypassed for every graph and a second run traces and partitions them again.
    # Their forward and backward are traced into the graph as subgraphs, so the cache key covers them.
    torch._functorch.config.autograd_cache_allow_custom_autograd_functions = True


def compile_decoder_layers(model: torch.nn.Module, mode: str | None = None) -> list[torch.nn.Module]:
    """torch.compile every decoder layer in place (the module, its parameters' names and the checkpoints
    stay as they are); returns the layers. They share one compiled graph: their parameters are the
    graph's inputs. A layer whose compilation fails runs eagerly (dynamo's suppress_errors). ``mode``
    is torch.compile's (inductor only), e.g. "reduce-overhead" for CUDA graphs.

    Gradient checkpointing stays where transformers puts it. Moving the checkpoint inside the compiled
    graph was measured (H200, bench/train_throughput.py --explore): with dropout the partitioner keeps the
    dropout outputs instead of recomputing them (49 GiB at 16 rows), and with the dropout recomputed
    from its Philox state (functionalize_rng_ops) a step was slower than with the checkpoint outside."""
    import torch._dynamo

    from engine.model.recompute import decoder_layers

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = decoder_layers(model)
    if layers:
        use_compile_caches()
        torch._dynamo.config.suppress_errors = True
        # the layers' Python floats (LoRA scaling, norm eps) are constants: traced symbolically, each
        # compile was traced twice (dynamo restarts once it finds they must be specialized after all)
        torch._dynamo.config.specialize_float = True
        # sizes are symbolic, but a one-row forward (a short last window) still gets a graph of its own
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 16)
        # under DDP dynamo would split each layer's graph at DDP's gradient buckets (a dozen graphs per
        # layer, each with its own guards and launches: profiled, H200); the gradients reach DDP's hooks anyway
        torch._dynamo.config.optimize_ddp = False
    kw: dict[str, Any] = {}
    if COMPILE_BACKEND == "inductor" and mode:
        kw["mode"] = mode
    elif COMPILE_BACKEND == "inductor" and any(p.is_cuda for p in base.parameters()):
        # kernels launched from inductor's C++ wrapper instead of Python: at 8 rows a forward the step is
        # bound by the CPU launching work, and this took it from 0.424 to 0.317 s (H200);
        # no change at 16 rows
        kw["options"] = {"cpp_wrapper": True}
    for layer in layers:
        inner = _forward_inside_checkpoint(type(layer))
        if inner is not None:       # the graph gets the layer's own forward, the checkpoint stays around it
            layer.forward = types.MethodType(inner, layer)
        # row counts and lengths vary: symbolic sizes from the first step
        layer.compile(dynamic=True, backend=COMPILE_BACKEND, **kw)
        if inner is not None:
            layer._compiled_call_impl = _checkpoint_around(layer, layer._compiled_call_impl)
    return layers


def _forward_inside_checkpoint(cls: type) -> Any:
    """The layer's own forward when transformers wraps it in its checkpointing (transformers >= 5.2x
    checkpoints inside ``forward``; earlier releases around ``__call__``), else None.

    Compiled with the layer, that checkpoint would sit inside the graph, where the compiler keeps the
    dropout outputs instead of recomputing them: with 5.24 the tutorial's recipe's 16-row step took 64 GiB
    instead of 8.2 (H200). So the compiled graph is the layer's own forward, and the checkpoint is
    taken around the compiled call, as with the earlier releases."""
    forward = getattr(cls, "forward", None)
    code = getattr(forward, "__code__", None)
    if code is not None and code.co_name == "forward_with_checkpointing" and hasattr(forward, "__wrapped__"):
        return forward.__wrapped__
    return None


def _checkpoint_around(layer: torch.nn.Module, compiled: Any) -> Any:
    def call(*args: Any, **kwargs: Any) -> Any:
        if getattr(layer, "gradient_checkpointing", False) and layer.training and torch.is_grad_enabled():
            if kwargs.get("use_cache"):
                kwargs["use_cache"] = False
            return layer._gradient_checkpointing_func(functools.partial(compiled, **kwargs), *args)
        return compiled(*args, **kwargs)

    return call


def uncompile(layers: list[torch.nn.Module]) -> None:
    """Undo Module.compile: the layers run eagerly again (transformers' own checkpointing included)."""
    for layer in layers:
        layer._compiled_call_impl = None
        layer.__dict__.pop("forward", None)


def load_model(path: str, *, quantization: str = "none", quant_type: str = "nf4", double_quant: bool = True,
               precision: Precision, trust_remote_code: bool = False, attn_implementation: str = "auto",
               device_map: Any = None, progress: Callable[[int, int], None] | None = None) -> Any:
    """The base model, frozen-quantized when asked; ``progress(done, total)`` follows the weights
    as they load. Full-precision master weights (for a full
    fine-tune) are loaded in fp32 by the caller passing a float32 precision."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quiet_progress()
    check_model_dir(path)
    native, trust_remote_code = resolve_model(path, trust_remote_code)
    compute = precision.autocast_dtype or torch.float32
    kw: dict[str, Any] = {"trust_remote_code": trust_remote_code, "dtype": precision.weight_dtype}
    if attn_implementation != "auto":
        kw["attn_implementation"] = attn_implementation
    elif not trust_remote_code:
        kw["attn_implementation"] = "sdpa"
    if quantization == "4bit":
        kw["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_use_double_quant=double_quant,
            bnb_4bit_compute_dtype=compute, bnb_4bit_quant_storage=torch.uint8)
    elif quantization == "8bit":
        kw["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=6.0)
    if device_map is None:
        device_map = {"": torch.cuda.current_device()} if precision.device == "cuda" else {"": "cpu"}
    kw["device_map"] = device_map
    try:
        with weight_progress(progress):
            model = AutoModelForCausalLM.from_pretrained(native, **kw)
    except torch.cuda.OutOfMemoryError:
        raise
    except (OSError, ValueError, ImportError, KeyError, AttributeError, TypeError, NameError) as e:
        raise UserError(f"model.path: {path!r}: cannot load the model ({load_error(e)})") from None
    except Exception as e:
        bad = unreadable_weights(native)
        if bad is None:
            raise
        raise UserError(f"model.path: {path!r}: {bad} is unreadable ({_one_line(e)}); is the file complete "
                        "(a download or copy cut short)?") from None
    if quantization == "4bit":
        standard_4bit_layout(model)
    return model


def standard_4bit_layout(model: torch.nn.Module) -> int:
    """Keep every bitsandbytes 4-bit weight in its standard layout, whatever the CPU; returns how many
    layers were set.

    On a CPU with AVX512-BF16, bitsandbytes' ``Linear4bit.forward`` in eval mode with an input that
    needs no gradient (an evaluation, a chat answer) repacks the weight in place into a CPU-only layout
    and from then on multiplies through ``gemv_4bit``, which has no backward: training after such a
    forward gets no gradient through the layer's input, and anything that reads the packed bytes (the
    fused LoRA layer, a merge) reads the wrong numbers. Each layer's switch for that is turned off
    here, and a layer already repacked is unpacked again (bitsandbytes' own inverse)."""
    try:
        from bitsandbytes.nn import Linear4bit
    except Exception:  # bitsandbytes missing or without a backend: nothing 4-bit to look after
        return 0
    n = 0
    for module in model.modules():
        if isinstance(module, Linear4bit):
            module.support_avx512bf16_for_cpu = False
            unpack_cpu_4bit(module)
            n += 1
    return n


def unpack_cpu_4bit(layer: torch.nn.Module) -> bool:
    """Undo bitsandbytes' CPU repacking of one 4-bit layer's weight; True when it had been repacked."""
    w = layer.weight
    state = getattr(w, "quant_state", None)
    if state is None or not getattr(state, "packing_format_for_cpu", False):
        return False
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    w.data, w.quant_state = _convert_weight_packed_for_cpu_inverse(w.data, state)
    if getattr(layer, "quant_state", None) is not None:
        layer.quant_state = w.quant_state
    return True


def unreadable_weights(folder: str | Path) -> str | None:
    """The first safetensors file in ``folder`` whose header cannot be read (truncated, not safetensors)."""
    from safetensors import safe_open

    for f in sorted(Path(folder).glob("*.safetensors")):
        try:
            with safe_open(str(f), framework="pt") as st:
                st.keys()
        except Exception:
            return str(f)
    return None


@contextmanager
def weight_progress(report: Callable[[int, int], None] | None) -> Iterator[None]:
    """Calls ``report(done, total)`` while transformers loads the weights, from its own "Loading
    weights" loop (the module's ``tqdm``), at most every 2 % and once at the end; the run's status
    shows it as a percentage. A transformers without that loop loads without a report."""
    import transformers.core_model_loading as loading_module

    original = getattr(loading_module, "tqdm", None)
    if report is None or original is None:
        yield
        return

    def counting(iterable=None, *args, **kwargs):
        if iterable is None:                  # used as a manual bar: not the loop this follows
            return original(iterable, *args, **kwargs)
        items = list(iterable)

        def walk():
            total, shown = len(items), -1
            for i, item in enumerate(items):
                yield item
                pct = (i + 1) * 50 // max(total, 1)
                if pct != shown:
                    shown = pct
                    report(i + 1, total)
        return walk()

    loading_module.tqdm = counting
    try:
        yield
    finally:
        loading_module.tqdm = original


def quiet_progress() -> None:
    """transformers' "Loading weights" bars only in a terminal: piped or logged output gets the one
    line that matters, not carriage-return noise."""
    import sys

    if not sys.stderr.isatty():
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def linear_target_modules(model: Any) -> list[str]:
    """Names of every linear layer but the output head, found by type (so InternLM2's
    wqkv/wo/w1/w2/w3 are covered as well as Llama's q_proj...down_proj)."""
    linear_types: tuple[type, ...] = (torch.nn.Linear,)
    try:
        import bitsandbytes as bnb

        linear_types += (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
    except Exception:  # bitsandbytes missing or without a backend: plain Linear only
        pass
    head = model.get_output_embeddings()
    names = set()
    for name, module in model.named_modules():
        if isinstance(module, linear_types) and module is not head:
            names.add(name.rsplit(".", 1)[-1])
    head_names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if m is head}
    return sorted(names - head_names)


def attach_lora(model: Any, *, r: int, alpha: float, dropout: float, target_modules: Any, bias: str,
                quantized: bool, gradient_checkpointing: bool, frozen_dtype: torch.dtype | None = None) -> Any:
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    ckpt_kwargs = {"use_reentrant": False}
    if quantized:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing,
                                                gradient_checkpointing_kwargs=ckpt_kwargs)
        if frozen_dtype is not None and frozen_dtype != torch.float32:
            keep_embeddings_in(model, frozen_dtype)
    else:
        for p in model.parameters():
            p.requires_grad_(False)
        if gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=ckpt_kwargs)
            model.enable_input_require_grads()
    targets = linear_target_modules(model) if target_modules == "all-linear" else list(target_modules)
    missing = [t for t in targets if not any(n.endswith("." + t) or n == t for n, _ in model.named_modules())]
    if missing:
        raise UserError(f"lora.target_modules: {missing} not found in the model; "
                        f"its linear layers are {linear_target_modules(model)}")
    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, bias=bias, task_type="CAUSAL_LM",
                     target_modules=targets)
    return get_peft_model(model, cfg)


def keep_embeddings_in(model: Any, dtype: torch.dtype) -> None:
    """prepare_model_for_kbit_training upcasts every weight that is not 4-bit to fp32, the frozen input
    embedding and output head too (2 x 0.76 GB for a 92k vocabulary at 2048 wide). Store those two in
    their checkpoint dtype again: the values are the same (they came from it), the head's matmul runs
    in that dtype under autocast either way, and the embedding's output is still handed on in fp32 as
    before, so the computation is unchanged and the memory is halved."""
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    for m in (emb, head):
        if m is not None and not m.weight.requires_grad and m.weight.dtype == torch.float32:
            m.weight.data = m.weight.data.to(dtype)
    if emb is not None and emb.weight.dtype != torch.float32:
        emb.register_forward_hook(lambda _m, _i, out: out.float())


def read_adapter_meta(adapter_dir: str | Path) -> dict[str, Any]:
    """tunedeck.json of a checkpoint: base model, template and system it was trained with."""
    p = Path(adapter_dir) / "tunedeck.json"
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return {}


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]
