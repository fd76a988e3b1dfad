"""Several CPU processes (gloo) train exactly like one process with the same global batch.

* ``gather_with_grad`` inside :class:`KalmContrastiveLoss`: two spawned processes, each holding half
  of a batch of random embeddings, get W x the gradients of the single-process big-batch loss
  (the mean of the local losses is the big-batch loss; DDP then averages the parameter gradients),
  with the focal weight, Matryoshka, repeated-text keys and hard-negative mixing (same draws and
  same k per global row).
* The ``train`` command under ``accelerate launch`` with 2 processes and in 1 process, on copies of
  the same curated folder: same stage-1 weights and loss history; same stage-2 weights and loss
  history with GradCache, mined hard negatives, focal weight, mixing and Matryoshka (from the same
  stage-1 model), also when the 2-process stage 2 is killed after its first state and resumed.
  The tiny Qwen2 has no dropout, so only float rounding differs.
* The ``mine`` stage under ``accelerate launch`` with 2 processes and in 1: the same mined sets.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from spawned_ranks import gloo_group, run_ranks

from kalm_lib.config import load_profile
from kalm_lib.hard_negative_mixing import MixingConfig
from kalm_lib.layout import RunLayout, StageLayout
from kalm_lib.losses import KalmContrastiveLoss, MatryoshkaLoss, StackedLoss, TextKeys  # light: the spawned workers import this module

WORLD, LOCAL, NEGATIVES, DIM = 2, 3, 2, 8
TIMEOUT = 180

pytestmark = pytest.mark.slow  # papermill, multi-process or benchmark runs: `pytest -m "not slow"` skips them


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- gather_with_grad --------------------------------------------------------------------------

def embeddings() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Global batch of unit-norm queries, positives and hard negatives (same on every process);
    row 0's two negatives are one text (one key, one vector), so its row alone has a single
    distinct hard negative to mix from."""
    g = torch.Generator().manual_seed(0)
    shapes = ((WORLD * LOCAL, DIM), (WORLD * LOCAL, DIM), (WORLD * LOCAL, NEGATIVES, DIM))
    q, p, n = (F.normalize(torch.randn(*shape, generator=g), dim=-1) for shape in shapes)
    n[0, 1] = n[0, 0]
    return q, p, n


def text_keys() -> TextKeys:
    """Keys of :func:`embeddings`' texts: all distinct but row 0's two negatives."""
    negatives = 1000 + torch.arange(WORLD * LOCAL * NEGATIVES).reshape(WORLD * LOCAL, NEGATIVES)
    negatives[0, 1] = negatives[0, 0]
    return TextKeys(torch.arange(WORLD * LOCAL), negatives)


def make_loss(case: str) -> StackedLoss:
    """``focal``: focal InfoNCE. ``mixing``: Matryoshka over focal InfoNCE with hard-negative mixing
    (top_k above the candidates a row has, so k is set by the row with the fewest), a fresh
    generator of seed 0 on every process."""
    if case == "focal":
        return KalmContrastiveLoss(0.05, focal_gamma=1.0)
    mixing = MixingConfig(top_k=16, pairs=2, query_mixes=1)
    return MatryoshkaLoss(KalmContrastiveLoss(0.05, 1.0, mixing, torch.Generator().manual_seed(0)), [DIM, DIM // 2], [1.0, 0.3])


CASES = [(case, in_batch) for case in ("focal", "mixing") for in_batch in (True, False)]


def loss_and_grads(case: str, in_batch: bool, rows: slice = slice(None)) -> tuple[float, list[np.ndarray]]:
    """Loss of the ``rows`` of the global batch and the gradients of its embeddings (numpy arrays:
    they cross the process boundary by value)."""
    leaves = [t[rows].clone().requires_grad_() for t in embeddings()]
    keys = text_keys()
    loss = make_loss(case)(*leaves, in_batch_negatives=in_batch, keys=TextKeys(keys.positives[rows], keys.negatives[rows]))
    loss.backward()
    return loss.item(), [t.grad.numpy() for t in leaves]


def _worker(rank: int, store: str, results) -> None:
    with gloo_group(rank, store, WORLD):
        shard = slice(rank * LOCAL, (rank + 1) * LOCAL)
        results.put((rank, {case: loss_and_grads(*case, shard) for case in CASES}))


def test_gather_with_grad_gives_big_batch_gradients(tmp_path: Path) -> None:
    """Cross-device negatives, focal weight, Matryoshka and hard-negative mixing (the same draws
    and the same k for a global row however the batch is split): 2 processes = 1 process."""
    local = run_ranks(_worker, tmp_path / "store", WORLD, TIMEOUT)
    for case in CASES:
        loss, grads = loss_and_grads(*case)
        assert sum(r[case][0] for r in local) / WORLD == pytest.approx(loss, abs=1e-6), case
        for index, single in enumerate(grads):
            gathered = np.concatenate([r[case][1][index] for r in local])
            assert np.abs(gathered).sum() > 0
            np.testing.assert_allclose(gathered / WORLD, single, rtol=1e-5, atol=1e-6, err_msg=str(case))


# --- the train command on 2 processes vs 1 -----------------------------------------------------

def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "",
        "PYTHONWARNINGS": "ignore",
    })
    return env


