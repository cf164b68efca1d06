"""`layerexit serve` over HTTP: TEI-style API, InferenceClient, errors before the model, metrics, per-request
control, a full queue, failures kept to their request, and a SIGTERM that loses no accepted request.

Servers run on free 127.0.0.1 ports: in a thread of the test process (fast), and once as a real
`layerexit serve` subprocess for the SIGTERM test."""

from __future__ import annotations

import signal
import threading
import time

import httpx2
import pytest
import torch

from serving_fixtures import LABELS, Server, ThreadServer, write_calibration, write_checkpoint

from layerexit.cli.main import main
from layerexit.errors import LayerExitError
from layerexit.rules import MaxProb
from layerexit.serving.service import load_service

THRESHOLD = 0.75
TEXTS = ["good movie", "the plot was dull and tedious", "a lovely film", "bad acting", "the film is very fun"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("serve") / "model")


@pytest.fixture(scope="module")
def calibration(checkpoint, tmp_path_factory):
    return write_calibration(checkpoint, tmp_path_factory.mktemp("serve") / "calibration")


@pytest.fixture(scope="module")
def server(checkpoint):
    with ThreadServer(load_service(checkpoint, rule="maxprob", threshold=THRESHOLD, max_client_batch=4)) as s:
        yield s


def offline(service, texts, rule, pairs=None):
    tok = service.engine.tokenizer(texts, pairs, padding=True, return_tensors="pt", truncation=True,
                                   max_length=service.engine.max_length)
    return service.engine.model.early_exit(tok["input_ids"], tok["attention_mask"], tok.get("token_type_ids"),
                                           rule=rule)


def post(server, body, route="/predict"):
    return httpx2.post(server.url + route, json=body, timeout=30)


def test_predict_follows_tei_and_matches_offline_early_exit(server):
    single = post(server, {"inputs": TEXTS[0]})
    assert single.status_code == 200
    body = single.json()
    assert [e["label"] for e in body] == sorted(LABELS, key=lambda l: -next(e["score"] for e in body
                                                                           if e["label"] == l))
    assert body[0]["score"] >= body[1]["score"] and abs(sum(e["score"] for e in body) - 1) < 1e-6
    batch = post(server, {"inputs": TEXTS[:4]}).json()
    assert len(batch) == 4 and all(len(answer) == 2 for answer in batch)
    expected = offline(server.service, TEXTS[:4], MaxProb(THRESHOLD))
    probs = expected.logits.softmax(dim=-1)
    for i, answer in enumerate(batch):
        assert {e["exit_layer"] for e in answer} == {int(expected.exit_layer[i])}
        by_label = {e["label"]: e["score"] for e in answer}
        assert by_label == pytest.approx({LABELS[c]: float(probs[i, c]) for c in range(2)}, abs=1e-5)
    assert len(set(int(x) for x in expected.exit_layer)) > 1  # the texts exit at different layers
    root = post(server, {"inputs": TEXTS[0]}, route="/").json()
    assert root == [body]  # the Inference API shape: a list per input


def test_huggingface_inference_client_works_unchanged(server, monkeypatch):
    import huggingface_hub.constants
    from huggingface_hub import InferenceClient

    # the session's offline switch blocks every huggingface_hub request, loopback included; this client talks
    # only to the test server on 127.0.0.1 (base_url), so lift the switch for this test alone
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)

    out = InferenceClient(base_url=server.url).text_classification(TEXTS[2])
    assert [o.label for o in out] == [e["label"] for e in post(server, {"inputs": TEXTS[2]}).json()]
    assert out[0].score >= out[1].score and out[0].exit_layer >= 1


def test_pairs_top_k_raw_scores_and_cost(server):
    pair = post(server, {"inputs": [["good movie", "bad plot"]], "parameters": {"top_k": 1, "return_cost": True}})
    assert pair.status_code == 200
    (only,), = pair.json()
    expected = offline(server.service, ["good movie"], MaxProb(THRESHOLD), pairs=["bad plot"])
    assert only["exit_layer"] == int(expected.exit_layer[0])
    assert only["cost"] == pytest.approx(only["exit_layer"] / 3)
    raw = post(server, {"inputs": "good movie", "raw_scores": True}).json()
    assert max(e["score"] for e in raw) == pytest.approx(float(offline(server.service, ["good movie"],
                                                                     MaxProb(THRESHOLD)).logits.max()), abs=1e-5)


