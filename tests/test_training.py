"""One training stage on the tiny profile: exact resume, NaN stop, numerics switches, saved folder.

The curated tiny run folder is the session fixture ``curated_tiny`` (conftest.py), shared with
``test_distributed.py``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState

from kalm_lib import training
from kalm_lib.batching import Batch, batch_plan, make_batch, negatives_per_query
from kalm_lib.config import Profile, TrainConfig, load_profile
from kalm_lib.curation import load_train_sets
from kalm_lib.encoder import Encoder, encoder_from_checkpoint, load_encoder
from kalm_lib.layout import RunLayout, StageLayout
from kalm_lib.pipeline import open_run
from kalm_lib.training import TrainSets, batch_loss, build_loss, make_accelerator, mixing_generator, step_chunks, train_stage

TEXTS = ["a bank lends money", "the bank of the river was steep", "run", "to move fast on foot"]


@pytest.fixture(scope="module")
def curated(curated_tiny: Path) -> tuple[Profile, Path]:
    profile, _ = open_run("tiny", curated_tiny)
    return profile, curated_tiny


@pytest.fixture(scope="module")
def finetune_sets(curated: tuple[Profile, Path]) -> TrainSets:
    return load_train_sets(RunLayout(curated[1]), "finetune")


def fresh_encoder(profile: Profile, **model: object) -> Encoder:
    """The tiny random encoder, always with the same initial weights."""
    torch.manual_seed(1234)
    return load_encoder(dataclasses.replace(profile.model, **model))


def parameters_equal(a: torch.nn.Module, b: torch.nn.Module, atol: float = 0.0) -> bool:
    pairs = list(zip(a.state_dict().values(), b.state_dict().values()))
    return len(pairs) > 0 and all(torch.allclose(x, y, rtol=0, atol=atol) if atol else torch.equal(x, y) for x, y in pairs)


def first_batch(sets: TrainSets, cfg: TrainConfig) -> Batch:
    name, rows = batch_plan({n: len(f) for n, (f, _) in sets.items()}, cfg.batch_size, 1, 0)[0]
    frame, card = sets[name]
    return make_batch(frame, card, rows, negatives_per_query(frame, 10**9), 0, 1)


# --- exact resume ------------------------------------------------------------------------------

def test_resume_from_state_is_exact_with_mixing_optimizer_and_scheduler(curated, finetune_sets, tmp_path: Path) -> None:
    profile, _ = curated
    cfg = dataclasses.replace(profile.finetune, steps=6, warmup_ratio=0.5)  # lr still warming up at the cut
    assert cfg.hard_negative_mixing and cfg.focal_gamma > 0

    whole = fresh_encoder(profile)
    full = train_stage(whole, finetune_sets, cfg, tmp_path / "full", seed=5)

    first = train_stage(fresh_encoder(profile), finetune_sets, cfg, tmp_path / "cut", seed=5, stop_after=3)
    cut = StageLayout(tmp_path / "cut")
    state = cut.state(3)
    assert first.final_dir is None and not cut.final.exists()
    assert json.loads(cut.progress(3).read_text())["step"] == 3
    assert {"optimizer.bin", "random_states_0.pkl", "custom_checkpoint_0.pkl"} <= {p.name for p in state.iterdir()}

    resumed_encoder = fresh_encoder(profile)  # a new process would start from the initial weights
    resumed = train_stage(resumed_encoder, finetune_sets, cfg, tmp_path / "cut", seed=5, resume_from=state)

    assert parameters_equal(whole, resumed_encoder)
    assert [h["step"] for h in resumed.history] == list(range(1, 7))
    assert [(h["set"], h["loss"], h["lr"]) for h in resumed.history] == [(h["set"], h["loss"], h["lr"]) for h in full.history]
    assert resumed.final_dir == cut.final and resumed.final_dir.is_dir()


def test_sigterm_saves_a_state_and_the_resume_is_exact(curated, finetune_sets, tmp_path: Path) -> None:
    profile, _ = curated
    cfg = dataclasses.replace(profile.finetune, steps=5, checkpoint_every=0)
    whole = fresh_encoder(profile)
    full = train_stage(whole, finetune_sets, cfg, tmp_path / "full", seed=3)

    def preempt_at_step_2(record: dict) -> None:
        if record["step"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # a cluster preempting the job

    stage = StageLayout(tmp_path / "cut")
    with pytest.raises(training.Preempted, match="after step 2 of 5"):
        train_stage(fresh_encoder(profile), finetune_sets, dataclasses.replace(cfg, log_every=1), stage.root, seed=3,
                    on_log=preempt_at_step_2)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is removed again
    assert training.latest_state(stage) == stage.state(2) and not stage.final.exists()
    resumed_encoder = fresh_encoder(profile)
    resumed = train_stage(resumed_encoder, finetune_sets, cfg, stage.root, seed=3, resume_from=training.latest_state(stage))
    assert parameters_equal(whole, resumed_encoder)
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in full.history]


def test_only_complete_states_are_resumed_from_and_old_ones_are_pruned(curated, finetune_sets, tmp_path: Path) -> None:
    profile, _ = curated
    cfg = dataclasses.replace(profile.finetune, steps=4, checkpoint_every=1, keep_checkpoints=2)
    stage = StageLayout(tmp_path / "stage")
    train_stage(fresh_encoder(profile), finetune_sets, cfg, stage.root, seed=1, stop_after=3)
    assert [p.name for p in training.states(stage)] == ["state_2", "state_3"]  # state_1 pruned
    # A save killed half-way leaves a partial folder, never a state_<step> one; a state folder
    # without its progress file (written last) is not complete either.
    (stage.root / ".state_4.partial").mkdir()
    (stage.root / "state_9").mkdir()
    assert training.latest_state(stage) == stage.state(3)
    training.prune_states(stage, keep=0)
    assert training.latest_state(stage) is None


def test_mixing_draws_from_the_torch_rng_so_resume_must_restore_it(curated) -> None:
    # Why the resume test above is not trivially exact: the synthetic negatives change with the RNG.
    loss_fn = build_loss(curated[0].finetune)
    g = torch.Generator().manual_seed(0)
    q, p, n = (torch.nn.functional.normalize(torch.randn(*shape, generator=g), dim=-1) for shape in ((4, 32), (4, 32), (4, 2, 32)))
    values = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        values.append(loss_fn(q, p, n).item())
    assert values[0] != values[1]


# --- NaN stop ----------------------------------------------------------------------------------

def test_non_finite_loss_stops_naming_the_step(curated, finetune_sets, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    profile, _ = curated
    calls = []
    real = training.batch_loss

    def nan_on_second_step(*args, **kwargs):
        calls.append(1)
        loss = real(*args, **kwargs)
        return loss * float("nan") if len(calls) == 2 else loss

    monkeypatch.setattr(training, "batch_loss", nan_on_second_step)
    with pytest.raises(FloatingPointError, match="at step 2 "):
        train_stage(fresh_encoder(profile), finetune_sets, profile.finetune, tmp_path, seed=0)
    assert not StageLayout(tmp_path).final.exists()


def test_non_finite_gradient_norm_with_a_finite_loss_stops(curated, finetune_sets, tmp_path: Path) -> None:
    profile, _ = curated
    encoder = fresh_encoder(profile)
    encoder.backbone.layers[0].mlp.down_proj.weight.register_hook(lambda grad: grad * float("inf"))
    with pytest.raises(FloatingPointError, match="non-finite gradient norm .* at step 1 .*loss"):
        train_stage(encoder, finetune_sets, profile.finetune, tmp_path, seed=0)
    assert not StageLayout(tmp_path).final.exists()


def test_absurd_temperature_stops_at_the_first_step(curated, finetune_sets, tmp_path: Path) -> None:
    profile, _ = curated
    cfg = dataclasses.replace(profile.finetune, temperature=1e-45)  # logits overflow to inf
    with pytest.raises(FloatingPointError, match="non-finite loss .* at step 1 "):
        train_stage(fresh_encoder(profile), finetune_sets, cfg, tmp_path, seed=0)
    assert not StageLayout(tmp_path).final.exists()


# --- gradient checkpointing and bf16 switches --------------------------------------------------

def test_gradient_checkpointing_gives_the_same_loss_and_gradients(curated, finetune_sets) -> None:
    profile, _ = curated
    batch = first_batch(finetune_sets, profile.finetune)
    results = {}
    for checkpointing in (False, True):
        encoder = fresh_encoder(profile, gradient_checkpointing=checkpointing)
        layer_calls = []
        encoder.backbone.layers[0].self_attn.register_forward_hook(lambda *_, calls=layer_calls: calls.append(1))
        encoder.train()
        torch.manual_seed(0)  # same mixing draws
        chunks = step_chunks(encoder, batch, profile.finetune)
        loss = batch_loss(encoder, batch, chunks, build_loss(profile.finetune))
        loss.backward()
        results[checkpointing] = (loss.detach(), [p.grad.clone() for p in encoder.parameters()], len(layer_calls))
    (loss_plain, grads_plain, calls_plain), (loss_ckpt, grads_ckpt, calls_ckpt) = results[False], results[True]
    # one forward per chunk; checkpointing re-runs each in backward
    assert calls_plain == len(chunks) and calls_ckpt == 2 * len(chunks)
    torch.testing.assert_close(loss_ckpt, loss_plain, rtol=0, atol=1e-5)
    for plain, ckpt in zip(grads_plain, grads_ckpt):
        torch.testing.assert_close(ckpt, plain, rtol=0, atol=1e-5)


def test_gradient_checkpointing_training_run_on_cpu(curated, finetune_sets, tmp_path: Path) -> None:
    profile, _ = curated
    cfg = dataclasses.replace(profile.finetune, steps=2)
    plain, ckpt = fresh_encoder(profile), fresh_encoder(profile, gradient_checkpointing=True)
    a = train_stage(plain, finetune_sets, cfg, tmp_path / "plain", seed=0)
    b = train_stage(ckpt, finetune_sets, cfg, tmp_path / "ckpt", seed=0)
    assert b.final_dir.is_dir()
    np.testing.assert_allclose([h["loss"] for h in b.history], [h["loss"] for h in a.history], rtol=0, atol=1e-5)
    assert parameters_equal(plain, ckpt, atol=1e-5)


@pytest.fixture
def fresh_accelerator_state() -> Iterator[None]:
    """accelerate keeps one precision per process (AcceleratorState is shared): a test that switches
    it starts and ends with no state, so the tests after it may choose theirs."""
    AcceleratorState._reset_state()
    yield
    AcceleratorState._reset_state()


def test_bf16_autocast_is_real_on_cpu(curated, finetune_sets, tmp_path: Path, fresh_accelerator_state) -> None:
    """model.bf16 asks for bf16 autocast on any device (the CPU rehearsal of the GPU profile runs it):
    the losses stay close to float32's but differ, and the weights stay float32."""
    profile, _ = curated
    assert make_accelerator(False).mixed_precision == "no"
    AcceleratorState._reset_state()
    assert make_accelerator(True).mixed_precision == "bf16"
    cfg = dataclasses.replace(profile.finetune, steps=2)
    runs = {}
    for bf16 in (False, True):
        AcceleratorState._reset_state()
        model = dataclasses.replace(profile.model, bf16=bf16)
        torch.manual_seed(1234)
        encoder = load_encoder(model)
        runs[bf16] = (encoder, train_stage(encoder, finetune_sets, cfg, tmp_path / str(bf16), seed=0, bf16=model.bf16))
    losses = {bf16: [h["loss"] for h in result.history] for bf16, (_, result) in runs.items()}
    assert losses[True] != losses[False]
    np.testing.assert_allclose(losses[True], losses[False], rtol=0.05)
    assert {p.dtype for p in runs[True][0].parameters()} == {torch.float32}