def run_clis(commands: list[list[str]]) -> list[str]:
    """Run the commands side by side; their stdout, or a failure with the failing one's output."""
    procs = [subprocess.Popen(cmd, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for cmd in commands]
    outputs = []
    try:
        for cmd, proc in zip(commands, procs):
            out, err = proc.communicate(timeout=TIMEOUT)
            assert proc.returncode == 0, f"{' '.join(cmd)}\n{out[-3000:]}\n{err[-6000:]}"
            outputs.append(out)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return outputs


def launch(processes: int) -> list[str]:
    """The command prefix that starts ``python -m kalm_lib`` on ``processes`` CPU processes."""
    if processes == 1:
        return [sys.executable]
    # --multi_gpu picks accelerate's torchrun launcher; without CUDA every process is a gloo CPU
    # process (`--cpu` would start a single process).
    return [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
    ]


def assert_same_training(multi: Path, single: Path, label: str, stage: Callable[[Path], StageLayout], learning_rate: float) -> None:
    """Same loss and gradient-norm history (``label``) and, but for float-rounding-level entries,
    the same final weights (``stage`` of the run folder) in the 2-process and 1-process runs."""
    history = {n: json.loads(RunLayout(run).history(label).read_text()) for n, run in ((2, multi), (1, single))}
    assert [h["set"] for h in history[2]] == [h["set"] for h in history[1]]
    assert [h["loss"] for h in history[2]] == pytest.approx([h["loss"] for h in history[1]], abs=1e-5)
    assert [h["grad_norm"] for h in history[2]] == pytest.approx([h["grad_norm"] for h in history[1]], rel=1e-5)
    a, b = (load_file(stage.final / "model.safetensors") for stage in (stage(multi), stage(single)))
    assert a.keys() == b.keys()
    # Adam moves a parameter by up to ~lr per step whatever its gradient's size, so an entry whose
    # gradient is at float-rounding level (a rarely seen token) may differ by the summation order of
    # the two set-ups; everything else must agree to 1e-5.
    steps = len(history[1])
    close = total = 0
    for key in a:
        diff = (a[key] - b[key]).abs()
        assert float(diff.max()) <= 2 * learning_rate * steps, key
        close += int((diff <= 1e-5).sum())
        total += diff.numel()
    assert close / total > 0.99999


@pytest.fixture(scope="module")
def stage1_runs(tmp_path_factory: pytest.TempPathFactory, curated_tiny: Path) -> dict[int, tuple[Path, str]]:
    """Run folder and stdout of ``train --stage pretrain`` with 2 processes and with 1."""
    train = ["-m", "kalm_lib", "train", "--profile", "tiny", "--stage", "pretrain"]
    folders = {}
    for processes in (2, 1):
        folders[processes] = tmp_path_factory.mktemp(f"procs{processes}")
        shutil.copytree(RunLayout(curated_tiny).data, RunLayout(folders[processes]).data)
    outputs = run_clis([[*launch(processes), *train, "--run-dir", str(folders[processes])] for processes in (2, 1)])
    return {2: (folders[2], outputs[0]), 1: (folders[1], outputs[1])}


def test_two_processes_train_like_one(stage1_runs) -> None:
    (multi, multi_out), (single, single_out) = stage1_runs[2], stage1_runs[1]
    assert_same_training(multi, single, "stage1", lambda run: RunLayout(run).stage1, load_profile("tiny").pretrain.learning_rate)
    assert multi_out.count("pretrain complete:") == 1 == single_out.count("pretrain complete:")  # main process only


# Stage 2 with every part of the recipe the tiny profile switches on (2 mined hard negatives per
# query, focal gamma 1, hard-negative mixing, Matryoshka 32/16) and GradCache: chunks of at most
# 2 x 32 padded tokens, far below a process's 16 texts of a step.
FINETUNE = ["--stage", "finetune", "--seed", "0", "--set", "finetune.mini_batch_size=2"]


@pytest.fixture(scope="module")
def stage2_runs(tmp_path_factory: pytest.TempPathFactory, curated_tiny: Path, stage1_runs) -> dict[int, tuple[Path, str]]:
    """Run folder and stdout of ``train --stage finetune`` (GradCache) with 2 processes and with 1,
    both from the same stage-1 model (the single process's)."""
    train = ["-m", "kalm_lib", "train", "--profile", "tiny", *FINETUNE]
    folders = {}
    for processes in (2, 1):
        folders[processes] = tmp_path_factory.mktemp(f"stage2-procs{processes}")
        shutil.copytree(RunLayout(curated_tiny).data, RunLayout(folders[processes]).data)
        shutil.copytree(RunLayout(stage1_runs[1][0]).stage1.final, RunLayout(folders[processes]).stage1.final)
    outputs = run_clis([[*launch(processes), *train, "--run-dir", str(folders[processes])] for processes in (2, 1)])
    return {2: (folders[2], outputs[0]), 1: (folders[1], outputs[1])}


def test_two_processes_finetune_like_one_with_grad_cache_and_mixing(stage2_runs) -> None:
    (multi, multi_out), (single, single_out) = stage2_runs[2], stage2_runs[1]
    profile = load_profile("tiny")
    assert profile.finetune.hard_negative_mixing and profile.finetune.focal_gamma > 0 and profile.finetune.matryoshka_dims
    assert_same_training(multi, single, "stage2_seed0", lambda run: RunLayout(run).stage2(0), profile.finetune.learning_rate)
    assert multi_out.count("finetune complete:") == 1 == single_out.count("finetune complete:")


def test_two_processes_killed_and_resumed_finetune_like_one(tmp_path: Path, curated_tiny: Path, stage1_runs, stage2_runs) -> None:
    """The data position and mixing draws of a 2-process state: the 2-process stage 2 killed
    (SIGKILL, every process) once its first state is saved, then launched again, ends where the
    uninterrupted single process ends."""
    from benchmarks.fault_injection import kill_tree
    from kalm_lib.training import states

    layout = RunLayout(tmp_path)
    shutil.copytree(RunLayout(curated_tiny).data, layout.data)
    shutil.copytree(RunLayout(stage1_runs[1][0]).stage1.final, layout.stage1.final)
    command = [*launch(2), "-m", "kalm_lib", "train", "--profile", "tiny", *FINETUNE, "--run-dir", str(tmp_path)]
    first = subprocess.Popen(command, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + TIMEOUT
        while not states(layout.stage2(0)) and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        killed = kill_tree(first)
    assert killed and states(layout.stage2(0)) and not layout.stage2(0).final.exists()
    (resumed,) = run_clis([command])
    assert "resuming from state_" in resumed
    assert_same_training(tmp_path, stage2_runs[1][0], "stage2_seed0", lambda run: RunLayout(run).stage2(0),
                         load_profile("tiny").finetune.learning_rate)


def test_two_processes_mine_like_one(stage1_runs, tmp_path: Path) -> None:
    # Each process encodes and ranks a share of the rows, the shares are gathered, the main
    # process writes: the same mined shards and cards (SHA-256 included) as one process.
    runs = {processes: tmp_path / f"mine{processes}" for processes in (2, 1)}
    for run in runs.values():
        shutil.copytree(stage1_runs[1][0], run)
        shutil.rmtree(RunLayout(run).mined_shard("any").parent, ignore_errors=True)
    mine = ["-m", "kalm_lib", "train", "--profile", "tiny", "--stage", "mine"]
    run_clis([[*launch(2), *mine, "--run-dir", str(runs[2])], [sys.executable, *mine, "--run-dir", str(runs[1])]])
    shards = {n: sorted(RunLayout(run).mined_shard("any").parent.glob("*.parquet")) for n, run in runs.items()}
    assert shards[1] and [p.name for p in shards[2]] == [p.name for p in shards[1]]
    for multi, single in zip(shards[2], shards[1]):
        pd.testing.assert_frame_equal(pd.read_parquet(multi), pd.read_parquet(single))
        assert RunLayout(runs[2]).card(multi.stem).read_text() == RunLayout(runs[1]).card(single.stem).read_text()


def test_train_command_finetunes_one_seed(stage1_runs) -> None:
    from kalm_lib.__main__ import main

    run = stage1_runs[1][0]
    assert main(["train", "--profile", "tiny", "--run-dir", str(run), "--stage", "mine"]) == 0
    code = main(["train", "--profile", "tiny", "--run-dir", str(run), "--stage", "finetune", "--seed", "1", "--set", "finetune.steps=2"])
    assert code == 0
    layout = RunLayout(run)
    assert layout.stage2_finals() == [layout.stage2(1).final]
    assert (layout.stage2(1).final / "modules.json").is_file()
    history = json.loads(layout.history("stage2_seed1").read_text())
    assert [h["step"] for h in history] == [1, 2]


def test_train_command_needs_curated_data_and_stage1(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from kalm_lib.__main__ import main

    assert main(["train", "--profile", "tiny", "--run-dir", str(tmp_path), "--stage", "pretrain"]) == 2
    assert "curate first" in capsys.readouterr().err
    RunLayout(tmp_path).data.mkdir()
    assert main(["train", "--profile", "tiny", "--run-dir", str(tmp_path), "--stage", "finetune"]) == 2
    assert "run --stage pretrain first" in capsys.readouterr().err
    assert main(["train", "--profile", "tiny", "--run-dir", str(tmp_path), "--stage", "pretrain", "--set", "pretrain.nope=1"]) == 2
    assert "nope" in capsys.readouterr().err
