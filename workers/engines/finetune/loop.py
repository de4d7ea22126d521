"""The inner training loop of a fine-tune: micro-batches, optimizer steps, reports, evaluation, checkpoints.

Runs identically on every rank; ``emit`` is a no-op except on rank 0. See ``finetune.py`` for the events.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from workers.engines.finetune import data, ds
from workers.engines.finetune.params import FinetuneParams

Event = dict[str, Any]


@dataclass
class PreparedData:
    train: list[data.Example]
    validation: list[data.Example]
    labels: list[str] | None
    sha256: str
    warnings: list[str]


@dataclass
class Window:
    """Figures gathered between two train events."""

    loss_sum: float = 0.0
    micro_batches: int = 0
    tokens: int = 0
    seconds: float = 0.0  # spent in training steps only: evaluations and checkpoints would skew the rate

    def add(self, loss_sum: float, micro_batches: int, tokens: int, seconds: float) -> None:
        self.loss_sum += loss_sum
        self.micro_batches += micro_batches
        self.tokens += tokens
        self.seconds += seconds


class TrainingLoop:
    def __init__(
        self,
        engine: Any,
        params: FinetuneParams,
        prepared: PreparedData,
        *,
        rank: int,
        world_size: int,
        per_epoch: int,
        emit: Callable[[Event], None],
    ) -> None:
        self.engine, self.params, self.hp, self.data = engine, params, params.hyperparameters, prepared
        self.rank, self.world_size, self.per_epoch, self.emit = rank, world_size, per_epoch, emit
        self.pad_id = int(engine.module.config.pad_token_id or 0)
        self.last_lr = params.hyperparameters.learning_rate
        self._order_epoch = -1
        self._batches: list[list[int]] = []

    def _micro_batches(self, epoch: int) -> list[list[int]]:
        if epoch != self._order_epoch:
            order = data.epoch_order(
                len(self.data.train), seed=self.hp.seed, epoch=epoch, rank=self.rank, world_size=self.world_size
            )
            size = self.hp.batch_size
            self._batches = [order[i : i + size] for i in range(0, len(order), size)]
            self._order_epoch = epoch
        return self._batches

    def train_step(self, step: int) -> tuple[float, int, int, float]:
        """One optimizer step (``gradient_accumulation_steps`` micro-batches).

        Returns (loss sum, micro-batches, tokens, seconds) for the report window.

        The data position is a pure function of ``step``, which is what lets a resumed run pick up exactly.
        """
        started = time.perf_counter()
        epoch, in_epoch = divmod(step - 1, self.per_epoch)
        batches = self._micro_batches(epoch)
        accumulation = self.hp.gradient_accumulation_steps
        # Read before stepping: the scheduler moves on to the next step's rate inside the last engine.step().
        self.last_lr = float(self.engine.get_lr()[0])
        loss_sum, tokens = 0.0, 0
        for j in range(accumulation):
            indices = batches[(in_epoch * accumulation + j) % len(batches)]
            batch = data.collate([self.data.train[i] for i in indices], pad_token_id=self.pad_id)
            batch = {k: v.to(self.engine.device) for k, v in batch.items()}
            loss = self.engine(**batch).loss
            self.engine.backward(loss)
            self.engine.step()
            loss_sum += float(loss.detach())
            tokens += int(batch["attention_mask"].sum())
        return loss_sum, accumulation, tokens, time.perf_counter() - started

    def report(self, step: int, window: Window) -> float:
        loss_sum, count, tokens, seconds = ds.all_reduce(
            [window.loss_sum, window.micro_batches, window.tokens, window.seconds], device=self.engine.device
        )
        seconds /= self.world_size  # ranks step in lockstep: their mean time is the wall time
        loss = loss_sum / max(count, 1)
        self.emit(
            {
                "event": "train",
                "step": step,
                "loss": round(loss, 6),
                "learning_rate": self.last_lr,
                "tokens_per_second": round(tokens / max(seconds, 1e-9), 1),
                "epoch": round(step / self.per_epoch, 4),
            }
        )
        return loss

    def evaluate(self, step: int) -> tuple[float | None, float | None]:
        """(eval_loss, eval_accuracy) on the whole validation set.

        Every rank evaluates all of it: under ZeRO-3 each forward is a collective, so ranks must run the same
        batches; the results then agree without another reduction.
        """
        if not self.data.validation:
            return None, None
        classify = self.params.task == "sequence-classification"
        total_loss = weight = correct = 0.0
        self.engine.eval()
        with torch.no_grad():
            for i in range(0, len(self.data.validation), self.hp.batch_size):
                examples = self.data.validation[i : i + self.hp.batch_size]
                # The model's loss is a mean over its targets (shifted ones, for a causal LM); weight each
                # batch by that count. A batch without targets would give NaN: every rank skips it alike.
                n = float(sum(e.target_tokens() for e in examples))
                if n == 0:
                    continue
                batch = data.collate(examples, pad_token_id=self.pad_id)
                batch = {k: v.to(self.engine.device) for k, v in batch.items()}
                output = self.engine(**batch)
                if classify:
                    correct += float((output.logits.argmax(-1) == batch["labels"]).sum())
                total_loss += float(output.loss) * n
                weight += n
        self.engine.train()
        eval_loss = total_loss / max(weight, 1.0)
        accuracy = correct / len(self.data.validation) if classify else None
        event: Event = {"event": "eval", "step": step, "eval_loss": round(eval_loss, 6)}
        if accuracy is not None:
            event["eval_accuracy"] = round(accuracy, 6)
        self.emit({**event, "epoch": round(step / self.per_epoch, 4)})
        return eval_loss, accuracy

    def checkpoint(self, checkpoint_dir: Path, step: int, sha256: str) -> str:
        epoch, in_epoch = divmod(step, self.per_epoch)
        client_state = {
            "step": step,
            "epoch": epoch,
            "step_in_epoch": in_epoch,
            "examples_seen": step * self.hp.gradient_accumulation_steps * self.hp.batch_size * self.world_size,
            "data_sha256": sha256,
            "rng": {"python": random.getstate(), "torch": torch.get_rng_state()},
        }
        tag = ds.save_checkpoint(self.engine, checkpoint_dir, step, client_state)
        self.emit({"event": "checkpoint", "step": step, "checkpoint": tag})
        return tag