def test_bf16_checkpoint_trains_float32_master_weights(curated, finetune_sets, tmp_path: Path) -> None:
    """Bug: a bf16 checkpoint (Qwen2-0.5B's dtype; here the rehearsal's stand-in) was trained in bf16,
    AdamW updating bf16 weights: at the paper's learning rates an update is far below half a bf16
    step of most weights, so they never moved (every stage scored like the base model)."""
    profile, _ = curated
    rehearsal = load_profile("gpu-rehearsal").model
    encoder = load_encoder(dataclasses.replace(rehearsal, gradient_checkpointing=False))
    before = {name: p.detach().float().clone() for name, p in encoder.named_parameters()}
    cfg = dataclasses.replace(profile.finetune, steps=2, learning_rate=1e-5, warmup_ratio=0.0, matryoshka_dims=[], matryoshka_weights=[])
    train_stage(encoder, finetune_sets, cfg, tmp_path, seed=0)
    assert {p.dtype for p in encoder.parameters()} == {torch.float32}
    moved = sum(int((p.detach() != before[name]).sum()) for name, p in encoder.named_parameters())
    assert moved / sum(p.numel() for p in encoder.parameters()) > 0.9


# --- the saved folder --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(curated, finetune_sets, tmp_path_factory: pytest.TempPathFactory) -> tuple[Encoder, Path]:
    profile, _ = curated
    encoder = fresh_encoder(profile)
    out = tmp_path_factory.mktemp("trained")
    result = train_stage(encoder, finetune_sets, dataclasses.replace(profile.finetune, steps=2), out, seed=0)
    return encoder, result.final_dir


