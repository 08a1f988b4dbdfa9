"""Shared fixtures: tiny random checkpoints built once per session, GPU skip marker."""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except ImportError:
        has_gpu = False
    if has_gpu:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    from frontend.random_model import build_random_checkpoint

    return str(build_random_checkpoint(tmp_path_factory.mktemp("tiny_llama"), "llama"))


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory):
    from frontend.random_model import build_random_checkpoint

    return str(build_random_checkpoint(tmp_path_factory.mktemp("tiny_qwen2"), "qwen2"))


@pytest.fixture(scope="session")
def tiny_llava(tmp_path_factory):
    from frontend.random_model import build_random_llava

    return str(build_random_llava(tmp_path_factory.mktemp("tiny_llava")))


@pytest.fixture(scope="session")
def tiny_qwen2_vl(tmp_path_factory):
    from frontend.random_model import build_random_qwen2_vl

    return str(build_random_qwen2_vl(tmp_path_factory.mktemp("tiny_qwen2_vl")))
