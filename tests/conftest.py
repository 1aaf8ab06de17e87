"""Shared fixtures: a tiny random Qwen2.5-VL and a small synthetic dataset, built once per test session."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")


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
