"""Bad options and files get one clear error naming the parameter (or file) and the fix, before any model is
loaded: every case runs `layerexit` in a fresh interpreter and must finish without importing torch or
transformers (the checks read JSON and file headers only)."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from layerexit.cli import main as cli_main
from layerexit.cli.main import main

HEAVY = ("torch", "transformers", "matplotlib")
PROBE = """
import json, sys
from layerexit.cli.main import main
code = main(json.loads(sys.argv[1]))
print(json.dumps({"code": code, "heavy": [m for m in %r if m in sys.modules]}))
""" % (HEAVY,)


def _checkpoint(folder: Path, positions: int = 64) -> Path:
    """A checkpoint-shaped folder (config, a valid safetensors file, backbone config), written without torch."""
    (folder / "backbone").mkdir(parents=True)
    config = {"backbone": "tiny", "model_type": "bert", "num_layers": 2, "hidden_size": 4, "num_labels": 2,
              "exit_feature": "cls", "label_names": ["negative", "positive"], "max_length": 16}
    (folder / "layerexit_config.json").write_text(json.dumps(config))
    save_file({"exits.0.weight": np.zeros((2, 4), dtype=np.float32)}, str(folder / "model.safetensors"))
    (folder / "backbone" / "config.json").write_text(json.dumps({"model_type": "bert",
                                                                 "max_position_embeddings": positions}))
    return folder


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("validation")
    ckpt = _checkpoint(root / "ckpt")
    truncated = _checkpoint(root / "truncated")
    weights = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(weights[: len(weights) - 16])
    broken = _checkpoint(root / "broken-config")
    (broken / "layerexit_config.json").write_text('{"num_layers": 2, ')
    hf_layout = root / "hf-layout"  # a checkpoint in the transformers layout: config.json, model_type layerexit
    hf_layout.mkdir()
    (hf_layout / "config.json").write_text(json.dumps({"model_type": "layerexit", "num_layers": 2, "hidden_size": 8,
                                                       "backbone_type": "bert", "exit_feature": "cls",
                                                       "id2label": {"0": "negative", "1": "positive"}}))
    (hf_layout / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")  # cut short
    partial = root / "hf-partial"  # config.json with model_type layerexit but without the layerexit fields
    partial.mkdir()
    (partial / "config.json").write_text(json.dumps({"model_type": "layerexit", "num_layers": 2}))
    backbone = root / "backbone"
    backbone.mkdir()
    (backbone / "config.json").write_text(json.dumps({"model_type": "bert", "max_position_embeddings": 256}))
    (root / "out").mkdir()
    a_file = root / "a-file.txt"
    a_file.write_text("not a folder\n")
    data = root / "data.csv"
    data.write_text("text,label\ngood,1\nbad,0\n")
    (root / "bad-label.csv").write_text("text,label\ngood,1\nbad,\nfun,1\n")
    (root / "latin.csv").write_bytes("text,label\ngood,1\ncaf\xe9,0\n".encode("latin-1"))
    (root / "ones.csv").write_text("text,label\ngood,1\nfun,1\n")
    yaml_dir = root / "yaml"
    yaml_dir.mkdir()
    configs = {"epochs": "epochs: 1.5\n", "limit": "limit: -1\n", "method": "method: magic\n",
               "resume": "no_resume: 3\n", "lr": "learning_rate: fast\n"}
    for name, text in configs.items():
        (yaml_dir / f"{name}.yaml").write_text(text)
    return {"CKPT": str(ckpt), "TRUNC": str(truncated), "BROKEN": str(broken), "BACKBONE": str(backbone),
            "HFLAYOUT": str(hf_layout), "HFPARTIAL": str(partial), "FILE": str(a_file), "DATA": str(data), "BADLABEL": str(root / "bad-label.csv"),
            "LATIN": str(root / "latin.csv"), "ONES": str(root / "ones.csv"), "YAML": str(yaml_dir), "OUT": str(root / "out"),
            "ROOT": str(root)}


# (argv, what the message must name, the fix it must state)
CASES = [
    # output folders: a file, or a place that cannot be written (a folder inside a file)
    (["train", "--model", "BACKBONE", "--data", "DATA", "--output", "FILE"], "--output=", "it is a file"),
    (["train", "--model", "BACKBONE", "--data", "DATA", "--output", "FILE/run"], "--output=", "cannot be written"),
    (["evaluate", "--model", "CKPT", "--output", "FILE"], "--output=", "give a folder"),
    (["benchmark", "--model", "CKPT", "--output", "OUT"], "--output=", "it is a folder"),
    # sequence length: beyond the backbone's positions, or too short to hold anything
    (["train", "--model", "BACKBONE", "--data", "DATA", "--max-length", "512", "--output", "OUT/a"],
     "--max-length=512", "use at most 256"),
    (["train", "--model", "BACKBONE", "--data", "DATA", "--max-length", "1", "--output", "OUT/a"],
     "--max-length=1", "at least 2"),
    (["train", "--model", "BACKBONE", "--data", "DATA", "--max-length", "0", "--output", "OUT/a"],
     "--max-length=0", "at least 2"),
    # rule parameters and batch sizes
    (["benchmark", "--model", "CKPT", "--param", "threshold=high"], "--param='threshold=high'", "takes a number"),
    (["benchmark", "--model", "CKPT", "--param", "threshold"], "--param='threshold'", "NAME=VALUE"),
    (["benchmark", "--model", "CKPT", "--batch-sizes", "0"], "--batch-sizes='0'", ">= 1"),
    (["benchmark", "--model", "CKPT", "--batch-sizes=-4,8"], "--batch-sizes='-4,8'", ">= 1"),
    (["benchmark", "--model", "CKPT", "--examples", "0"], "--examples=0", ">= 1"),
    (["calibrate", "--model", "CKPT", "--batch-size", "0", "--output", "OUT/c"], "--batch-size=0", ">= 1"),
    (["calibrate", "--model", "CKPT", "--batch-size", "-3", "--output", "OUT/c"], "--batch-size=-3", ">= 1"),
    # YAML values go through the same checks as flags
    (["train", "--config", "YAML/epochs.yaml"], "epochs (in --config", "whole number"),
    (["train", "--config", "YAML/limit.yaml", "--model", "BACKBONE", "--data", "DATA"], "--limit=-1", ">= 1"),
    (["train", "--config", "YAML/method.yaml"], "method (in --config", "choose one of joint, consistentee"),
    (["train", "--config", "YAML/resume.yaml"], "no_resume (in --config", "true or false"),
    (["train", "--config", "YAML/lr.yaml"], "learning_rate (in --config", "use a number"),
    # training hyper-parameters
    (["train", "--model", "BACKBONE", "--data", "DATA", "--warmup-ratio", "5"], "--warmup-ratio=5.0", "[0, 1)"),
    (["train", "--model", "BACKBONE", "--data", "DATA", "--epochs", "0"], "--epochs=0", ">= 1"),
    (["train", "--model", "BACKBONE", "--data", "DATA", "--learning-rate", "-1"], "--learning-rate=-1.0", "positive"),
    (["train", "--model", "BACKBONE", "--data", "DATA", "--limit", "0"], "--limit=0", ">= 1"),
    (["train", "--model", "BACKBONE", "--data", "DATA", "--limit", "-1"], "--limit=-1", ">= 1"),
    (["train", "--model", "BACKBONE", "--data", "DATA", "--objective", "custom"], "--layer-weights", "one weight"),
    (["train", "--model", "BACKBONE", "--data", "DATA", "--objective", "distilled", "--distill-weight", "1.5"],
     "--distill-weight=1.5", "[0, 1]"),
    (["train", "--model", "BACKBONE", "--data", "DATA", "--objective", "distilled", "--distill-temperature", "0"],
     "--distill-temperature=0.0", "(0, inf)"),
    (["train", "--model", "BACKBONE", "--data", "DATA", "--distill-weight", "0.3"], "--distill-weight=0.3",
     "applies to --objective distilled"),
    (["train", "--model", "BACKBONE", "--data", "DATA", "--method", "consistentee", "--copies", "1"], "--copies=1",
     "K >= 2"),
    # generation thresholds and kinds of model
    (["generate", "--prompt", "hi", "--threshold", "1.5"], "--threshold=1.5", "[0, 1]"),
    (["generate", "--prompt", "hi", "--threshold", "-0.2"], "--threshold=-0.2", "[0, 1]"),
    (["generate", "--prompt", "hi", "--rule", "saturation", "--threshold", "-1.5"], "--threshold=-1.5", "[-1, 1]"),
    (["generate", "--prompt", "hi", "--strategy", "speculative", "--draft-threshold", "2"], "--draft-threshold=2.0",
     "[0, 1]"),
    (["generate", "--prompt", "hi", "--max-new-tokens", "0"], "--max-new-tokens=0", ">= 1"),
    (["generate", "--prompt", "hi", "--model", "CKPT"], "--model=", "generate needs a decoder"),
    (["generate", "--prompt", "hi", "--model", "BACKBONE"], "--model=", "it is an encoder (bert)"),
    (["generate", "--prompt", "hi", "--model", "HFLAYOUT"], "--model=", "layerexit classifier checkpoint"),
    (["evaluate", "--model", "HFLAYOUT", "--output", "OUT/e"], "hf-layout/model.safetensors", "truncated or damaged"),
    (["evaluate", "--model", "HFPARTIAL", "--output", "OUT/e"], "hf-partial/config.json", "lacks ['backbone_type'"),
    # accuracy targets and budgets
    (["evaluate", "--model", "CKPT", "--budget", "1.5", "--fit-split", "validation", "--output", "OUT/e"],
     "--budget=1.5", "(0, 1]"),
    (["evaluate", "--model", "CKPT", "--target-accuracy", "2", "--fit-split", "validation", "--output", "OUT/e"],
     "--target-accuracy=2.0", "(0, 1]"),
    (["evaluate", "--model", "CKPT", "--tolerance", "2", "--output", "OUT/e"], "--tolerance=2.0", "[0, 1]"),
    (["evaluate", "--model", "CKPT", "--rules", "maxprob,nosuch", "--output", "OUT/e"], "--rules=", "unknown"),
    (["evaluate", "--model", "CKPT", "--calibration", "OUT/none", "--output", "OUT/e"], "--calibration=",
     "layerexit calibrate"),
    (["calibrate", "--model", "CKPT", "--budget", "1.5", "--output", "OUT/c"], "--budget=1.5", "(0, 1]"),
    (["calibrate", "--model", "CKPT", "--split", "test", "--output", "OUT/c"], "--split='test'", "validation"),
    # data files: read (without torch) before the model loads
    (["evaluate", "--model", "CKPT", "--data", "BADLABEL", "--output", "OUT/e"], "bad-label.csv",
     "1 row(s) have an empty or missing text or label (line 3)"),
    (["train", "--model", "BACKBONE", "--data", "LATIN", "--output", "OUT/t"], "latin.csv",
     "line 3 is not UTF-8"),
    (["train", "--model", "BACKBONE", "--data", "ONES", "--output", "OUT/t"], "labels=['1']", "at least two"),
    (["calibrate", "--model", "CKPT", "--data", "BADLABEL", "--output", "OUT/c"], "bad-label.csv", "--skip-bad-rows"),
    # checkpoint files
    (["evaluate", "--model", "TRUNC", "--output", "OUT/e"], "model.safetensors", "truncated or damaged"),
    (["benchmark", "--model", "BROKEN"], "layerexit_config.json", "cannot be read as JSON"),
    (["evaluate", "--model", "ROOT/no-such", "--output", "OUT/e"], "--model=", "no such checkpoint folder"),
    (["evaluate", "--output", "OUT/e"], "--model=None", "it is required"),
]


def _fill(argv: list[str], files: dict[str, str]) -> list[str]:
    out = []
    for a in argv:
        for key, value in files.items():
            if a == key or a.startswith(key + "/"):
                a = value + a[len(key):]
                break
        out.append(a)
    return out


@pytest.mark.parametrize("argv, names, fix", CASES, ids=[" ".join(c[0][:1] + [c[1]]) for c in CASES])
def test_bad_option_is_refused_before_any_model_loads(argv, names, fix, files):
    argv = _fill(argv, files)
    before = set(os.listdir(files["ROOT"]))
    done = subprocess.run([sys.executable, "-c", PROBE, json.dumps(argv)], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    result = json.loads(done.stdout.strip().splitlines()[-1])
    err = done.stderr
    assert result["code"] == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"layerexit {argv[0]}: error: ")
    assert names in err and fix in err, err
    assert result["heavy"] == [], f"loaded {result['heavy']} before refusing: {err}"
    assert set(os.listdir(files["ROOT"])) <= before | {"out"}


def test_refused_calibration_leaves_nothing_behind(files):
    out = Path(files["ROOT"]) / "calibration-budget"
    assert main(["calibrate", "--model", files["CKPT"], "--budget", "1.5", "--output", str(out)]) == 2
    assert not out.exists()


def test_output_folder_is_created_and_test_written_first(files, monkeypatch):
    """The folder exists (and was proven writable) before the command's work starts."""
    seen = {}

    def run(args):
        seen["exists"] = Path(args.output).is_dir()
        return 0

    out = Path(files["ROOT"]) / "fresh" / "report"
    parser = cli_main.build_parser()
    parser.subparsers["evaluate"].set_defaults(run=run)
    monkeypatch.setattr(cli_main, "build_parser", lambda: parser)
    assert main(["evaluate", "--model", files["CKPT"], "--output", str(out)]) == 0
    assert seen["exists"] and not [p for p in out.iterdir() if p.name.startswith(".layerexit-write-test")]


