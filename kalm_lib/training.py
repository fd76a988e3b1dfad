"""Contrastive training of one stage, on one process or many (accelerate / torch.distributed).

One step: take the planned task-homogeneous global batch, keep this process's shard, embed
queries, positives and hard negatives in length-sorted chunks (:mod:`kalm_lib.chunking`; with
GradCache, chunk by chunk without keeping the graph),
compute :class:`KalmContrastiveLoss` against globally gathered candidates, step AdamW and the
linear warm-up/decay schedule. ``accelerator.save_state`` checkpoints model, optimizer, scheduler
and every RNG; the step counter fixes the data position, so a resumed run is exact.
"""

from __future__ import annotations

import json
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, set_seed
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from .batching import Batch, TrainRows, batch_plan, make_batch, negatives_per_query
from .chunking import Chunk, embed_chunks, plan_chunks
from .config import TrainConfig
from .data_cards import DataCard
from .encoder import Encoder
from .grad_cache import cached_backward
from .hard_negative_mixing import MixingConfig
from .layout import StageLayout
from .losses import KalmContrastiveLoss, MatryoshkaLoss, TextKeys
from .outputs import is_main_process, partial_folder, replace_folder, write_folder, write_output

TrainSets = dict[str, tuple[TrainRows, DataCard]]


@dataclass
class StageResult:
    """What a finished (or interrupted) stage leaves behind."""

    history: list[dict] = field(default_factory=list)
    final_dir: Path | None = None
    seconds: float = 0.0


def make_accelerator(bf16: bool) -> Accelerator:
    """Accelerator for this host: bf16 autocast when asked, on CUDA or CPU (``torch.autocast``
    supports bfloat16 on both; the CPU rehearsal of the GPU profile runs the same mixed precision).

    DDP does not broadcast buffers at each forward: processes cut their shards into different
    numbers of length-sorted chunks, so per-forward collectives would not pair up (a hang), and
    the backbones' buffers (position ids, rotary frequencies) are constants anyway.
    """
    precision = "bf16" if bf16 else "no"
    ddp = DistributedDataParallelKwargs(broadcast_buffers=False)
    return Accelerator(mixed_precision=precision, cpu=not torch.cuda.is_available(), kwargs_handlers=[ddp])