def test_final_folder_loads_with_sentence_transformers(curated, trained) -> None:
    from sentence_transformers import SentenceTransformer

    encoder, final = trained
    model = SentenceTransformer(str(final), device="cpu")
    embeddings = model.encode(TEXTS)
    assert embeddings.shape == (len(TEXTS), encoder.backbone.config.hidden_size)
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)
    # Embedding equality with sentence-transformers is tested on the real MiniLM (test_encoder):
    # AutoTokenizer swaps this tiny qwen2 checkpoint's WordPiece tokenizer for Qwen2Tokenizer.


def test_final_folder_reloads_the_trained_weights(curated, trained) -> None:
    encoder, final = trained
    reloaded = encoder_from_checkpoint(final, curated[0].model)
    assert parameters_equal(encoder.backbone, reloaded.backbone)
    encoder.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded.embed(TEXTS), encoder.embed(TEXTS), rtol=0, atol=1e-6)


def test_final_folder_tokenizes_like_the_trained_encoder(curated, trained) -> None:
    encoder, final = trained
    reloaded = encoder_from_checkpoint(final, curated[0].model)
    assert reloaded.token_ids(TEXTS) == encoder.token_ids(TEXTS)


def test_mixing_generator_depends_on_seed_and_step_only() -> None:
    # Reproducible from (seed, step), so processes and resumed runs agree; new draws at every step.
    draws = {(seed, step): torch.rand(4, generator=mixing_generator(seed, step)) for seed in (0, 1) for step in (0, 1)}
    assert torch.equal(torch.rand(4, generator=mixing_generator(0, 1)), draws[0, 1])
    assert len({tuple(d.tolist()) for d in draws.values()}) == len(draws)
