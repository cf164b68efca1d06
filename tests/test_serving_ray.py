"""Ray Serve scale-out: two local replicas of the same service answer like the engine (skipped without Ray)."""

from __future__ import annotations

import pytest

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

import httpx2  # noqa: E402

from serving_fixtures import free_port, write_checkpoint  # noqa: E402

from layerexit.rules import MaxProb  # noqa: E402
from layerexit.serving.ray_deploy import deployment  # noqa: E402
from layerexit.serving.service import load_service  # noqa: E402

TEXTS = ["good movie", "the plot was dull and tedious", "a lovely film", "bad acting", "the film is very fun"]


def test_two_ray_serve_replicas_answer_like_the_engine(tmp_path):
    model_dir = write_checkpoint(tmp_path / "model")
    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(deployment(2, 0.5, model=str(model_dir), rule="maxprob", threshold=0.75, threads=1),
                  name="layerexit", route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        status = serve.status().applications["layerexit"].deployments["layerexit"]
        assert status.replica_states.get("RUNNING") == 2
        got = httpx2.post(url + "/predict", json={"inputs": TEXTS}, timeout=60).json()
        local = load_service(model_dir, rule="maxprob", threshold=0.75)
        tok = local.engine.tokenizer(TEXTS, padding=True, return_tensors="pt")
        want = local.engine.model.early_exit(tok["input_ids"], tok["attention_mask"], tok["token_type_ids"],
                                             rule=MaxProb(0.75))
        assert [a[0]["exit_layer"] for a in got] == want.exit_layer.tolist()
        processes = {httpx2.get(url + "/info", timeout=30).json()["process"] for _ in range(30)}
        assert len(processes) == 2  # Ray's proxy spread the requests over both replicas
    finally:
        serve.shutdown()
        ray.shutdown()
