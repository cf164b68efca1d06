"""Run folders: resume state that is never unpickled, runs that cannot be mixed, a folder lock, a small
finished folder with its effective configuration."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
import time
from importlib.metadata import version

import pytest
import torch
from transformers import AutoTokenizer

from layerexit.cli.main import main
from layerexit.data import Encoded, load_data
from layerexit.errors import LayerExitError
from layerexit.evaluation.cache import LogitCache
from layerexit.model import MultiExitModel
from layerexit.training import TrainConfig, make_objective, train, training_config
from layerexit.training import trainer as trainer_module
from layerexit.training.runfolder import locked
from layerexit.training.state import flatten, load_tensors, unflatten
from tiny_text import write_backbone, write_csv


class Payload:
    """Unpickling this creates ``marker``: the proof that a pickle from the run folder was executed."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    backbone = write_backbone(root / "backbone")
    tokenizer = AutoTokenizer.from_pretrained(backbone)
    return {
        "backbone": str(backbone),
        "train_csv": write_csv(root / "train.csv", 64, seed=1),
        "other_csv": write_csv(root / "other.csv", 64, seed=5),
        "eval_csv": write_csv(root / "eval.csv", 32, seed=2),
        "tokenizer": tokenizer,
    }


def _set(task, key):
    return Encoded(load_data(str(task[key])), task["tokenizer"], 16)


def _model(task, seed=0):
    torch.manual_seed(seed)
    return MultiExitModel.from_backbone(task["backbone"], 2, exit_feature="mean")


def _train(task, out, epochs=1, data="train_csv", eval_data="eval_csv", resume=True, model_seed=0, **kwargs):
    config = TrainConfig(epochs=epochs, batch_size=16, learning_rate=1e-3, seed=3, save_steps=2, **kwargs)
    model = _model(task, model_seed)
    eval_set = _set(task, eval_data) if eval_data else None
    progress = train(model, task["tokenizer"], _set(task, data), eval_set, make_objective("weighted"), config, out,
                     resume=resume)
    return model, progress


def _interrupt_at(call: int):
    """Make the weighted loss raise at its ``call``-th use (a crash mid-run); returns the undo function."""
    original, calls = trainer_module.weighted_exit_loss, {"n": 0}

    def crash(*args):
        calls["n"] += 1
        if calls["n"] == call:
            raise KeyboardInterrupt
        return original(*args)

    trainer_module.weighted_exit_loss = crash
    return lambda: setattr(trainer_module, "weighted_exit_loss", original)


def test_flatten_round_trip_keeps_types():
    import numpy as np
    import random

    value = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(2, 3)}},
             "groups": [{"betas": (0.9, 0.999), "params": [0, 1], "foreach": None}],
             "numpy": np.random.get_state(), "python": random.getstate()}
    skeleton, tensors = flatten(value)
    json.dumps(skeleton)  # the structure is plain JSON
    back = unflatten(json.loads(json.dumps(skeleton)), tensors)
    assert set(back["state"]) == {0} and torch.equal(back["state"][0]["exp_avg"], value["state"][0]["exp_avg"])
    assert back["groups"][0]["betas"] == (0.9, 0.999) and back["python"] == value["python"]
    assert back["numpy"][1].dtype == value["numpy"][1].dtype and (back["numpy"][1] == value["numpy"][1]).all()


def test_resume_state_is_tensors_and_json_only(task, tmp_path):
    undo = _interrupt_at(3)  # 4 steps an epoch: a resume point at step 2
    try:
        with pytest.raises(KeyboardInterrupt):
            _train(task, tmp_path, epochs=2)
    finally:
        undo()
    (point,) = (tmp_path / "state").glob("step-*")
    names = sorted(p.name for p in point.iterdir())
    assert all(n.endswith((".json", ".safetensors")) for n in names), names
    assert {"model.safetensors", "optimizer.safetensors", "optimizer.json", "scheduler.json", "rng0.json",
            "progress.json"} <= set(names)


def test_planted_pickle_in_state_never_runs_and_resume_is_exact(task, tmp_path):
    reference, _ = _train(task, tmp_path / "ref", epochs=2)
    undo = _interrupt_at(7)  # step 3 of epoch 2, after the resume point at its step 2
    try:
        with pytest.raises(KeyboardInterrupt):
            _train(task, tmp_path / "run", epochs=2)
    finally:
        undo()
    marker = tmp_path / "PWNED"
    (point,) = (tmp_path / "run" / "state").glob("step-*")
    for place in (tmp_path / "run" / "state", point):  # the old file names, in both layouts
        for name in ("optimizer.pt", "scheduler.pt", "rng.pt", "rng0.pt"):
            torch.save({"x": Payload(marker)}, place / name)
    resumed, _ = _train(task, tmp_path / "run", epochs=2, model_seed=99)
    assert not marker.exists(), "a pickle planted in the run folder was executed on resume"
    ref, new = reference.state_dict(), resumed.state_dict()
    assert all(torch.equal(ref[k], new[k]) for k in ref)  # bit-identical to the uninterrupted run