def mixing_generator(seed: int, step: int) -> torch.Generator:
    """CPU generator for the hard-negative mixing draws of step ``step`` (0-based), a function of
    ``(seed, step)`` only: every process draws for every global row what one process would
    (:func:`kalm_lib.hard_negative_mixing.synthesise`), and a resumed run what an uninterrupted one draws."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, step]).generate_state(1)[0]))


def build_loss(cfg: TrainConfig, generator: torch.Generator | None = None) -> KalmContrastiveLoss | MatryoshkaLoss:
    """The stage's loss from its config (mixing and Matryoshka only when switched on); ``generator``
    feeds the mixing draws (None: the global RNG)."""
    mixing = (
        MixingConfig(
            top_k=cfg.mixing_top_k, pairs=cfg.mixing_pairs, query_mixes=cfg.mixing_query, beta_max=cfg.mixing_query_beta_max
        )
        if cfg.hard_negative_mixing
        else None
    )
    loss = KalmContrastiveLoss(cfg.temperature, cfg.focal_gamma, mixing, generator)
    return MatryoshkaLoss(loss, cfg.matryoshka_dims, cfg.matryoshka_weights) if cfg.matryoshka_dims else loss


def step_chunks(encoder: Encoder, batch: Batch, cfg: TrainConfig) -> list[Chunk]:
    """The batch's texts cut into length-sorted forward passes. With GradCache a chunk holds at
    most the padded tokens of ``mini_batch_size`` full-length texts; without, ``chunk_tokens``."""
    budget = cfg.mini_batch_size * encoder.max_length if cfg.mini_batch_size else cfg.chunk_tokens
    return plan_chunks(encoder, batch.texts, budget)


def batch_loss(model: torch.nn.Module, batch: Batch, chunks: list[Chunk], loss_fn: KalmContrastiveLoss | MatryoshkaLoss) -> torch.Tensor:
    """Loss of one batch from its chunks, graph kept."""
    return stacked_loss(batch, loss_fn)(embed_chunks(model, chunks))


def stacked_loss(batch: Batch, loss_fn: KalmContrastiveLoss | MatryoshkaLoss) -> Callable[[torch.Tensor], torch.Tensor]:
    """The loss as a function of the embeddings of ``batch.texts`` (with the texts' keys, so a
    candidate equal to a row's positive is never its negative)."""
    def loss(embeddings: torch.Tensor) -> torch.Tensor:
        keys = TextKeys(
            torch.tensor(batch.positive_keys, dtype=torch.long, device=embeddings.device),
            torch.tensor(batch.negative_keys, dtype=torch.long, device=embeddings.device).reshape(
                len(batch.queries), batch.negatives_per_query
            ),
        )
        return loss_fn.from_stacked(embeddings, len(batch.queries), batch.negatives_per_query, batch.in_batch_negatives, keys)

    return loss


class Preempted(RuntimeError):
    """The stage received SIGTERM (e.g. a cluster preempting the job) and saved a resumable state."""


@contextmanager
def sigterm_flag() -> Iterator[list[bool]]:
    """While open, SIGTERM sets ``flag[0] = True`` instead of killing the process, so the training
    loop can finish its step, save a state and stop (only where signals can be handled: the main
    thread; elsewhere the flag never rises and SIGTERM keeps its default)."""
    flag = [False]
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum: int, frame: object) -> None:
        flag[0] = True

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGTERM, previous)


def states(stage: StageLayout) -> list[Path]:
    """The stage's complete resumable states, oldest first. A state folder appears under its name
    only once written in full (:func:`_save_progress`), so a crash mid-save leaves none behind."""
    found = [path for path in stage.root.glob("state_*") if path.name.removeprefix("state_").isdigit()]
    return sorted((path for path in found if (path / StageLayout.PROGRESS).is_file()), key=lambda p: int(p.name[6:]))


def latest_state(stage: StageLayout) -> Path | None:
    """The newest complete state of the stage, or None (start from step 0)."""
    found = states(stage)
    return found[-1] if found else None


def prune_states(stage: StageLayout, keep: int) -> None:
    """Delete all but the ``keep`` newest states (main process)."""
    if is_main_process():
        for path in states(stage)[: max(len(states(stage)) - keep, 0)]:
            shutil.rmtree(path)


def _save_progress(stage: StageLayout, accelerator: Accelerator, step: int, history: list[dict], keep: int) -> Path:
    """Checkpoint everything needed for an exact resume (model, optimizer, scheduler, every
    process's RNG, step and history) into a partial folder, rename it ``state_<step>`` once
    complete, and keep the ``keep`` newest states."""
    target = stage.state(step)
    partial = partial_folder(target)
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_output({"step": step, "history": history}, partial / StageLayout.PROGRESS)
        replace_folder(partial, target)
        prune_states(stage, keep)
    accelerator.wait_for_everyone()
    return target


def _any_process(accelerator: Accelerator, flag: bool) -> bool:
    """True on every process when ``flag`` is True on any (all then save the same state together)."""
    return bool(accelerator.reduce(torch.tensor(float(flag), device=accelerator.device), reduction="sum").item() > 0)


