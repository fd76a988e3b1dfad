"""Several CPU processes (gloo) train exactly like one process with the same global batch.

* ``gather_with_grad`` inside :class:`KalmContrastiveLoss`: two spawned processes, each holding half
  of a batch of random embeddings, get W x the gradients of the single-process big-batch loss
  (the mean of the local losses is the big-batch loss; DDP then averages the parameter gradients).
* The ``train`` command under ``accelerate launch`` with 2 processes and in 1 process, on copies of
  the same curated folder: same stage-1 weights and loss history. Stage 1 has no mixing RNG and the
  tiny Qwen2 no dropout, so only float rounding differs.
* The ``mine`` stage under ``accelerate launch`` with 2 processes and in 1: the same mined sets.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from safetensors.torch import load_file

from kalm_lib.config import load_profile
from kalm_lib.layout import RunLayout
from kalm_lib.losses import KalmContrastiveLoss  # light: the spawned workers import this module

WORLD, LOCAL, NEGATIVES, DIM = 2, 3, 2, 8
TIMEOUT = 180

pytestmark = pytest.mark.slow  # papermill, multi-process or benchmark runs: `pytest -m "not slow"` skips them


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- gather_with_grad --------------------------------------------------------------------------

def embeddings() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Global batch of unit-norm queries, positives and hard negatives (same on every process)."""
    g = torch.Generator().manual_seed(0)
    shapes = ((WORLD * LOCAL, DIM), (WORLD * LOCAL, DIM), (WORLD * LOCAL, NEGATIVES, DIM))
    return tuple(F.normalize(torch.randn(*shape, generator=g), dim=-1) for shape in shapes)


def loss_and_grads(q: torch.Tensor, p: torch.Tensor, n: torch.Tensor, in_batch: bool) -> tuple[float, list[torch.Tensor]]:
    leaves = [t.clone().requires_grad_() for t in (q, p, n)]
    loss = KalmContrastiveLoss(0.05, focal_gamma=1.0)(*leaves, in_batch_negatives=in_batch)
    loss.backward()
    return loss.item(), [t.grad for t in leaves]


def _worker(rank: int, store: str, results) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        shard = [t[rank * LOCAL : (rank + 1) * LOCAL] for t in embeddings()]
        results.put((rank, {in_batch: loss_and_grads(*shard, in_batch) for in_batch in (True, False)}))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_gather_with_grad_gives_big_batch_gradients(tmp_path: Path) -> None:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    # A file store rendezvous: no TCP port that another process could take in between.
    procs = [ctx.Process(target=_worker, args=(rank, str(tmp_path / "store"), results)) for rank in range(WORLD)]
    for proc in procs:
        proc.start()
    try:
        local = [r for _, r in sorted((results.get(timeout=TIMEOUT) for _ in procs), key=lambda r: r[0])]
    finally:
        for proc in procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
    assert all(proc.exitcode == 0 for proc in procs)
    for in_batch in (True, False):
        loss, grads = loss_and_grads(*embeddings(), in_batch)
        assert sum(r[in_batch][0] for r in local) / WORLD == pytest.approx(loss, abs=1e-6)
        for index, single in enumerate(grads):
            gathered = torch.cat([r[in_batch][1][index] for r in local])
            assert gathered.abs().sum() > 0
            torch.testing.assert_close(gathered / WORLD, single, rtol=0, atol=1e-6)


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


def accelerate_launch(processes: int) -> list[str]:
    """``accelerate launch`` of ``processes`` local processes. --multi_gpu picks accelerate's torchrun
    launcher; without CUDA every process is a gloo CPU process (`--cpu` would start a single one)."""
    return [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
    ]


@pytest.fixture(scope="module")
def stage1_runs(tmp_path_factory: pytest.TempPathFactory, curated_tiny: Path) -> dict[int, tuple[Path, str]]:
    """Run folder and stdout of ``train --stage pretrain`` with 2 processes and with 1."""
    train = ["-m", "kalm_lib", "train", "--profile", "tiny", "--stage", "pretrain"]
    folders = {}
    for processes in (2, 1):
        folders[processes] = tmp_path_factory.mktemp(f"procs{processes}")
        shutil.copytree(RunLayout(curated_tiny).data, RunLayout(folders[processes]).data)
    outputs = run_clis([
        [*accelerate_launch(2), *train, "--run-dir", str(folders[2])],
        [sys.executable, *train, "--run-dir", str(folders[1])],
    ])
    return {2: (folders[2], outputs[0]), 1: (folders[1], outputs[1])}


def test_two_processes_train_like_one(stage1_runs) -> None:
    (multi, multi_out), (single, single_out) = stage1_runs[2], stage1_runs[1]
    a = load_file(RunLayout(multi).stage1.final / "model.safetensors")
    b = load_file(RunLayout(single).stage1.final / "model.safetensors")
    assert a.keys() == b.keys()
    history = {n: json.loads(RunLayout(run).history("stage1").read_text()) for n, run in ((2, multi), (1, single))}
    assert [h["set"] for h in history[2]] == [h["set"] for h in history[1]]
    assert [h["loss"] for h in history[2]] == pytest.approx([h["loss"] for h in history[1]], abs=1e-5)
    assert [h["grad_norm"] for h in history[2]] == pytest.approx([h["grad_norm"] for h in history[1]], rel=1e-5)
    # Adam moves a parameter by up to ~lr per step whatever its gradient's size, so an entry whose
    # gradient is at float-rounding level (a rarely seen token) may differ by the summation order of
    # the two set-ups; everything else must agree to 1e-5.
    steps, lr = len(history[1]), load_profile("tiny").pretrain.learning_rate
    close = total = 0
    for key in a:
        diff = (a[key] - b[key]).abs()
        assert float(diff.max()) <= 2 * lr * steps, key
        close += int((diff <= 1e-5).sum())
        total += diff.numel()
    assert close / total > 0.99999
    assert multi_out.count("pretrain complete:") == 1 == single_out.count("pretrain complete:")  # main process only


def test_two_processes_mine_like_one(stage1_runs, tmp_path: Path) -> None:
    # Each process encodes and ranks a share of the rows, the shares are gathered, the main
    # process writes: the same mined shards and cards (SHA-256 included) as one process.
    runs = {processes: tmp_path / f"mine{processes}" for processes in (2, 1)}
    for run in runs.values():
        shutil.copytree(stage1_runs[1][0], run)
        shutil.rmtree(RunLayout(run).mined_shard("any").parent, ignore_errors=True)
    mine = ["-m", "kalm_lib", "train", "--profile", "tiny", "--stage", "mine"]
    run_clis([[*accelerate_launch(2), *mine, "--run-dir", str(runs[2])], [sys.executable, *mine, "--run-dir", str(runs[1])]])
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
