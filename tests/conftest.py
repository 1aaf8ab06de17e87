"""Shared fixtures: a tiny random Qwen2.5-VL and a small synthetic dataset, built once per test session."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

# The files that take minutes, longest first. The test workers (pyproject: `-n 2 --dist loadfile`) take whole files
# in collection order, two queued each, so a long file collected last would leave the other worker idle at the end.
LONG_FIRST = ("test_train.py", "test_demo.py", "test_sft_eval.py", "test_rollout.py", "test_slurm.py", "test_async.py",
              "test_dist_checkpoint.py", "test_faults.py")


def pytest_configure(config):
    if hasattr(config.option, "loadscopereorder"):   # xdist would sort files by their number of tests instead
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(LONG_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))   # stable: each file's own order is kept


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    from megaapo.models.tiny import build_tiny

    return build_tiny(tmp_path_factory.mktemp("tiny") / "model", vocab="small")


@pytest.fixture(scope="session")
def tied_model(tmp_path_factory):
    from megaapo.models.tiny import build_tiny

    return build_tiny(tmp_path_factory.mktemp("tied") / "model", vocab="small", tie_embeddings=True)


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory):
    from megaapo.data.synth import generate

    out = tmp_path_factory.mktemp("synth")
    generate(out, n_train=24, n_eval=6, seed=3, progress=False)
    return out
