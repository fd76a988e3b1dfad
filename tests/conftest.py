"""Test-wide settings: everything runs offline on the CPU; the suite runs on every core with
pytest-xdist (``-n auto --dist loadgroup`` in pyproject.toml), and :func:`pytest_collection_modifyitems`
keeps tests that share a costly fixture on one worker."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


import pytest  # noqa: E402

SHARED_FIXTURES = ("tiny_grid", "curated_tiny")  # session fixtures worth computing once: minutes each


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Put each test file in one xdist group (its module fixtures are built once) named after the
    first of :data:`SHARED_FIXTURES` any of its tests uses, else after the file, so every test of
    a shared session fixture runs on the same worker; order the groups of shared fixtures first
    (the longest, they start at once and the rest balance around them)."""
    used: dict[str, set[str]] = {}  # test file -> shared fixtures its tests use
    for item in items:
        used.setdefault(item.nodeid.split("::")[0], set()).update(set(SHARED_FIXTURES) & set(item.fixturenames))

    def group(item: pytest.Item) -> str:
        file = item.nodeid.split("::")[0]
        return next((name for name in SHARED_FIXTURES if name in used[file]), file)

    for item in items:
        item.add_marker(pytest.mark.xdist_group(group(item)))
    rank = {name: index for index, name in enumerate(SHARED_FIXTURES)}
    items.sort(key=lambda item: rank.get(group(item), len(rank)))  # stable: file order kept within a rank


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_node_collection_finished(node, ids: list[str]) -> None:
    """Stop if xdist did not put each test's group into its node id (it silently does not on
    pytest 9.2, pytest-xdist#1386): the shared fixtures would be built on every worker."""
    lost = [nodeid for nodeid in ids if "@" not in nodeid.rsplit("::", 1)[-1]]
    if node.config.getvalue("dist") == "loadgroup" and lost:
        reason = f"pytest-xdist did not group {len(lost)} tests (e.g. {lost[0]})"
        pytest.exit(f"{reason}: pin pytest 9.1 (pytest-xdist#1386) or run with -n 0", 4)


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
