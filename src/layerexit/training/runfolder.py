"""A run folder belongs to one run: an exclusive lock, the run's fingerprint and its effective configuration.

- ``.lock``: held (``fcntl.flock``, exclusive, non-blocking) while a training writes the folder, so a second
  training into the same ``--output`` fails at once instead of silently interleaving with the first. It is
  taken before the data and the backbone load (``layerexit train`` takes it first of all; this module imports
  no torch), and a process that holds it may enter :func:`locked` again for the same folder.
- ``run_config.json``: the effective configuration (every hyper-parameter, the objective, the model's exit
  setup, digests of the training and evaluation data, package versions, number of processes, seed) and the
  fingerprint computed from the parts that define the run. A run resumes only when the fingerprint matches;
  ``epochs`` is not part of it, so a finished run can be extended with more epochs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shutil
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Iterator

from ..errors import LayerExitError
from ..io import write_json_atomic

RUN_CONFIG = "run_config.json"
LOCK_NAME = ".lock"
#: options that may change between a run and its resumption (they do not change what is learned)
RESUMABLE = ("epochs", "save_steps", "save_total_limit", "eval_batch_size", "keep_optimizer_state")
#: what a run writes; removed when it starts over with --no-resume
RUN_ARTIFACTS = ("state", "best", "final", "history.json", RUN_CONFIG)


def dataset_digest(encoded) -> str | None:
    """SHA-256 over the token ids and labels of an encoded data set (None for no data set)."""
    if encoded is None:
        return None
    digest = hashlib.sha256()
    digest.update(json.dumps(encoded.features["input_ids"]).encode())
    digest.update(json.dumps(list(encoded.labels), default=_plain).encode())
    return f"{len(encoded)}:{digest.hexdigest()[:16]}"


def text_digest(data) -> str | None:
    """SHA-256 over a data set's texts, text pairs and labels, before tokenization (None for no data)."""
    if data is None:
        return None
    payload = json.dumps([list(data.texts), list(data.pairs) if data.pairs is not None else None,
                          list(data.labels), list(data.label_names)], default=_plain)
    return f"{len(data.labels)}:{hashlib.sha256(payload.encode()).hexdigest()[:16]}"


def _plain(value):
    return value.item() if hasattr(value, "item") else str(value)


def versions() -> dict:
    out = {"python": platform.python_version()}
    for name in ("layerexit", "torch", "transformers", "accelerate", "safetensors"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "unknown"
    return out


def fingerprint(settings: dict) -> str:
    """Digest of everything in ``settings`` that defines the run (not the options in :data:`RESUMABLE`)."""
    defining = {k: v for k, v in settings.items() if k not in RESUMABLE}
    return hashlib.sha256(json.dumps(defining, sort_keys=True, default=str).encode()).hexdigest()[:16]


def effective_config(settings: dict) -> dict:
    """What ``run_config.json`` holds: the settings, their fingerprint, versions and the torch build."""
    import torch

    return {"fingerprint": fingerprint(settings), "settings": settings, "versions": versions(),
            "torch_threads": torch.get_num_threads()}


def check_resumable(output_dir: Path, settings: dict) -> dict | None:
    """The recorded configuration when ``output_dir`` holds a run with the same fingerprint; None when it
    holds no run; a :class:`LayerExitError` listing the differences otherwise."""
    path = output_dir / RUN_CONFIG
    if not path.is_file():
        if (output_dir / "state").is_dir():
            raise LayerExitError(
                f"--output={str(output_dir)!r} holds a resume point but no {RUN_CONFIG} (written by an older "
                "layerexit), so it cannot be checked against this run's options and data; pass --no-resume to "
                "start over in it, or choose another --output"
            )
        return None
    try:
        recorded = json.loads(path.read_text())
        old = recorded["settings"]
    except (ValueError, KeyError) as err:
        raise LayerExitError(f"{str(path)!r} is invalid ({err}); pass --no-resume to start over") from None
    if fingerprint(old) == fingerprint(settings):
        return recorded
    changed = sorted(k for k in set(old) | set(settings) if k not in RESUMABLE and old.get(k) != settings.get(k))
    shown = "; ".join(f"{k}: {_short(old.get(k))} -> {_short(settings.get(k))}" for k in changed[:6])
    raise LayerExitError(
        f"--output={str(output_dir)!r} holds a different run ({shown}); resuming would mix the two. Pass "
        "--no-resume to discard it and start over there, or choose another --output"
    )


def _short(value) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def write_run_config(output_dir: Path, settings: dict) -> dict:
    config = effective_config(settings)
    write_json_atomic(output_dir / RUN_CONFIG, config)
    return config


def training_config(checkpoint: str | Path) -> dict | None:
    """The effective training configuration of a checkpoint written by ``layerexit train`` (its
    ``training_config.json``, else its run folder's ``run_config.json``), e.g. for a results.json; None if
    there is none."""
    checkpoint = Path(checkpoint)
    for path in (checkpoint / "training_config.json", checkpoint.parent / RUN_CONFIG):
        if path.is_file():
            try:
                return json.loads(path.read_text())
            except ValueError:
                return None
    return None


def discard_run(output_dir: Path) -> list[str]:
    """Remove a previous run's artifacts (for --no-resume); returns what was removed."""
    removed = []
    for name in RUN_ARTIFACTS:
        path = output_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
        else:
            continue
        removed.append(name)
    return removed


#: folders whose lock this process holds -> how many nested :func:`locked` calls hold it
_HELD: dict[str, int] = {}
#: where launchers put the global rank of a process (torchrun / accelerate launch, then MPI launchers)
_RANK_VARIABLES = ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "MV2_COMM_WORLD_RANK")


def launch_rank() -> int:
    """This process's global rank as its launcher set it (0 when started alone), read without torch."""
    for name in _RANK_VARIABLES:
        value = os.environ.get(name)
        if value not in (None, ""):
            try:
                return int(value)
            except ValueError:
                return 0
    return 0


@contextlib.contextmanager
def locked(output_dir: str | Path, enabled: bool = True) -> Iterator[None]:
    """Hold an exclusive lock on ``output_dir`` (created if needed); fail at once if another process has it.

    ``enabled=False`` (processes other than the main one) takes no lock. Re-entrant within a process: a call
    for a folder this process already holds succeeds and releases nothing when it ends.
    """
    if not enabled:
        yield
        return
    import fcntl

    output_dir = Path(output_dir)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        key = str(output_dir.resolve())
        if key in _HELD:
            _HELD[key] += 1
            try:
                yield
            finally:
                _HELD[key] -= 1
            return
        handle = open(output_dir / LOCK_NAME, "a+")
    except OSError as err:
        raise LayerExitError(
            f"--output={str(output_dir)!r} is not a writable folder ({err.strerror}); choose another --output"
        ) from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise LayerExitError(
            f"--output={str(output_dir)!r} is in use by another training ({holder}); wait for it to finish or "
            "choose another --output"
        ) from None
    _HELD[key] = 1
    try:
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {platform.node()}\n")
        handle.flush()
        yield
    finally:
        del _HELD[key]
        with contextlib.suppress(OSError):
            handle.seek(0)
            handle.truncate()
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()