def train_stage(
    encoder: Encoder,
    sets: TrainSets,
    cfg: TrainConfig,
    out_dir: Path,
    seed: int,
    bf16: bool = False,
    resume_from: Path | None = None,
    stop_after: int | None = None,
    on_log: Callable[[dict], None] | None = None,
) -> StageResult:
    """Train ``encoder`` for ``cfg.steps`` steps; save ``out_dir/final`` as a sentence-transformers folder.

    ``resume_from`` is a ``state_*`` folder written by an earlier call (:func:`latest_state`);
    ``stop_after`` ends the run early after that many steps (used to test exact resume). On
    SIGTERM the current step completes, a state is saved and :class:`Preempted` is raised. The
    update clips the global gradient norm to ``cfg.grad_clip``. The weights are trained (and saved)
    in the encoder's float32 (:func:`kalm_lib.encoder.load_backbone` loads every checkpoint so);
    ``bf16`` autocasts the forward passes. ``out_dir`` is laid out as
    :class:`kalm_lib.layout.StageLayout` says; its states are kept until the caller has recorded
    the history (:func:`prune_states` with ``keep=0``).
    """
    stage = StageLayout(out_dir)
    set_seed(seed)
    accelerator = make_accelerator(bf16)
    optimizer = torch.optim.AdamW(encoder.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay, fused=True)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(cfg.warmup_ratio * cfg.steps), cfg.steps)
    model, optimizer = accelerator.prepare(encoder, optimizer)
    accelerator.register_for_checkpointing(scheduler)
    plan = batch_plan({name: len(frame) for name, (frame, _) in sets.items()}, cfg.batch_size, cfg.steps, seed)
    n_neg = {name: negatives_per_query(frame, 10**9) for name, (frame, _) in sets.items()}
    start, history = 0, []
    if resume_from is not None:
        accelerator.load_state(str(resume_from))
        progress = json.loads((resume_from / StageLayout.PROGRESS).read_text())
        start, history = progress["step"], progress["history"]
    result = StageResult(history=history)
    began = time.perf_counter()
    model.train()
    last = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
    bar = tqdm(range(start, last), desc="train", disable=not accelerator.is_main_process, mininterval=5)
    with sigterm_flag() as terminated:
        for step in bar:
            name, rows = plan[step]
            frame, card = sets[name]
            batch = make_batch(frame, card, rows, n_neg[name], accelerator.process_index, accelerator.num_processes)
            chunks = step_chunks(encoder, batch, cfg)
            loss_fn = build_loss(cfg, mixing_generator(seed, step))
            if cfg.mini_batch_size:
                loss = cached_backward(model, chunks, stacked_loss(batch, loss_fn), accelerator)
            else:
                loss = batch_loss(model, batch, chunks, loss_fn)
                accelerator.backward(loss)
            # Each process holds the loss of its shard; their mean is the global batch's loss (equal
            # shards). Every process logs and checks that value, so all stop together on a NaN.
            loss = accelerator.reduce(loss.detach(), reduction="mean")
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite loss {loss.item()} at step {step + 1} (set {name}); stopping")
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            if not torch.isfinite(torch.as_tensor(grad_norm)):  # DDP gradients are all-reduced: every process agrees
                raise FloatingPointError(
                    f"non-finite gradient norm {float(grad_norm)} at step {step + 1} (set {name}, loss {loss.item():.4g}); stopping"
                )
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            record = {"step": step + 1, "set": name, "loss": loss.item(), "grad_norm": float(grad_norm), "lr": scheduler.get_last_lr()[0]}
            history.append(record)
            if on_log and (step + 1) % max(cfg.log_every, 1) == 0:
                on_log(record)
            if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0:
                _save_progress(stage, accelerator, step + 1, history, cfg.keep_checkpoints)
            if _any_process(accelerator, terminated[0]):
                state = _save_progress(stage, accelerator, step + 1, history, cfg.keep_checkpoints)
                raise Preempted(f"SIGTERM after step {step + 1} of {cfg.steps}: resumable state saved in {state}")
    if stop_after is not None and last < cfg.steps:
        _save_progress(stage, accelerator, last, history, cfg.keep_checkpoints)
    else:
        result.final_dir = stage.final
        write_folder(stage.final, accelerator.unwrap_model(model).save)
    accelerator.wait_for_everyone()
    result.seconds = time.perf_counter() - began
    return result
