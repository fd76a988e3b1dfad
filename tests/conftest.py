"""Test-wide settings: everything runs offline on the CPU."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_grid(tmp_path_factory):
    """A two-variant ablation grid on the tiny profile: the full series once (reference) and a
    stage-2 variant reusing its curation and stage 1, plus the grid report (about 2 minutes)."""
    from kalm_lib.ablations import load_grid, run_grid

    root = tmp_path_factory.mktemp("grid")
    spec = root / "grid.yaml"
    spec.write_text("profile: tiny\nreference: full\nvariants:\n  full: {}\n  no_focal: {finetune.focal_gamma: 0.0}\n")
    return run_grid(load_grid(spec), root, "tiny-grid")


@pytest.fixture(scope="session")
def tiny_run(tiny_grid):
    """The grid's reference: one complete run of all seven notebooks on the tiny profile."""
    return tiny_grid / "full"


@pytest.fixture(scope="session")
def curated_tiny(tmp_path_factory):
    """A run folder holding the tiny profile's curated data (notebook 00's work) with stage-2
    negatives mined by the base model standing in for stage 1 (notebook 02 with stage 1 off)."""
    import dataclasses
    import shutil

    from kalm_lib.layout import RunLayout
    from kalm_lib.pipeline import open_run, run_curation, run_mining, run_pretraining

    profile, run = open_run("tiny", tmp_path_factory.mktemp("curated-tiny"))
    run_curation(profile, run)
    run_pretraining(dataclasses.replace(profile, pretrain=dataclasses.replace(profile.pretrain, enabled=False)), run)
    run_mining(profile, run)
    shutil.rmtree(RunLayout(run).checkpoints)  # tests train their own stage 1
    return run
