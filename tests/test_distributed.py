"""Real two-process data parallel training on the CPU (gloo over loopback): disjoint shards (training and the
evaluation each epoch), dropout drawn independently per process, one writer, and a run killed with SIGKILL that
resumes to exactly the weights of an uninterrupted one; also for ConsistentEE."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from layerexit.consistentee.schedule import compute_memorized
from layerexit.data import Encoded, load_data
from layerexit.evaluation.cache import collect_logits
from layerexit.evaluation.simulate import per_layer_accuracy
from layerexit.model import MultiExitModel
from tiny_text import write_backbone, write_csv

HERE = Path(__file__).parent
WORKER = HERE / "distributed_worker.py"
ROWS = 64  # 2 processes x batch 8 = 16 rows a step: 4 steps an epoch, no padded last batch
EVAL_ROWS = 21  # odd: the two evaluation shards differ in size


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env(rank: int | None = None, world: int = 2) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(HERE), *sys.path])}
    if rank is not None:
        env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                   MASTER_ADDR="127.0.0.1")
    return env


def _launch(args: list[str], tmp: Path, world: int = 2, timeout: float = 240) -> list[int]:
    """Start ``world`` worker processes; when one dies (e.g. killed), stop the others, as torchrun would."""
    port = str(_free_port())
    procs = []
    for rank in range(world):
        out = open(tmp / f"out-{len(list(tmp.glob('out-*')))}.txt", "w")
        procs.append(subprocess.Popen([sys.executable, str(WORKER), *args], env={**_env(rank, world),
                                      "MASTER_PORT": port}, stdout=out, stderr=subprocess.STDOUT))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        codes = [p.poll() for p in procs]
        if all(c is not None for c in codes):
            return codes
        if any(c not in (None, 0) for c in codes):
            break
        time.sleep(0.2)
    for p in procs:
        p.kill()
    return [p.wait() for p in procs]


def _rows(log: Path, rank: int, kind: str) -> list[list[int]]:
    lines = Path(f"{log}.rank{rank}").read_text().splitlines()
    return [entry["rows"] for entry in map(json.loads, lines) if entry["kind"] == kind]


def _state(folder: Path) -> dict:
    return MultiExitModel.from_pretrained(folder).state_dict()


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    return {"backbone": str(write_backbone(root / "backbone")), "train": str(write_csv(root / "train.csv", ROWS)),
            "eval": str(write_csv(root / "eval.csv", EVAL_ROWS, seed=7))}


def _run(task, tmp, mode, name, kill_at=0):
    evaluation = [task["eval"]] if mode == "joint" else []
    return _launch([mode, task["backbone"], task["train"], str(tmp / name), str(tmp / f"{name}.log"),
                    str(kill_at), *evaluation], tmp)


def _entries(log: Path, rank: int, kind: str) -> list[dict]:
    lines = Path(f"{log}.rank{rank}").read_text().splitlines()
    return [entry for entry in map(json.loads, lines) if entry["kind"] == kind]


def test_two_processes_train_disjoint_shards_and_resume_exactly_after_a_kill(task, tmp_path):
    assert _run(task, tmp_path, "joint", "ref") == [0, 0]
    for epoch in range(2):  # every epoch: each row seen by exactly one process
        seen = [sum(_rows(tmp_path / "ref.log", rank, "batch")[epoch * 4 : epoch * 4 + 4], []) for rank in (0, 1)]
        assert len(seen[0]) == len(seen[1]) == ROWS // 2
        assert not set(seen[0]) & set(seen[1]) and sorted(seen[0] + seen[1]) == list(range(ROWS))
    # dropout: each process draws its own masks (the RNG streams differ at every step), the data order is shared
    digests = [[e["rng"] for e in _entries(tmp_path / "ref.log", rank, "batch")] for rank in (0, 1)]
    assert all(a != b for a, b in zip(*digests)) and len(set(digests[0])) == len(digests[0])
    # evaluation each epoch: sharded (disjoint, together every row once), gathered in row order on every process
    for epoch in range(2):
        shards = [_rows(tmp_path / "ref.log", rank, "eval_rows")[epoch] for rank in (0, 1)]
        assert shards[0] and shards[1] and len(shards[0]) + len(shards[1]) == EVAL_ROWS
        assert sorted(shards[0] + shards[1]) == list(range(EVAL_ROWS))
    gathered = [_entries(tmp_path / "ref.log", rank, "eval_logits")[-1]["logits"] for rank in (0, 1)]
    assert gathered[0] == gathered[1]
    ref = tmp_path / "ref"
    final = MultiExitModel.from_pretrained(ref / "final")  # the last epoch's model, scored by one process
    evaluation = Encoded(load_data(task["eval"]), AutoTokenizer.from_pretrained(ref / "final"), 16)
    alone = collect_logits(final, evaluation, 64, progress=False)
    torch.testing.assert_close(torch.tensor(gathered[0]), alone.logits, rtol=1e-4, atol=1e-5)
    history = json.loads((ref / "history.json").read_text())
    assert history[-1]["per_layer_accuracy"] == per_layer_accuracy(alone.logits, alone.labels)
    assert sorted(p.name for p in ref.iterdir()) == [".lock", "best", "final", "history.json", "run_config.json",
                                                     "state"]
    config = json.loads((ref / "run_config.json").read_text())["settings"]
    assert config["num_processes"] == 2 and config["global_batch_size"] == 16
    assert len(list((ref / "state").iterdir())) == 1  # one light resume point, no leftovers

    # SIGKILL rank 0 at step 3 of epoch 2 (after the resume point at its step 2); rank 1 is stopped too
    codes = _run(task, tmp_path, "joint", "run", kill_at=7)
    assert codes[0] == -9 and not (tmp_path / "run" / "final").exists()
    assert _run(task, tmp_path, "joint", "run") == [0, 0]
    assert _equal(_state(ref / "final"), _state(tmp_path / "run" / "final"))  # bit-identical


def test_consistentee_two_processes_shard_its_passes_and_resume_exactly(task, tmp_path):
    assert _run(task, tmp_path, "consistentee", "ref") == [0, 0]
    ref = tmp_path / "ref"
    shards = [_rows(tmp_path / "ref.log", rank, "features")[0] for rank in (0, 1)]
    assert not set(shards[0]) & set(shards[1]) and sorted(shards[0] + shards[1]) == list(range(ROWS))
    stage3 = [sum(_rows(tmp_path / "ref.log", rank, "stage3"), []) for rank in (0, 1)]
    assert not set(stage3[0]) & set(stage3[1]) and sorted(stage3[0] + stage3[1]) == list(range(ROWS))
    # the sharded memorized-layer pass equals one process's
    stage1 = MultiExitModel.from_pretrained(ref / "stage1" / "final")
    encoded = Encoded(load_data(task["train"]), AutoTokenizer.from_pretrained(ref / "stage1" / "final"), 16)
    saved = torch.load(ref / "memorized.pt", weights_only=True)
    assert torch.equal(saved["memorized"], compute_memorized(stage1, encoded))
    assert {p.name for p in ref.iterdir()} == {".lock", "stage1", "memorized.pt", "round1", "final", "history.json",
                                               "run_config.json"}
    history = json.loads((ref / "history.json").read_text())
    assert [h["stage"] for h in history].count("stage2") == 1  # one writer: no duplicated records

    # kill rank 0 at the third stage-3 step (after the resume point at step 2), then resume
    assert _run(task, tmp_path, "consistentee", "run", kill_at=3)[0] == -9
    assert not (tmp_path / "run" / "final").exists()
    assert _run(task, tmp_path, "consistentee", "run") == [0, 0]
    assert _equal(_state(ref / "final"), _state(tmp_path / "run" / "final"))


def test_torchrun_cli_starts_two_processes_and_prints_one_saved_line(task, tmp_path):
    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
         "--master_port", str(_free_port()), "-m", "layerexit.cli.main", "train", "--model", task["backbone"],
         "--data", task["train"], "--eval-split", "none", "--exit-feature", "mean", "--epochs", "1",
         "--batch-size", "8", "--max-length", "16", "--output", str(out)],
        env=_env(), capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("saved:") == 1, result.stdout
    settings = json.loads((out / "run_config.json").read_text())["settings"]
    assert settings["num_processes"] == 2
    progress = json.loads(next((out / "state").glob("step-*/progress.json")).read_text())
    assert progress["global_step"] == ROWS // 16  # sharded: 4 steps of 2 x 8 rows, not 8 steps of 8
