"""Shared fixtures. The hub is switched off for the whole session, so an accidental hub name fails
instead of downloading."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest
import torch

from tiny import make_model

torch.set_num_threads(1)  # tiny matrices gain nothing from threads; spinning threads only slow a shared machine


@pytest.fixture(scope="session")
def models():
    """Cache of double-precision models keyed by (arch, feature); tests must not modify them."""
    cache: dict = {}

    def get(arch: str, feature: str):
        if (arch, feature) not in cache:
            cache[arch, feature] = make_model(arch, feature)
        return cache[arch, feature]

    return get