@pytest.mark.parametrize("body,status,words", [
    ({"inputs": ""}, 422, "empty"),
    ({"inputs": ["good", "   "]}, 422, "inputs[1]"),
    ({"inputs": 5}, 422, "list of texts"),
    ({"inputs": ["good", 3]}, 422, "list of texts"),
    ({"inputs": []}, 422, "empty"),
    ({"inputs": [["a", "b", "c"]]}, 422, "pair"),
    ({"inputs": ["good", ["a", "b"]]}, 422, "mix"),
    ({"text": "good"}, 422, "inputs"),
    ({"inputs": "good", "colour": 1}, 422, "colour"),
    ({"inputs": ["good"] * 5}, 413, "max_client_batch_size of 4"),
    ({"inputs": "good " * 40, "truncate": False}, 413, "maximum of 16"),
    ({"inputs": "good", "threshold": 1.5}, 422, "allowed range [0.0, 1.0]"),
    ({"inputs": "good", "parameters": {"threshold": -0.1}}, 422, "allowed range"),
    ({"inputs": "good", "threshold": 0.5, "parameters": {"threshold": 0.6}}, 422, "twice"),
    ({"inputs": "good", "target_accuracy": 0.9}, 422, "--calibration"),
    ({"inputs": "good", "parameters": {"top_k": 0}}, 422, "top_k"),
])
def test_bad_input_gets_a_clear_4xx_and_never_reaches_the_model(server, body, status, words):
    rows_before = server.service.engine.stats.rows_run
    response = post(server, body)
    assert response.status_code == status, response.text
    assert words in response.json()["error"] and response.json()["error_type"]
    assert server.service.engine.stats.rows_run == rows_before


def test_malformed_json_is_a_422(server):
    response = httpx2.post(server.url + "/predict", content=b'{"inputs": "go', timeout=10,
                           headers={"content-type": "application/json"})
    assert response.status_code == 422 and "not valid JSON" in response.json()["error"]


def test_long_inputs_are_truncated_to_the_model_maximum_by_default(server):
    long = "good " * 40
    answer = post(server, {"inputs": long}).json()
    expected = offline(server.service, [long], MaxProb(THRESHOLD))  # the tokenizer's truncation at max_length
    assert answer[0]["exit_layer"] == int(expected.exit_layer[0])


def test_per_request_threshold_changes_exits_like_offline(server):
    for threshold in (0.0, 0.95, 1.0):
        got = [a[0]["exit_layer"] for a in post(server, {"inputs": TEXTS[:4], "threshold": threshold}).json()]
        assert got == offline(server.service, TEXTS[:4], MaxProb(threshold)).exit_layer.tolist()
    assert [a[0]["exit_layer"] for a in post(server, {"inputs": TEXTS[:4], "threshold": 0.0}).json()] == [1] * 4


def test_health_info_docs_and_metrics(server):
    assert httpx2.get(server.url + "/health").json() == {"status": "ok"}
    info = httpx2.get(server.url + "/info").json()
    assert info["num_layers"] == 3 and info["labels"] == LABELS and info["rule"]["params"] == {"threshold": THRESHOLD}
    assert info["scheduler"]["name"] == "layer" and info["scheduler"]["policy"] == "largest"
    assert "/predict" in httpx2.get(server.url + "/openapi.json").json()["paths"]
    assert httpx2.get(server.url + "/docs").status_code == 200
    post(server, {"inputs": TEXTS})  # 5 inputs: a 413, counted
    post(server, {"inputs": TEXTS[:2]})
    text = httpx2.get(server.url + "/metrics").text
    for name in ('layerexit_requests_total{code="200"}', 'layerexit_requests_total{code="413"}',
                 "layerexit_request_latency_seconds_bucket", "layerexit_queue_depth", "layerexit_in_flight",
                 'layerexit_rows_run_total{layer="1"}', "layerexit_exit_layer_bucket", "layerexit_layers_saved_total",
                 "layerexit_padded_tokens_total"):
        assert name in text, name
    answered = float(next(l for l in text.splitlines() if l.startswith("layerexit_inputs_total")).split()[-1])
    saved = float(next(l for l in text.splitlines() if l.startswith("layerexit_layers_saved_total")).split()[-1])
    assert answered >= 2 and 0 <= saved <= 2 * answered


def test_full_queue_answers_503_with_retry_after(checkpoint):
    service = load_service(checkpoint, rule="maxprob", threshold=0.8, scheduler="batch", max_wait_ms=3000,
                           max_queue=2)
    with ThreadServer(service) as s:
        first = threading.Thread(target=post, args=(s, {"inputs": TEXTS[:2]}))
        first.start()
        deadline = time.monotonic() + 20
        while service.scheduler.queue_depth < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        response = post(s, {"inputs": TEXTS[2]})
        assert response.status_code == 503 and response.headers["retry-after"] == "1"
        assert "queue is full" in response.json()["error"]
        first.join(30)


class Exploding(MaxProb):
    def should_exit(self, logits, layer, state):
        raise RuntimeError("boom")


def test_a_failing_request_gets_500_and_the_server_goes_on(checkpoint):
    service = load_service(checkpoint, rule="maxprob", threshold=0.8)
    service.rules._cache[("threshold", 0.123)] = Exploding(0.123)  # this request's rule raises inside the step
    with ThreadServer(service) as s:
        bad = post(s, {"inputs": TEXTS[0], "threshold": 0.123})
        assert bad.status_code == 500 and "boom" in bad.json()["error"]
        assert post(s, {"inputs": TEXTS[:2]}).status_code == 200
        assert service.scheduler.errors == 1


