"""Packaged models shipped as a zip split over several wheels (all-mpnet-base-v2): unpacked once into the cache."""

from __future__ import annotations

import importlib.metadata
import zipfile

import pytest

from layerexit import resources
from layerexit.errors import LayerExitError


class _FakeDistribution:
    def __init__(self, root):
        self.root = root

    def locate_file(self, path):
        return self.root / path


def test_parts_are_concatenated_unzipped_and_cached(tmp_path, monkeypatch):
    source = tmp_path / "zip"
    source.mkdir()
    with zipfile.ZipFile(source / "whole.zip", "w") as archive:
        archive.writestr("tiny-model/config.json", '{"model_type": "bert"}')
        archive.writestr("tiny-model/tokenizer.json", "{}")
    data = (source / "whole.zip").read_bytes()
    site = tmp_path / "site"
    for index, chunk in enumerate((data[: len(data) // 2], data[len(data) // 2 :]), start=1):
        part = site / f"tiny-part_{index:03d}" / "input" / f"tiny.zip.{index:03d}"
        part.parent.mkdir(parents=True)
        part.write_bytes(chunk)
    monkeypatch.setitem(resources.SPLIT_ARCHIVES, "tiny", ("tiny-part-{:03d}", "tiny-part_{:03d}/input/tiny.zip.{:03d}", 2))
    monkeypatch.setitem(resources.PACKAGED_MODELS, "tiny", ("tiny-part-001", "tiny", "tiny-parts", "a test model"))
    monkeypatch.setattr(importlib.metadata, "distribution", lambda name: _FakeDistribution(site))
    monkeypatch.setenv("LAYEREXIT_CACHE", str(tmp_path / "cache"))
    folder = resources.resolve_model("tiny")
    assert folder == str(tmp_path / "cache" / "tiny")
    assert (tmp_path / "cache" / "tiny" / "config.json").read_text() == '{"model_type": "bert"}'
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["tiny"]  # no temporary folders left behind
    (site / "tiny-part_001").rename(site / "gone")  # once unpacked, the parts are no longer read
    assert resources.resolve_model("tiny") == folder


def test_missing_parts_name_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("LAYEREXIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(resources.SPLIT_ARCHIVES, "all-mpnet-base-v2",
                        ("no-such-distribution-{:03d}", "x_{:03d}/y.{:03d}", 5))
    with pytest.raises(LayerExitError, match=r"model='all-mpnet-base-v2' needs its 5 packages: `make mpnet`"):
        resources.resolve_model("all-mpnet-base-v2")


def test_mpnet_is_registered_as_a_packaged_model():
    assert "all-mpnet-base-v2" in resources.PACKAGED_MODELS and "all-mpnet-base-v2" in resources.SPLIT_ARCHIVES