def test_other_pickled_files_are_loaded_weights_only(tmp_path):
    marker = tmp_path / "PWNED"
    for name in ("memorized.pt", "fit_logits.pt"):
        torch.save({"memorized": Payload(marker), "num_examples": 3}, tmp_path / name)
    with pytest.raises(LayerExitError, match="memorized.pt"):
        load_tensors(tmp_path / "memorized.pt")
    with pytest.raises(pickle.UnpicklingError):
        LogitCache.load(tmp_path / "fit_logits.pt")
    assert not marker.exists()


def test_old_layout_with_pickles_is_refused_not_unpickled(task, tmp_path):
    marker = tmp_path / "PWNED"
    state = tmp_path / "run" / "state"
    state.mkdir(parents=True)
    (state / "progress.json").write_text(json.dumps({"epoch": 1}))
    torch.save(Payload(marker), state / "rng.pt")
    with pytest.raises(LayerExitError, match="--no-resume"):
        _train(task, tmp_path / "run")
    assert not marker.exists()
    _train(task, tmp_path / "run", resume=False)  # starting over discards it
    assert not (state / "rng.pt").exists() and not marker.exists()


def test_rerun_with_other_data_or_options_is_refused(task, tmp_path, capsys):
    _train(task, tmp_path, epochs=1)
    with pytest.raises(LayerExitError, match="train_data") as err:
        _train(task, tmp_path, epochs=1, data="other_csv")
    assert "--no-resume" in str(err.value) and "--output" in str(err.value)
    with pytest.raises(LayerExitError, match="learning_rate|batch_size|seed"):
        config = TrainConfig(epochs=1, batch_size=8, learning_rate=1e-3, seed=3)
        train(_model(task), task["tokenizer"], _set(task, "train_csv"), _set(task, "eval_csv"),
              make_objective("weighted"), config, tmp_path)
    capsys.readouterr()
    _train(task, tmp_path, epochs=1, data="other_csv", resume=False)
    assert "starting over" in capsys.readouterr().out
    recorded = json.loads((tmp_path / "run_config.json").read_text())
    assert recorded["settings"]["train_data"].startswith("64:")


def test_same_run_again_trains_nothing_and_more_epochs_extend_it(task, tmp_path, capsys):
    _, first = _train(task, tmp_path, epochs=1)
    assert first.global_step == 4
    capsys.readouterr()
    _, again = _train(task, tmp_path, epochs=1)
    assert again.global_step == 4 and "nothing to train" in capsys.readouterr().out
    before = MultiExitModel.from_pretrained(tmp_path / "final").state_dict()
    _, extended = _train(task, tmp_path, epochs=3)
    out = capsys.readouterr().out
    assert "resuming from step 4" in out and "extending the finished run from 1 to 3 epochs" in out
    assert extended.global_step == 12 and len(json.loads((tmp_path / "history.json").read_text())) == 3
    after = MultiExitModel.from_pretrained(tmp_path / "final").state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # it really trained


def test_interrupted_run_says_where_it_resumes(task, tmp_path, capsys):
    undo = _interrupt_at(3)
    try:
        with pytest.raises(KeyboardInterrupt):
            _train(task, tmp_path, epochs=1)
    finally:
        undo()
    capsys.readouterr()
    _train(task, tmp_path, epochs=1)
    assert "resuming from step 2" in capsys.readouterr().out


def test_finished_folder_keeps_no_duplicate_weights(task, tmp_path):
    _train(task, tmp_path, epochs=2)
    (point,) = (tmp_path / "state").glob("step-*")
    names = {p.name for p in point.iterdir()}
    assert "model.safetensors" not in names and "optimizer.json" not in names  # final/ holds the weights
    assert {"scheduler.json", "progress.json", "rng0.json"} <= names
    config = json.loads((tmp_path / "final" / "training_config.json").read_text())
    settings = config["settings"]
    assert settings["learning_rate"] == 1e-3 and settings["seed"] == 3 and settings["epochs"] == 2
    assert config["versions"]["torch"] == version("torch") and config["versions"]["transformers"]
    assert config == json.loads((tmp_path / "run_config.json").read_text()) == training_config(tmp_path / "best")
    best = MultiExitModel.from_pretrained(tmp_path / "best")
    progress = json.loads((point / "progress.json").read_text())
    if progress["best_step"] == progress["global_step"]:  # the last epoch was the best: one copy on disk
        assert (tmp_path / "final" / "model.safetensors").stat().st_ino == (
            tmp_path / "best" / "model.safetensors").stat().st_ino
    assert best.config.num_layers == 3