def test_target_accuracy_per_request_with_a_calibration(checkpoint, calibration):
    service = load_service(checkpoint, calibration=calibration, target_accuracy=0.8)
    pcee = service.rules.base
    with ThreadServer(service) as s:
        for target in (0.5, 0.99):
            got = [a[0]["exit_layer"] for a in post(s, {"inputs": TEXTS, "target_accuracy": target}).json()]
            tok = service.engine.tokenizer(TEXTS, padding=True, return_tensors="pt")
            want = service.engine.model.early_exit(tok["input_ids"], tok["attention_mask"], tok["token_type_ids"],
                                                   rule=pcee.with_target(target)).exit_layer.tolist()
            assert got == want
        for body, words in (({"target_accuracy": 1.5}, "allowed range (0, 1]"), ({"threshold": 0.9}, "no threshold")):
            response = post(s, {"inputs": "good", **body})
            assert response.status_code == 422 and words in response.json()["error"]
        assert httpx2.get(s.url + "/info").json()["rule"]["name"] == "pcee-ws"


def test_a_backend_serves_its_own_layers(checkpoint):
    """--backend int8: the service runs the int8 layers, and answers as the int8 model does offline."""
    service = load_service(checkpoint, rule="maxprob", threshold=THRESHOLD, backend="int8")
    assert service.engine.model.backend.name == "int8"
    want = offline(service, TEXTS, MaxProb(THRESHOLD))
    with ThreadServer(service) as s:
        got = post(s, {"inputs": TEXTS}).json()
    assert [a[0]["exit_layer"] for a in got] == want.exit_layer.tolist()
    with pytest.raises(LayerExitError, match="backend='int4'"):
        load_service(checkpoint, backend="int4")


def test_budget_server_reports_its_controller(checkpoint, calibration):
    service = load_service(checkpoint, calibration=calibration, budget=0.6)
    controller = service.rules.controller
    with ThreadServer(service) as s:
        answers = post(s, {"inputs": TEXTS})
        assert answers.status_code == 200 and len(answers.json()) == 5
        info = httpx2.get(s.url + "/info").json()["rule"]
        assert info["name"] == "budget" and info["budget"]["budget"] == 0.6
        assert len(controller._observed) == 5  # the controller saw every exit of its own rows
        assert controller.window_cost() == pytest.approx(sum(a[0]["exit_layer"] for a in answers.json()) / 15)
        post(s, {"inputs": TEXTS[:2], "threshold": 0.9})  # an explicit threshold is outside the budget
        assert len(controller._observed) == 5
        assert "layerexit_budget_threshold" in httpx2.get(s.url + "/metrics").text


def test_serve_without_a_model_says_how_to_get_one(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["serve"]) == 2
    assert "make demo" in capsys.readouterr().err


def test_sigterm_answers_every_accepted_request_then_exits(checkpoint):
    with Server("--model", str(checkpoint), "--scheduler", "batch", "--max-wait-ms", "2000") as s:
        results: list = [None] * 12

        def ask(i):
            results[i] = httpx2.post(s.url + "/predict", json={"inputs": TEXTS[i % 5]}, timeout=60)

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(12)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # every request accepted and waiting in the batch window
            metrics = httpx2.get(s.url + "/metrics", timeout=5).text
            if "layerexit_queue_depth 12.0" in metrics:
                break
            time.sleep(0.05)
        else:
            pytest.fail("requests were not queued")
        s.proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(60)
        code = s.proc.wait(60)
        assert [r.status_code for r in results] == [200] * 12
        assert all(r.json()[0]["exit_layer"] >= 1 for r in results)
        assert code in (0, -signal.SIGTERM)  # uvicorn re-raises the signal after its graceful shutdown
        with pytest.raises(httpx2.HTTPError):
            httpx2.get(s.url + "/health", timeout=2)


@pytest.mark.parametrize("argv,words", [
    (["--max-wait-ms", "-1"], "max_wait_ms=-1.0"),
    (["--max-batch", "0"], "max_batch=0"),
    (["--rule", "maxprob", "--threshold", "2"], "maxprob.threshold=2.0"),
    (["--rule", "nosuch"], "nosuch"),
    (["--budget", "0.5"], "--calibration"),
])
def test_serve_refuses_bad_options_with_a_clear_error(checkpoint, capsys, argv, words):
    assert main(["serve", "--model", str(checkpoint), *argv]) == 2
    assert words in capsys.readouterr().err


def test_a_server_process_that_cannot_start_raises_with_its_output(tmp_path):
    with pytest.raises(RuntimeError, match=r"server exited with 2: .*missing"):
        Server("--model", str(tmp_path / "missing"))
