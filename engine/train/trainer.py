"""The training loop: QLoRA / LoRA / full fine-tune, one device, DDP or DeepSpeed ZeRO.

Read it top to bottom: ``setup`` (tokenizer, data, model, optimizer, schedule,
resume), then ``train`` (windows of ``accumulative_counts`` micro-batches, one
optimizer step each, metrics, evaluation, checkpoints), then the end state.

Loss: the token-level mean over the whole accumulation window (and over all
ranks), so gradient accumulation and data parallelism give the same gradient
as one big batch.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import importlib.util
import json
import logging
import math
import os
import random
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from engine.core import faults
from engine.core.errors import UserError
from engine.core.files import disk_full_message
from engine.data.formats import load_conversations
from engine.data.packing import Row, build_rows, collate, tokenize_conversations
from engine.data.preview import render_masked
from engine.data.templates import IGNORE_INDEX, encode_prompt, resolve_template_name, stop_token_ids
from engine.model.loading import (
    Precision,
    apply_liger,
    attach_lora,
    load_model,
    load_tokenizer,
    pick_precision,
    resolve_model,
)
from engine.model.memory import embedding_on, offload_saved_tensors
from engine.recipe.schema import Recipe
from engine.train.checkpoint import (
    clean_partial,
    read_trainer_state,
    rotate_checkpoints,
    save_checkpoint,
    set_rng_state,
)
from engine.train.collector import StepCollector
from engine.train.distributed import any_rank, deepspeed_config, global_sum, init_distributed
from engine.train.losses import LossHead, regroup
from engine.train.profiling import profile_step
from engine.train.profiling import profiled as profiled_step
from engine.train.runs import RunDirectory
from engine.train.schedule import warmup_cosine

log = logging.getLogger("tunedeck.train")


@dataclass
class Position:
    """Where training is: optimizer steps done, and the window inside the current epoch."""

    step: int = 0
    epoch: int = 0
    window: int = 0


class StoppedDuringSetup(Exception):
    """A stop request (SIGTERM, Ctrl-C, SIGHUP) that came while the run was still being set up."""


class Trainer:
    find_unused_parameters = False       # DDP: every trainable weight gets a gradient every step
    chunked_loss_ok = True               # the decoder + chunked cross-entropy path fits this model family

    def __init__(self, recipe: Recipe, run: RunDirectory, *, resume_from: Path | None = None,
                 config_name: str = ""):
        self.recipe = recipe
        self.run = run
        self.resume_from = resume_from
        self.config_name = config_name
        self._stop_requested = False
        self.profile_step = profile_step()
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.ds_engine: Any = None
        self.ddp: Any = None                 # DistributedDataParallel around the step module (plain multi-rank)
        self.loss_head: LossHead | None = None
        self.scaler: Any = None
        self.tb: Any = None

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        r = self.recipe
        faults.pause("TUNEDECK_FAULT_SETUP_DELAY")     # tests: a stop request that comes during setup
        if r.train.low_memory and r.train.deepspeed != "none":
            raise UserError(f"train.low_memory: true with train.deepspeed {r.train.deepspeed!r}: DeepSpeed keeps its "
                            "own optimizer; use deepspeed zero2_offload instead, or low_memory: false")
        init_distributed(r.train.deepspeed, self.world, self.local_rank)
        self._seed(r.train.seed)
        self.precision = pick_precision(r.train.mixed_precision, r.model.dtype)
        self._phase("loading the tokenizer")
        self.tokenizer = load_tokenizer(r.model.path, r.model.trust_remote_code)
        self.template = resolve_template_name(r.data.prompt_template, self.tokenizer)
        self._phase("reading the data")
        self._setup_data()
        self._phase("loading the model")
        self._setup_model()
        # on a GPU the loss is taken from hidden states in chunks (no batch-sized fp32 logits)
        if self.device.type == "cuda" or r.train.loss_chunk_tokens:
            self.loss_head = self._make_loss_head()
        self._setup_optimizer()
        self.pos = Position()
        if self.resume_from is not None:
            self._resume(self.resume_from)
        if self.ds_engine is None and self.world > 1:
            self.ddp = torch.nn.parallel.DistributedDataParallel(
                self.loss_head or self.model, device_ids=[self.local_rank] if self.precision.device == "cuda" else None,
                find_unused_parameters=self.find_unused_parameters)
        if self.device.type == "cuda":   # peak memory of training, not of loading
            torch.cuda.reset_peak_memory_stats(self.device)

    recompute_layers: int | None = None      # decoder layers that recompute in backward (the rest keep)
    n_decoder_layers = 0

    def _plan_recompute(self, model: Any) -> None:
        """model.checkpoint_layers: which layers recompute, from the GPU's free memory when auto (for the
        rows of one forward, as the training steps will take them)."""
        from engine.model.recompute import apply_recompute, decoder_layers, layer_activation_bytes, plan_recompute
        from engine.train.estimate import pending_optimizer_bytes

        r = self.recipe
        layers = decoder_layers(model)
        setting = "all" if r.train.low_memory else r.model.checkpoint_layers
        free = torch.cuda.mem_get_info(self.device)[0] if self.device.type == "cuda" else None
        if free is not None:      # the gradients and moments the optimizer has not allocated yet
            n = sum(p.numel() for p in model.parameters() if p.requires_grad)
            free -= pending_optimizer_bytes(n, r.train.optim_type, r.train.low_memory)
        rows = self._rows_per_forward(r.train.batch_size * r.train.accumulative_counts)
        per_layer = layer_activation_bytes(model.config, rows * r.data.max_length,
                                           quantized=r.model.quantization != "none", full=not r.lora.enabled)
        self.recompute_layers = plan_recompute(setting, len(layers), per_layer, free)
        self.n_decoder_layers = len(layers)
        apply_recompute(layers, self.recompute_layers)

    def _phase(self, phase: str | None) -> None:
        """What setup (or the first step) is doing, in status.json for `tunedeck runs` and the app."""
        if self.rank == 0:
            self.run.write_status(phase=phase)

    def _weights_loaded(self, done: int, total: int) -> None:
        self._phase(f"loading the model {done * 100 // max(total, 1)}%")

    def _seed(self, seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)

    def _setup_data(self) -> None:
        r = self.recipe
        convs = load_conversations(r.data.data_path, r.data.format)
        if r.data.system:
            convs = [c if c[0]["role"] == "system" else [{"role": "system", "content": r.data.system}, *c]
                     for c in convs]
        tok = tokenize_conversations(convs, self.tokenizer, self.template, r.data.max_length,
                                     r.data.dataloader_num_workers)
        if not tok.samples:
            raise UserError(f"data.data_path: {r.data.data_path}: no sample has an assistant token left "
                            f"after truncation to max_length {r.data.max_length}")
        self.rows: list[Row] = build_rows(tok, r.data.max_length, r.data.pack_to_max_length, r.train.seed)
        self._plan()
        self.data_info = {
            "records": tok.n_records, "samples": len(tok.samples), "truncated": tok.n_truncated,
            "dropped": tok.n_dropped, "rows": len(self.rows), "tokens": self.n_train_tokens,
            "length": tok.stats(), "template": self.template,
            "first_sample": render_masked(self.tokenizer, *tok.samples[0]),
        }

    def _plan(self) -> None:
        """Micro-batches and steps per epoch, total steps, from self.rows."""
        r = self.recipe
        self.pad_id = self.tokenizer.pad_token_id or 0
        per_rank = math.ceil(len(self.rows) / self.world)
        self.micro_per_epoch = math.ceil(per_rank / r.train.batch_size)
        acc = r.train.accumulative_counts
        if self.recipe.train.deepspeed != "none":
            # DeepSpeed counts accumulation boundaries itself: only whole windows.
            self.micro_per_epoch = max(acc, self.micro_per_epoch // acc * acc)
        self.steps_per_epoch = math.ceil(self.micro_per_epoch / acc)
        self.total_steps = r.train.max_steps or max(1, math.ceil(self.steps_per_epoch * r.train.max_epochs))
        self.n_train_tokens = sum(row.n_tokens for row in self.rows)

    def _setup_model(self) -> None:
        r = self.recipe
        quantized = r.model.quantization != "none"
        zero3 = r.train.deepspeed.startswith("zero3")   # partitions weights, gathers them per module call
        if quantized and not r.lora.enabled:
            raise UserError(f"model.quantization: {r.model.quantization!r} needs lora.enabled: true "
                            "(a quantized model cannot be fully fine-tuned); set quantization: none")
        if quantized and zero3:
            raise UserError(f"train.deepspeed: {r.train.deepspeed!r} partitions the base weights and cannot "
                            "hold bitsandbytes 4/8-bit ones; use zero2 or model.quantization: none")
        if quantized and self.precision.device == "cpu" and r.model.quantization == "8bit":
            raise UserError("model.quantization: '8bit' has no CPU backend in bitsandbytes; use 4bit or none")
        full = not r.lora.enabled
        precision = self.precision
        if full:  # master weights in fp32, compute under autocast
            precision = Precision(precision.device, precision.amp, torch.float32)
        device_map = ({"": self.local_rank} if precision.device == "cuda" else {"": "cpu"})
        # auto: where it was measured -- a GPU, LoRA on a 4-bit or unquantized base, not ZeRO-3
        compile_layers = r.model.compile == "on" or (
            r.model.compile == "auto" and precision.device == "cuda" and r.lora.enabled
            and r.model.quantization != "8bit" and not zero3)
        self.liger = apply_liger(r.model.path, r.model.liger_kernels, precision, r.model.trust_remote_code,
                                 compiled=compile_layers)
        attn = r.model.attn_implementation
        remote_code = resolve_model(r.model.path, r.model.trust_remote_code)[1]
        if (attn == "auto" and precision.device == "cuda" and r.data.pack_to_max_length
                and not remote_code and importlib.util.find_spec("torch.nn.attention.flex_attention")):
            attn = "flex_attention"        # packed rows: a block mask per sample, no dense mask (H100: +5%)
        self.attn = attn
        model = load_model(r.model.path, quantization=r.model.quantization, quant_type=r.model.quant_type,
                           double_quant=r.model.double_quant, precision=precision,
                           trust_remote_code=r.model.trust_remote_code, attn_implementation=attn,
                           device_map=device_map, progress=self._weights_loaded)
        model.config.use_cache = False
        if full:
            if r.model.gradient_checkpointing:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            torch.manual_seed(r.train.seed)   # LoRA init is seeded on its own
            model = attach_lora(model, r=r.lora.r, alpha=r.lora.alpha, dropout=r.lora.dropout,
                                target_modules=r.lora.target_modules, bias=r.lora.bias, quantized=quantized,
                                gradient_checkpointing=r.model.gradient_checkpointing,
                                frozen_dtype=precision.weight_dtype)
            fuse = r.model.fused_lora == "on" or (r.model.fused_lora == "auto" and precision.device == "cuda")
            if fuse and not zero3:
                from engine.model.fused_lora import fuse_lora_layers

                self.fused_lora = fuse_lora_layers(model)
        if compile_layers:
            from engine.model.loading import compile_decoder_layers

            self.compiled_layers = compile_decoder_layers(model)
        model.train()        # from_pretrained hands it over in eval mode: no dropout, no checkpointing
        self.device = torch.device(f"cuda:{self.local_rank}" if precision.device == "cuda" else "cpu")
        if r.model.gradient_checkpointing:
            self._plan_recompute(model)
        if r.train.low_memory and precision.device == "cuda":
            from engine.model.memory import embedding_on_cpu

            embedding_on_cpu(model, self.device)
            self.offload_activations = True
        self.model = model
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.n_trainable = sum(p.numel() for p in self.trainable)
        self.n_params = sum(p.numel() for p in model.parameters())

    def _setup_optimizer(self) -> None:
        t = self.recipe.train
        kw = {"lr": t.lr, "betas": tuple(t.betas), "weight_decay": t.weight_decay}
        if t.optim_type == "adamw" and t.low_memory and self.device.type == "cuda":
            from engine.model.memory import OffloadedAdamW

            opt = OffloadedAdamW(self.trainable, **kw)
        elif t.optim_type == "adamw":
            opt = torch.optim.AdamW(self.trainable, **kw)
        else:
            import bitsandbytes as bnb

            cls = bnb.optim.PagedAdamW8bit if t.optim_type == "paged_adamw_8bit" else bnb.optim.AdamW8bit
            opt = cls(self.trainable, **kw)
        self.optimizer = opt
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(self.total_steps, t.warmup_ratio))
        if t.deepspeed != "none":
            import deepspeed

            rows = self._rows_per_forward(t.batch_size * t.accumulative_counts)
            ds_cfg = deepspeed_config(self.recipe, rows, self.world, self.precision.amp)
            self.ds_engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
                model=self.loss_head or self.model, model_parameters=self.trainable, optimizer=opt,
                lr_scheduler=self.scheduler, config=ds_cfg)
        elif self.precision.amp == "fp16":
            self.scaler = torch.amp.GradScaler("cuda")

    def _resume(self, ckpt: Path) -> None:
        state = read_trainer_state(ckpt)
        if state.get("total_steps") not in (None, self.total_steps):
            log.warning("checkpoint planned %s steps, this recipe plans %s", state.get("total_steps"),
                        self.total_steps)
        if self.ds_engine is not None:
            # DeepSpeed's own checkpoint holds the trainable weights (partitioned under ZeRO-3)
            path, _ = self.ds_engine.load_checkpoint(str(ckpt / "deepspeed"), load_module_strict=False)
            if path is None:
                raise UserError(f"{ckpt}: no DeepSpeed state in it; resume it without --deepspeed")
        else:
            self._load_weights(ckpt)
            if hasattr(self.optimizer, "reload_params"):
                self.optimizer.reload_params()
            self.optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=False))
            self.scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", weights_only=False))
            if self.scaler is not None and (ckpt / "scaler.pt").exists():
                self.scaler.load_state_dict(torch.load(ckpt / "scaler.pt", weights_only=False))
        set_rng_state(torch.load(ckpt / "rng.pt", weights_only=False))
        self.pos = Position(state["step"], state["epoch"], state["window"])
        log.info("resumed from %s at step %d (epoch %d, window %d)", ckpt, *vars(self.pos).values())

    def _load_weights(self, ckpt: Path) -> None:
        from safetensors.torch import load_file

        if self.recipe.lora.enabled:
            from peft import set_peft_model_state_dict

            f = ckpt / "adapter_model.safetensors"
            if not f.is_file():
                raise UserError(f"{ckpt}: no adapter_model.safetensors; it is not a LoRA checkpoint of this recipe")
            result = set_peft_model_state_dict(self.model, load_file(str(f), device=str(self.device)))
            if getattr(result, "unexpected_keys", None):
                raise UserError(f"{ckpt}: adapter does not fit this model "
                                f"(unexpected {result.unexpected_keys[:3]})")
        else:
            files = sorted(ckpt.glob("model*.safetensors"))
            if not files:
                raise UserError(f"{ckpt}: no model weights (model*.safetensors)")
            state: dict[str, torch.Tensor] = {}
            for f in files:
                state.update(load_file(str(f), device=str(self.device)))
            missing, unexpected = self.model.load_state_dict(state, strict=False)
            if unexpected or [k for k in missing if "rotary" not in k]:
                raise UserError(f"{ckpt}: weights do not fit this model "
                                f"(missing {list(missing)[:3]}, unexpected {list(unexpected)[:3]})")

    # ------------------------------------------------------------------ data order
    def _epoch_order(self, epoch: int) -> list[int]:
        n = len(self.rows)
        if self.recipe.data.shuffle:
            g = torch.Generator().manual_seed(self.recipe.train.seed * 1_000_003 + epoch)
            order = torch.randperm(n, generator=g).tolist()
        else:
            order = list(range(n))
        per_rank = math.ceil(n / self.world)
        order += order[: per_rank * self.world - n]          # even shards: wrap a few rows
        return order[self.rank::self.world]

    def _window(self, epoch: int, window: int) -> list[dict[str, torch.Tensor]]:
        order = self._epoch_order(epoch)
        bs, acc = self.recipe.train.batch_size, self.recipe.train.accumulative_counts
        first = window * acc
        last = min(first + acc, self.micro_per_epoch)
        batches = []
        for m in range(first, last):
            idx = order[m * bs:(m + 1) * bs]
            if idx:
                batches.append(self._batch(idx))
        return batches

    def _batch(self, idx: list[int]) -> dict[str, torch.Tensor]:
        b = collate([self.rows[i] for i in idx], self.pad_id)
        return {k: torch.tensor(v, dtype=torch.long, device=self.device) for k, v in b.items()}

    # ------------------------------------------------------------------ the loop
    def _runner(self) -> Any:
        """What a micro-batch goes through: DeepSpeed's engine or DDP around the step module, else the
        step module itself (the loss head when there is one, else the model)."""
        return self.ds_engine or self.ddp or self.loss_head or self.model

    def _forward(self, batch: dict[str, torch.Tensor]) -> Any:
        return self._runner()(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)

    def _make_loss_head(self) -> LossHead | None:
        """The loss from hidden states in chunks, as one module, when the model exposes its decoder and
        output head (transformers-native causal LMs do) and ZeRO-3 does not partition them."""
        if not self.chunked_loss_ok or self.recipe.train.deepspeed.startswith("zero3"):
            return None
        model = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        try:
            decoder, head = model.get_decoder(), model.get_output_embeddings()
        except (AttributeError, NotImplementedError):
            return None
        if decoder is None or head is None:
            return None
        t = self.recipe.train
        return LossHead(self.model, decoder, head, t.loss_chunk_tokens or (128 if t.low_memory else 1024))

    def _loss_sum(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=self.precision.autocast_dtype or torch.float32,
                            enabled=self.precision.autocast_dtype is not None):
            if self.loss_head is not None:
                return self._runner()(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                                      labels=batch["labels"])
            out = self._forward(batch)
        logits = out.logits[:, :-1].float()
        target = batch["labels"][:, 1:]
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1),
                               ignore_index=IGNORE_INDEX, reduction="sum")

    def _rows_per_forward(self, window_rows: int) -> int:
        t = self.recipe.train
        if t.rows_per_forward:
            return t.rows_per_forward
        if self.device.type != "cuda":
            return t.batch_size
        return self._auto_rows or (min(window_rows, max(4, t.batch_size)) if t.low_memory else window_rows)

    _auto_rows = 0
    _first_step = 0
    offload_activations = False          # low_memory on a GPU: the layers' inputs wait in CPU memory
    fused_lora = 0                       # LoRA layers on the fused forward (engine/fused_lora.py)
    compiled_layers: list = []           # decoder layers under torch.compile (model.compile)

    def _train_step(self, batches: list[dict[str, torch.Tensor]]) -> tuple[float, float, int]:
        """One optimizer step over a window; returns (mean loss, grad norm, tokens seen)."""
        faults.pause("TUNEDECK_FAULT_STEP_DELAY")        # tests: steps slow enough to kill a node between
        window_rows = sum(int(b["input_ids"].shape[0]) for b in batches)
        while True:
            k = self._rows_per_forward(window_rows)
            try:
                return self._window_step(regroup(batches, k, self.pad_id) if k != self.recipe.train.batch_size
                                         else batches)
            except torch.cuda.OutOfMemoryError:
                # auto: halve the rows per forward and redo the window from a clean slate
                if self.recipe.train.rows_per_forward or k <= self.recipe.train.batch_size:
                    raise
                if self.world > 1 or self.ds_engine is not None:
                    # ranks would fall out of step, and DeepSpeed fixed its micro-batch at start
                    raise UserError(f"CUDA out of memory with {k} rows per forward on {self.world} rank(s); "
                                    "set train.rows_per_forward lower (e.g. "
                                    f"{max(self.recipe.train.batch_size, k // 2)})") from None
                self.optimizer.zero_grad(set_to_none=True)
                gc.collect()                   # the failed forward's frames (the collector is off in steps)
                torch.cuda.empty_cache()
                self._auto_rows = max(self.recipe.train.batch_size, k // 2)
                log.info("rows per forward: %d did not fit in GPU memory, trying %d", k, self._auto_rows)
            except Exception as e:
                # the compiled layers failed where eager ones would not (dynamo falls back by itself only
                # while compiling): on the first step of a single process, run eagerly instead
                if (not self.compiled_layers or self.pos.step != self._first_step or self.world > 1
                        or self.ds_engine is not None or isinstance(e, UserError)):
                    raise
                from engine.model.loading import uncompile

                log.warning("model.compile: the compiled layers failed (%s); running them eagerly",
                            str(e).splitlines()[0][:200])
                uncompile(self.compiled_layers)
                self.compiled_layers = []
                self.optimizer.zero_grad(set_to_none=True)

    def _window_step(self, batches: list[dict[str, torch.Tensor]]) -> tuple[float, float, int]:
        n_targets = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches)
        n_global = max(1, global_sum(n_targets, self.world, self.device))
        scale = self.world / n_global          # DDP / DeepSpeed average gradients over ranks
        losses = []
        tokens = 0
        for i, b in enumerate(batches):
            # DDP: gradients are reduced once, after the window's last forward
            sync = self.ddp.no_sync() if self.ddp is not None and i < len(batches) - 1 else contextlib.nullcontext()
            with sync:
                with offload_saved_tensors() if self.offload_activations else contextlib.nullcontext():
                    loss_sum = self._loss_sum(b)
                losses.append(loss_sum.detach())
                tokens += int(b["input_ids"].numel())
                loss = loss_sum * scale
                if self.ds_engine is not None:
                    self.ds_engine.backward(loss, scale_wrt_gas=False)
                    self.ds_engine.step()
                elif self.scaler is not None:
                    self.scaler.scale(loss).backward()
                else:
                    loss.backward()
        t = self.recipe.train
        if self.ds_engine is not None:
            norm = self.ds_engine.get_global_grad_norm()
            grad_norm = float(norm) if norm is not None else float("nan")
        else:
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)
            clip = t.max_norm if t.max_norm > 0 else float("inf")
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.trainable, clip))
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.scheduler.step()
        loss_total = float(torch.stack(losses).sum())       # one device sync per step
        loss_mean = loss_total
        if self.world > 1:
            lt = torch.tensor([loss_total], device=self.device, dtype=torch.float64)
            torch.distributed.all_reduce(lt)
            loss_mean = float(lt.item())
        return loss_mean / n_global, grad_norm, tokens * self.world

    def train(self) -> str:
        """Run to the end (or a stop request). Returns the final state."""
        r = self.recipe
        t0 = time.time()
        self.in_setup = False
        self._log_start()
        if r.train.evaluation_inputs and not self.resume_from:
            self.evaluate()
        step_times: list[float] = []
        self._first_step = self.pos.step
        state = "finished"
        saved_at = self.pos.step if self.resume_from else -1
        acc = r.train.accumulative_counts
        windows_per_epoch = math.ceil(self.micro_per_epoch / acc)
        with StepCollector() as collector:    # Python's collector between steps, not inside them
            while self.pos.step < self.total_steps:
                if self.pos.window >= windows_per_epoch:
                    self.pos.epoch += 1
                    self.pos.window = 0
                batches = self._window(self.pos.epoch, self.pos.window)
                ts = time.time()
                profiled = self.pos.step + 1 == self.profile_step
                if profiled:
                    loss, grad_norm, tokens = profiled_step(partial(self._train_step, batches), self.device,
                                                            self.run.path / "profile", self.pos.step + 1,
                                                            self.rank, self.world)
                else:
                    loss, grad_norm, tokens = self._train_step(batches)
                collector.step()
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                dt = time.time() - ts
                step_times.append(dt)
                self.pos.window += 1
                self.pos.step += 1
                lr = self.scheduler.get_last_lr()[0]
                self._on_step(loss, lr, grad_norm, tokens, dt, step_times, profiled=profiled)
                if self.pos.step % r.train.save_steps == 0 and self.pos.step < self.total_steps:
                    self.save()
                    saved_at = self.pos.step
                if (r.train.evaluation_freq and self.pos.step % r.train.evaluation_freq == 0
                        and self.pos.step < self.total_steps and r.train.evaluation_inputs):
                    self.evaluate()
                if self._stop_now():
                    state = "stopped"
                    break
        if saved_at != self.pos.step:
            self.save()
        if state == "finished" and r.train.evaluation_inputs:
            self.evaluate()
        if self.rank == 0:
            self.run.write_status(state=state, step=self.pos.step, eta_s=0 if state == "finished" else None,
                                  finished=time.time(), phase=None)
            log.info("%s at step %d/%d in %.1fs", state, self.pos.step, self.total_steps, time.time() - t0)
        if self.tb is not None:
            self.tb.close()
        return state

    def _stop_now(self) -> bool:
        return any_rank(self._stop_requested, self.world, self.device)

    in_setup = True                      # until train() starts: a stop request ends the run at once

    def request_stop(self, *_: Any) -> None:
        if self.in_setup:
            raise StoppedDuringSetup
        if not self._stop_requested:
            log.info("stop requested: saving a checkpoint after this step")
        self._stop_requested = True

    # ------------------------------------------------------------------ outputs
    def _log_start(self) -> None:
        if self.rank != 0:
            return
        d = self.data_info
        log.info("data: %d records -> %d samples (%d truncated to %d tokens, %d dropped) -> %d rows, "
                 "%d tokens; length %s; template %s", d["records"], d["samples"], d["truncated"],
                 self.recipe.data.max_length, d["dropped"], d["rows"], d["tokens"], d["length"], d["template"])
        log.info("first sample (masked spans in ⟦ ⟧): %s", d["first_sample"])
        log.info("model: %s, %s params, %s trainable (%.2f%%), %s on %s, amp %s%s", self.recipe.model.path,
                 f"{self.n_params:,}", f"{self.n_trainable:,}", 100 * self.n_trainable / max(1, self.n_params),
                 self.recipe.model.quantization, self.device, self.precision.amp,
                 (", Liger kernels" if getattr(self, "liger", False) else "")
                 + (f", {self.fused_lora} fused LoRA layers" if self.fused_lora else "")
                 + (f", {len(self.compiled_layers)} compiled decoder layers" if self.compiled_layers else "")
                 + (f", {self.attn} attention" if getattr(self, "attn", "auto") != "auto" else "")
                 + (f", {self.recompute_layers} of {self.n_decoder_layers} layers recompute"
                    if self.recompute_layers is not None else ""))
        log.info("plan: %d steps (%d per epoch x %s epochs), %d micro-batches of %d per step, %d rank(s)",
                 self.total_steps, self.steps_per_epoch, self.recipe.train.max_epochs,
                 self.recipe.train.accumulative_counts, self.recipe.train.batch_size, self.world)
        self.run.write_status(state="running", pid=os.getpid(), step=self.pos.step,
                              phase="compiling" if self.compiled_layers else None, total_steps=self.total_steps,
                              data=self.data_info | {"first_sample": None},
                              trainable_params=self.n_trainable, device=str(self.device), error=None)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.run.path / "tensorboard"))
        except Exception:  # tensorboard not installed: metrics.jsonl still has everything
            self.tb = None

    def _on_step(self, loss: float, lr: float, grad_norm: float, tokens: int, dt: float,
                 step_times: list[float], profiled: bool = False) -> None:
        if self.rank != 0:
            return
        step = self.pos.step
        recent = step_times[-20:]
        eta = (self.total_steps - step) * (sum(recent) / len(recent))
        mem = (torch.cuda.max_memory_allocated(self.device) / 2**30) if self.device.type == "cuda" else None
        rec = {"step": step, "epoch": round(self.pos.epoch + self.pos.window / max(1, self.steps_per_epoch), 4),
               "loss": round(loss, 6), "lr": lr, "grad_norm": round(grad_norm, 6),
               "tokens_per_s": round(tokens / dt, 1) if dt > 0 else None, "step_time_s": round(dt, 4),
               "gpu_mem_gib": round(mem, 3) if mem is not None else None, "time": time.time()}
        if profiled:                     # slowed by the profiler: not a step to time
            rec["profiled"] = True
        if step % self.recipe.train.logging_steps == 0 or step == self.total_steps:
            with open(self.run.metrics_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(rec) + "\n")
            log.info("step %d/%d  loss %.4f  lr %.3g  grad_norm %.3f  %.0f tok/s%s  eta %.0fs", step,
                     self.total_steps, loss, lr, grad_norm, rec["tokens_per_s"] or 0,
                     f"  mem {mem:.2f}GiB" if mem is not None else "", eta)
            if self.tb is not None:
                for k in ("loss", "lr", "grad_norm", "tokens_per_s"):
                    if rec[k] is not None:
                        self.tb.add_scalar(f"train/{k}", rec[k], step)
        self.run.write_status(state="running", step=step, total_steps=self.total_steps, eta_s=round(eta, 1),
                              loss=rec["loss"], epoch=rec["epoch"], phase=None)

    def meta(self) -> dict[str, Any]:
        r = self.recipe
        return {"base_model": r.model.path, "prompt_template": self.template, "system": r.data.system,
                "trust_remote_code": r.model.trust_remote_code, "quantization": r.model.quantization,
                "lora": r.lora.enabled, "config_name": self.config_name, "step": self.pos.step}

    def save(self) -> Path | None:
        model = self.model
        trainer_state = {"step": self.pos.step, "epoch": self.pos.epoch, "window": self.pos.window,
                         "total_steps": self.total_steps, "time": time.time()}
        extra = None
        if self.ds_engine is not None:
            def extra(tmp: Path) -> None:
                self.ds_engine.save_checkpoint(str(tmp / "deepspeed"), tag="state",
                                               exclude_frozen_parameters=True)
                if self.world > 1:
                    torch.distributed.barrier()
        gather: Any = contextlib.nullcontext()
        if self.ds_engine is not None and self.ds_engine.zero_optimization_stage() == 3:
            import deepspeed  # ZeRO-3 partitions the weights: gather what the checkpoint saves

            params = self.trainable if self.recipe.lora.enabled else list(model.parameters())
            gather = deepspeed.zero.GatheredParameters(params, modifier_rank=None)
        try:
            with gather:
                path = save_checkpoint(self.run, self.pos.step, model=model, tokenizer=self.tokenizer,
                                       trainer_state=trainer_state, meta=self.meta(),
                                       optimizer=self.optimizer if self.ds_engine is None else None,
                                       scheduler=self.scheduler if self.ds_engine is None else None,
                                       scaler=self.scaler, extra_writer=extra, rank=self.rank)
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            clean_partial(self.run)              # the half-written checkpoint goes; the earlier ones stay
            raise UserError(disk_full_message(self.run.path, f"checkpoint-{self.pos.step}", e)) from None
        if self.rank == 0:
            removed = rotate_checkpoints(self.run, self.recipe.train.save_total_limit)
            log.info("saved %s%s", path.name, f" (removed {', '.join(p.name for p in removed)})" if removed else "")
        if self.world > 1:
            torch.distributed.barrier()
        return path

    @torch.no_grad()
    def evaluate(self) -> list[dict[str, Any]]:
        """XTuner's EvaluateChatHook: answer evaluation_inputs greedily, log and record them."""
        from engine.train.checkpoint import rng_state

        if self.rank != 0:
            return []
        rng = rng_state()   # generation must not shift the training's random stream
        model = self.model
        was_training = model.training
        model.eval()
        out = []
        with embedding_on(model, self.device):       # low_memory keeps it on the CPU for training
            for i, prompt in enumerate(self.recipe.train.evaluation_inputs):
                # generation runs the layers eagerly: token-by-token shapes would make the compiler recompile
                eager = torch.compiler.set_stance("force_eager") if self.compiled_layers else contextlib.nullcontext()
                with eager, torch.autocast(self.device.type, dtype=self.precision.autocast_dtype or torch.float32,
                                           enabled=self.precision.autocast_dtype is not None):
                    answer, extra = self._eval_answer(model, i, prompt)
                rec = {"step": self.pos.step, "prompt": prompt, "answer": answer, **extra, "time": time.time()}
                out.append(rec)
                log.info("eval @%d  %s -> %s%s", self.pos.step, prompt, answer,
                         "".join(f"  ({k}: {v})" for k, v in extra.items() if v))
        with open(self.run.evals_path, "a", encoding="utf-8") as f:
            for rec in out:
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        if was_training:
            model.train()
        set_rng_state(rng)
        return out

    def _eval_answer(self, model: Any, index: int, prompt: str) -> tuple[str, dict[str, Any]]:
        """One evaluation answer (greedy) and any fields its record carries besides the answer."""
        msgs = ([{"role": "system", "content": self.recipe.data.system}] if self.recipe.data.system else [])
        msgs.append({"role": "user", "content": prompt})
        ids = torch.tensor([encode_prompt(self.tokenizer, self.template, msgs)], device=self.device)
        gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=self.recipe.train.evaluation_max_new_tokens,
                             eos_token_id=stop_token_ids(self.tokenizer, self.template), pad_token_id=self.pad_id,
                             use_cache=True)
        return self.tokenizer.decode(gen[0, ids.shape[1]:], skip_special_tokens=True).strip(), {}


