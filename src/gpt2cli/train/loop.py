"""The training loop: AdamW, warmup + cosine schedule, gradient accumulation and clipping,
held-out evaluation, bf16 autocast on CUDA, DDP, periodic checkpoints, resume and Ctrl-C saves.

``finetune(settings, on_event)`` is the whole run; progress is reported as event dataclasses
(on rank 0 only) so that the CLI renders and the library stays display-free.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from gpt2cli.config import GPT2Config
from gpt2cli.errors import BadInputError
from gpt2cli.hub import resolve
from gpt2cli.loader import load_tokenizer
from gpt2cli.model import GPT2
from gpt2cli.tokenizer import Tokenizer
from gpt2cli.train import checkpoint, distributed
from gpt2cli.train.data import (
    Batching,
    Dataset,
    collect_files,
    pack,
    read_documents,
    step_batches,
    tokenize_documents,
    val_shard,
)
from gpt2cli.train.init import load_trainable, new_model, scratch_config
from gpt2cli.train.lora import adapter_state, apply_lora, merged_state_dict
from gpt2cli.train.settings import FinetuneSettings

STATE_VERSION = 1


@dataclass
class DataEvent:
    """What the data paths held: the files read and the documents found in them."""

    files: str  # DataFiles.describe()
    documents: int


@dataclass
class StartEvent:
    total_steps: int
    start_step: int
    train_blocks: int
    val_blocks: int
    tokens: int
    block_size: int
    global_batch: int
    parameters: int
    trainable: int
    world: int
    device: str


@dataclass
class StepEvent:
    step: int  # optimizer steps done
    total_steps: int
    loss: float
    lr: float
    tokens_per_second: float


@dataclass
class EvalEvent:
    step: int
    loss: float
    perplexity: float


@dataclass
class SaveEvent:
    step: int
    path: Path
    final: bool


Event = DataEvent | StartEvent | StepEvent | EvalEvent | SaveEvent


@dataclass
class TrainResult:
    """What a run did: steps, held-out numbers at its first and last evaluation, where it saved."""

    output: Path
    steps: int
    total_steps: int
    first_eval: EvalEvent | None
    final_eval: EvalEvent | None
    seconds: float
    interrupted: bool = False


def lr_at(step: int, base: float, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup over ``warmup`` steps, then cosine decay to ``min_ratio * base`` at ``total``."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return base * (min_ratio + (1 - min_ratio) * cosine)


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 700.0))


def finetune(settings: FinetuneSettings, on_event: Callable[[Event], None] | None = None) -> TrainResult:
    """Train as ``settings`` say and write the checkpoint to ``settings.output``.

    Under torchrun (RANK/WORLD_SIZE set) each process is one DDP rank; only rank 0 writes or
    reports. A KeyboardInterrupt saves a checkpoint of the last finished step, then propagates.

    Raises:
        Gpt2Error: bad data or options, unloadable model, unusable output directory.
    """
    settings.validate()
    info = distributed.setup(settings.device)
    try:
        run = _Run(settings, info, on_event if (on_event and info.is_main) else (lambda e: None))
        result = run.train()
        # The other ranks wait while rank 0 saves, so that every rank leaves the process group
        # together: a rank that tore gloo down while rank 0 still wrote its files died of SIGABRT
        # once ("terminate called without an active exception", a CI run on a busy machine).
        distributed.barrier(info)
        return result
    finally:
        distributed.teardown(info)


class _Run:
    """One training run's state; built (and every input checked) before any step is taken."""

    def __init__(
        self, s: FinetuneSettings, info: distributed.DistInfo, emit: Callable[[Event], None]
    ) -> None:
        self.s, self.info, self.emit = s, info, emit
        checkpoint.check_output_dir(s.output, overwrite=s.overwrite, resume=s.resume)
        resolved = resolve(s.model, offline=s.offline, allow_pickle=s.allow_pickle, progress=info.is_main)
        self.source = resolved.path
        tokenizer = load_tokenizer(self.source)
        self.config = (
            scratch_config(s.size, tokenizer.n_vocab)
            if s.from_scratch
            else GPT2Config.from_json(self.source / "config.json")
        )
        self.data = self._dataset(tokenizer)
        self.batching = Batching(s.batch_size, s.grad_accum, info.world, info.rank)
        self.total = self._total_steps()
        self.warmup = s.warmup_steps if s.warmup_steps is not None else max(1, self.total // 20)
        self.eval_every = s.eval_every or max(1, -(-self.total // 10))  # ceil: at most 10 a run
        self.model = self._model()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = _adamw(self.model, s.learning_rate, s.weight_decay, info.device)
        self.step = 0
        self.last_eval: EvalEvent | None = None
        if s.resume:
            self._restore()
        self.ddp = self._wrap()

    # --- setup -----------------------------------------------------------------------------

    def _dataset(self, tokenizer: Tokenizer) -> Dataset:
        block = self.s.block_size or self.config.n_positions
        if block > self.config.n_positions:
            raise BadInputError(
                f"block size {block} is larger than the model's window of {self.config.n_positions} tokens",
                hint=f"pass --block-size {self.config.n_positions} or less",
            )
        found = collect_files(self.s.data, self.s.data_format)
        docs = read_documents(found.files, self.s.data_format)
        self.emit(DataEvent(found.describe(), len(docs)))
        ids = tokenize_documents(docs, tokenizer)
        return pack(ids, block, self.s.val_fraction, self.s.seed)

    def _total_steps(self) -> int:
        per_epoch = self.batching.steps_per_epoch(self.data.train.shape[0])
        if per_epoch == 0:
            raise BadInputError(
                f"{self.data.train.shape[0]} training blocks are fewer than one global batch of "
                f"{self.batching.global_batch} (batch-size x grad-accum x processes)",
                hint="add data, or lower --batch-size, --grad-accum or --block-size",
            )
        by_epochs = (self.s.epochs or 1) * per_epoch
        if self.s.max_steps is None:
            return by_epochs
        return min(self.s.max_steps, by_epochs) if self.s.epochs else self.s.max_steps

    def _model(self) -> GPT2:
        s = self.s
        if s.resume and s.lora is None:
            model = load_trainable(s.output, self.config)  # the checkpoint's own weights
        elif s.from_scratch:
            model = new_model(self.config, s.seed)
        else:
            model = load_trainable(self.source, self.config, s.allow_pickle)
        if s.lora is not None:
            torch.manual_seed(s.seed)
            apply_lora(model, s.lora, s.alpha)
        model.gradient_checkpointing = s.gradient_checkpointing
        return model.to(self.info.device).train()

    def _restore(self) -> None:
        state = checkpoint.load_training_state(self.s.output)
        data = state.get("data", {})
        if data.get("fingerprint") != self.data.fingerprint or data.get("global_batch") != (
            self.batching.global_batch
        ):
            raise BadInputError(
                f"cannot resume {self.s.output}: the data, block size or global batch differ from its run",
                hint="rerun with the same DATA and options as the interrupted run",
            )
        if state.get("mode") != self.s.mode:
            raise BadInputError(f"cannot resume a {state.get('mode')} run as {self.s.mode}")
        if self.s.lora is not None:
            missing = self.model.load_state_dict(state["adapters"], strict=False).missing_keys
            assert not [k for k in missing if ".lora_" in k], missing
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        self.last_eval = EvalEvent(**state["last_eval"]) if state.get("last_eval") else None

    def _wrap(self) -> nn.Module:
        if not self.info.enabled:
            return self.model
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.info.device.index] if self.info.device.type == "cuda" else None
        return DistributedDataParallel(self.model, device_ids=ids)

    # --- training --------------------------------------------------------------------------

    def train(self) -> TrainResult:
        t0 = time.perf_counter()
        self.emit(self._start_event())
        first = self.evaluate() if self.step < self.total else None
        try:
            while self.step < self.total:
                self._one_step()
                if self.step % self.eval_every == 0 and self.step < self.total:
                    self.evaluate()
                if self.s.save_every and self.step % self.s.save_every == 0 and self.step < self.total:
                    self.save(final=False)
        except KeyboardInterrupt:
            self.save(final=False)
            raise
        final = self.evaluate()
        self.save(final=True)
        return TrainResult(self.s.output, self.step, self.total, first, final, time.perf_counter() - t0)

    def _start_event(self) -> StartEvent:
        return StartEvent(
            total_steps=self.total,
            start_step=self.step,
            train_blocks=self.data.train.shape[0],
            val_blocks=self.data.val.shape[0],
            tokens=self.data.tokens,
            block_size=self.data.block_size,
            global_batch=self.batching.global_batch,
            parameters=sum(p.numel() for p in self.model.parameters()),
            trainable=sum(p.numel() for p in self.params),
            world=self.info.world,
            device=str(self.info.device),
        )

    def _one_step(self) -> None:
        t0 = time.perf_counter()
        lr = lr_at(self.step, self.s.learning_rate, self.warmup, self.total, self.s.min_lr_ratio)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        accum = self.s.grad_accum
        loss_sum = 0.0
        try:
            for micro, batch in enumerate(step_batches(self.data, self.batching, self.s.seed, self.step)):
                batch = batch.to(self.info.device)
                with self._no_sync(micro < accum - 1):
                    loss = self._loss(self.ddp, batch) / accum
                    loss.backward()
                loss_sum += loss.item()
            if self.s.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(self.params, self.s.grad_clip)
            self.optimizer.step()
        finally:
            self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        (mean_loss,) = distributed.all_sum(self.info, [loss_sum])
        seconds = time.perf_counter() - t0
        tokens = self.batching.global_batch * self.data.block_size
        self.emit(StepEvent(self.step, self.total, mean_loss / self.info.world, lr, tokens / seconds))

    def _no_sync(self, skip: bool) -> contextlib.AbstractContextManager[Any]:
        # Accumulating micro-steps need no gradient all-reduce; the last one syncs.
        if skip and self.info.enabled:
            return self.ddp.no_sync()  # type: ignore[operator]
        return contextlib.nullcontext()

    def _loss(self, net: nn.Module, batch: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        x, y = batch[:, :-1], batch[:, 1:]  # (B, T) inputs and next-token targets
        with torch.autocast(
            self.info.device.type, dtype=torch.bfloat16, enabled=self.info.device.type == "cuda"
        ):
            logits = net(x)  # (B, T, vocab)
        return F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction=reduction)

    @torch.no_grad()
    def evaluate(self) -> EvalEvent:
        """Mean token loss and perplexity on the held-out blocks (each rank does its share)."""
        self.model.eval()
        total, count = 0.0, 0
        for batch in _chunks(val_shard(self.data, self.info.rank, self.info.world), self.s.batch_size):
            batch = batch.to(self.info.device)
            total += self._loss(self.model, batch, reduction="sum").item()
            count += batch[:, 1:].numel()
        self.model.train()
        total, n = distributed.all_sum(self.info, [total, float(count)])
        loss = total / n
        self.last_eval = EvalEvent(self.step, loss, perplexity(loss))
        self.emit(self.last_eval)
        return self.last_eval

    # --- saving ----------------------------------------------------------------------------

    def save(self, *, final: bool) -> None:
        if not self.info.is_main:
            return
        settings = self.s.describe()
        val = {"loss": self.last_eval.loss, "perplexity": self.last_eval.perplexity} if self.last_eval else {}
        checkpoint.save(
            self.s.output,
            state=merged_state_dict(self.model),
            config=self.config,
            tokenizer_dir=self.source,
            readme=checkpoint.readme_text(
                settings=settings, config=self.config, step=self.step, total_steps=self.total, val=val
            ),
            training_state=self._training_state(settings),
        )
        self.emit(SaveEvent(self.step, self.s.output, final))

    def _training_state(self, settings: dict[str, Any]) -> dict[str, Any]:
        per_epoch = self.batching.steps_per_epoch(self.data.train.shape[0])
        epoch, offset = divmod(self.step, per_epoch)
        return {
            "version": STATE_VERSION,
            "step": self.step,
            "mode": self.s.mode,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": {
                "step": self.step,
                "warmup": self.warmup,
                "total": self.total,
                "lr": self.s.learning_rate,
                "min_lr_ratio": self.s.min_lr_ratio,
            },
            "data": {
                "epoch": epoch,
                "offset": offset,
                "fingerprint": self.data.fingerprint,
                "global_batch": self.batching.global_batch,
                "seed": self.s.seed,
            },
            "adapters": adapter_state(self.model) if self.s.lora is not None else {},
            "last_eval": vars(self.last_eval).copy() if self.last_eval else None,
            "settings": settings,
        }


def _adamw(model: nn.Module, lr: float, weight_decay: float, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on biases, LayerNorms), as in nanoGPT."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), fused=device.type == "cuda")


def _chunks(blocks: torch.Tensor, size: int) -> Iterator[torch.Tensor]:
    for i in range(0, blocks.shape[0], size):
        yield blocks[i : i + size]