def test_keep_optimizer_state_and_save_total_limit(task, tmp_path):
    undo = _interrupt_at(8)  # 4 steps an epoch: resume points at steps 2, 4, 6
    try:
        with pytest.raises(KeyboardInterrupt):
            _train(task, tmp_path / "a", epochs=2, save_total_limit=2)
    finally:
        undo()
    assert [p.name for p in sorted((tmp_path / "a" / "state").glob("step-*"))] == ["step-00000004",
                                                                                  "step-00000006"]
    _train(task, tmp_path / "b", epochs=1, keep_optimizer_state=True)
    (point,) = (tmp_path / "b" / "state").glob("step-*")
    assert (point / "optimizer.safetensors").is_file() and not (point / "model.safetensors").exists()
    with pytest.raises(LayerExitError, match="save_total_limit"):
        TrainConfig(save_total_limit=0).validate()


def test_second_training_into_the_same_folder_fails_at_once(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from layerexit.training.runfolder import locked\n"
         "with locked(sys.argv[1]):\n    print('locked', flush=True); time.sleep(60)", str(tmp_path)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        started = time.monotonic()
        with pytest.raises(LayerExitError, match="in use by another training") as err:
            with locked(tmp_path):
                pass
        assert time.monotonic() - started < 2 and "--output" in str(err.value) and f"pid {holder.pid}" in str(
            err.value)
    finally:
        holder.kill()
        holder.wait()
    with locked(tmp_path):  # released when its holder dies
        pass


def _hold_lock(folder) -> subprocess.Popen:
    """Another process holding the run-folder lock of ``folder`` (for 60 s, or until killed)."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from layerexit.training.runfolder import locked\n"
         "with locked(sys.argv[1]):\n    print('locked', flush=True); time.sleep(60)", str(folder)],
        stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_cli_takes_the_lock_before_loading_data_or_backbone(task, tmp_path, monkeypatch, capsys):
    """A second `layerexit train` into a folder in use fails at once: before the data or the backbone load."""
    import layerexit.cli.train as train_cli
    import layerexit.training.run as run_module

    loaded = []
    monkeypatch.setattr(train_cli, "data_from", lambda *a, **k: loaded.append("data"))
    monkeypatch.setattr(run_module, "resolve_model", lambda *a, **k: loaded.append("backbone"))
    holder = _hold_lock(tmp_path / "run")
    try:
        started = time.monotonic()
        code = main(["train", "--model", task["backbone"], "--data", str(task["train_csv"]), "--eval-split", "none",
                     "--output", str(tmp_path / "run"), "--epochs", "1", "--max-length", "16"])
        elapsed = time.monotonic() - started
    finally:
        holder.kill()
        holder.wait()
    err = capsys.readouterr().err
    assert code == 2 and "in use by another training" in err and f"pid {holder.pid}" in err
    assert loaded == [] and elapsed < 2
    # the Python API too: train_classifier takes the lock before resolving the backbone
    blocker = _hold_lock(tmp_path / "api")
    try:
        with pytest.raises(LayerExitError, match="in use by another training"):
            run_module.train_classifier(task["backbone"], load_data(str(task["train_csv"])), None, tmp_path / "api")
    finally:
        blocker.kill()
        blocker.wait()
    assert loaded == []


def test_the_lock_is_reentrant_within_a_process_and_released_by_the_outermost(tmp_path):
    with locked(tmp_path):
        with locked(tmp_path):  # the same process (e.g. the CLI, then the training loop): no error
            pass
        probe = subprocess.run(
            [sys.executable, "-c", "import sys; from layerexit.training.runfolder import locked\n"
             "with locked(sys.argv[1]): pass", str(tmp_path)], capture_output=True, text=True)
        assert probe.returncode != 0 and "in use by another training" in probe.stderr  # still held
    probe = subprocess.run(
        [sys.executable, "-c", "import sys; from layerexit.training.runfolder import locked\n"
         "with locked(sys.argv[1]): pass", str(tmp_path)], capture_output=True, text=True)
    assert probe.returncode == 0, probe.stderr


def test_cli_eval_split_none_says_what_was_written(task, tmp_path, capsys):
    code = main(["train", "--model", task["backbone"], "--data", str(task["train_csv"]), "--eval-split", "none",
                 "--output", str(tmp_path / "run"), "--epochs", "1", "--batch-size", "32", "--max-length", "16"])
    out = capsys.readouterr().out
    assert code == 0 and "no best/" in out and "/best (best)" not in out
    assert not (tmp_path / "run" / "best").exists() and (tmp_path / "run" / "final").is_dir()


def test_consistentee_rerun_with_other_options_is_refused(task, tmp_path):
    from layerexit.consistentee import ConsistentEEConfig, train_consistentee

    def run(alpha):
        cee = ConsistentEEConfig(alpha=alpha, copies=2, stage2_epochs=1, stage3_epochs=0, policy_hidden=8)
        train_consistentee(task["backbone"], load_data(str(task["train_csv"])), None, tmp_path, cee,
                           TrainConfig(epochs=1, batch_size=32, learning_rate=1e-3, seed=3), exit_feature="mean",
                           max_length=16)

    run(1.0)
    run(1.0)  # the same run again: resumes (here: finds every stage done)
    with pytest.raises(LayerExitError, match="consistentee_alpha"):
        run(0.5)