@pytest.mark.parametrize("raised, code, words", [
    (KeyboardInterrupt(), 130, "interrupted"),
    (OSError(errno.ENOSPC, "No space left on device", "/runs/x/state"), 1, "No space left on device (/runs/x/state)"),
])
def test_interrupts_and_os_errors_give_one_line_with_the_resume_point(raised, code, words, files, monkeypatch,
                                                                     capsys, tmp_path):
    out = tmp_path / "run"
    (out / "state").mkdir(parents=True)

    def run(args):
        raise raised

    parser = cli_main.build_parser()
    parser.subparsers["train"].set_defaults(run=run)
    monkeypatch.setattr(cli_main, "build_parser", lambda: parser)
    argv = ["train", "--model", files["BACKBONE"], "--data", files["DATA"], "--max-length", "32", "--output", str(out)]
    assert main(argv) == code
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and words in err
    assert f"the last resume point is in {out}; run the same command again" in err


def test_yaml_lists_and_numbers_are_converted_like_flags(files, tmp_path):
    from layerexit.cli.common import apply_config

    config = tmp_path / "ok.yaml"
    config.write_text("epochs: 3\nlearning-rate: 1e-4\nlayer_weights: [1, 2]\nno_resume: true\n"
                      "batch_size: '16'\n")
    parser = cli_main.build_parser().subparsers["train"]
    argv = ["--config", str(config), "--epochs", "5"]
    args = apply_config(parser, argv, parser.parse_args(argv))
    assert (args.epochs, args.learning_rate, args.layer_weights, args.no_resume, args.batch_size) == \
        (5, 1e-4, [1.0, 2.0], True, 16)
    bench = cli_main.build_parser().subparsers["benchmark"]
    config.write_text("param: {threshold: 0.9, patience: 2}\nbatch_sizes: [1, 8]\n")
    args = apply_config(bench, ["--config", str(config)], bench.parse_args(["--config", str(config)]))
    assert args.param == ["threshold=0.9", "patience=2"] and args.batch_sizes == "1,8"
