"""The HTTP API of ``layerexit serve``: FastAPI + uvicorn, Prometheus metrics through prometheus-client.

Routes follow text-embeddings-inference's sequence-classification API (``POST /predict``) and the Hugging Face
Inference API's text-classification shape (``POST /``), so that existing clients work unchanged, including
``huggingface_hub.InferenceClient(base_url=...).text_classification(text)``:

- body ``{"inputs": str | [str] | [[str, str]], "truncate": bool, "raw_scores": bool,
  "parameters": {"threshold": ..., "target_accuracy": ..., "top_k": ..., "function_to_apply": ...,
  "return_cost": bool}}`` (``threshold``, ``target_accuracy`` and ``return_cost`` may also sit at the top level);
- answer per input: a list of ``{"label", "score", "exit_layer"}`` (and ``"cost"``, the fraction of the full
  model's layers that input ran, when ``return_cost`` is set), highest score first. ``/predict`` answers one
  list for a single string and a list of lists for a list (TEI); ``/`` always answers a list of lists (the
  Inference API, which ``InferenceClient`` parses).

Errors never reach the model: 422 for malformed JSON, wrong types, empty text or out-of-range parameters (the
message names the field and the allowed range), 413 for more than ``max_client_batch_size`` inputs or, with
``"truncate": false``, an input longer than the model's maximum (by default longer inputs are cut to the
model's ``max_length`` tokens by the tokenizer, which keeps the special tokens and shortens the longer text of a
pair first), 503 with ``Retry-After`` when the queue is full or the server is draining. Errors have TEI's
shape ``{"error": message, "error_type": kind}``.

SIGTERM (uvicorn's graceful shutdown): the listening socket closes, every accepted request is answered, then
the scheduler drains and stops, and the process exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from pydantic import BaseModel, ConfigDict, Field

from ..errors import LayerExitError
from .engine import InputTooLong, Prediction
from .schedulers import QueueFull, ShuttingDown
from .service import RequestError, Service

Text = str
Pair = list[str]


class Parameters(BaseModel):
    """Per-request options (Hugging Face Inference API style)."""

    model_config = ConfigDict(extra="forbid")
    threshold: float | None = Field(None, description="this request's confidence threshold (rules with one)")
    target_accuracy: float | None = Field(None, description="this request's target accuracy δ (PCEE servers)")
    top_k: int | None = Field(None, ge=1, description="return only the k best labels")
    function_to_apply: Literal["softmax", "none"] | None = Field(None, description="'none': raw logits as scores")
    return_cost: bool = Field(False, description="add 'cost': fraction of the full model's layers run")


class PredictRequest(BaseModel):
    """A text-embeddings-inference ``/predict`` body, plus layerexit's per-request controls."""

    model_config = ConfigDict(extra="forbid")
    inputs: Text | list[Text | Pair] = Field(..., description="a text, a list of texts, or of [text, text] pairs")
    truncate: bool = Field(True, description="cut inputs longer than the model's maximum (false: refuse, 413)")
    truncation_direction: Literal["right", "Right"] = "right"
    raw_scores: bool = Field(False, description="scores are raw logits instead of probabilities")
    threshold: float | None = None
    target_accuracy: float | None = None
    return_cost: bool = False
    parameters: Parameters | None = None


class LabelScore(BaseModel):
    label: str
    score: float
    exit_layer: int = Field(..., description="the exit that answered (1-based; the last layer is the full model)")
    cost: float | None = Field(None, description="fraction of the full model's layers run (with return_cost)")


class ErrorBody(BaseModel):
    error: str
    error_type: str


def _error(status: int, message: str, kind: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message, "error_type": kind}, status_code=status, headers=headers)


class _Metrics:
    """Prometheus metrics of one app (its own registry, so several apps can live in one process)."""

    def __init__(self, service: Service):
        self.registry = registry = CollectorRegistry()
        layers = service.engine.num_layers
        self.requests = Counter("layerexit_requests", "HTTP prediction requests by status code", ["code"],
                                registry=registry)
        self.latency = Histogram("layerexit_request_latency_seconds", "prediction request latency (successful)",
                                 buckets=(.001, .0025, .005, .01, .02, .04, .08, .16, .32, .64, 1.28, 2.56, 5.12),
                                 registry=registry)
        self.inputs = Counter("layerexit_inputs", "inputs answered", registry=registry)
        self.exit_layer = Histogram("layerexit_exit_layer", "exit layer of each answered input (1-based)",
                                    buckets=tuple(range(1, layers + 1)), registry=registry)
        self.saved = Counter("layerexit_layers_saved", "layers not run thanks to early exits", registry=registry)
        Gauge("layerexit_queue_depth", "inputs accepted and waiting to start", registry=registry
              ).set_function(lambda: service.scheduler.queue_depth)
        Gauge("layerexit_in_flight", "inputs started and not yet answered", registry=registry
              ).set_function(lambda: service.scheduler.in_flight)
        registry.register(_EngineCollector(service))

        def observe(row, prediction: Prediction) -> None:
            self.inputs.inc()
            self.exit_layer.observe(prediction.exit_layer)
            self.saved.inc(layers - prediction.exit_layer)

        service.engine.observers.append(observe)


class _EngineCollector:
    """Counters kept by the engine and scheduler, read at scrape time."""

    def __init__(self, service: Service):
        self.service = service

    def collect(self):
        stats = self.service.engine.stats
        rows = CounterMetricFamily("layerexit_rows_run", "rows run through each layer (layer steps x rows)",
                                   labels=["layer"])
        for layer, count in enumerate(stats.rows_per_layer):
            rows.add_metric([str(layer + 1)], count)
        yield rows
        yield CounterMetricFamily("layerexit_layer_steps", "layer steps run (one layer for a group of rows)",
                                  value=stats.steps)
        yield CounterMetricFamily("layerexit_padded_tokens", "tokens computed as padding of a shared step",
                                  value=stats.padded_tokens)
        yield CounterMetricFamily("layerexit_real_tokens", "tokens of real inputs computed", value=stats.real_tokens)
        yield CounterMetricFamily("layerexit_scheduler_errors", "steps that raised", value=self.service.scheduler.errors)
        controller = self.service.rules.controller
        if controller is not None:
            yield GaugeMetricFamily("layerexit_budget_threshold", "current max-prob threshold of the budget",
                                    value=controller.threshold if math.isfinite(controller.threshold) else 2.0)
            window = controller.window_cost()
            yield GaugeMetricFamily("layerexit_budget_window_cost", "average cost of the last window of inputs",
                                    value=window if window is not None else float("nan"))


def create_app(service: Service) -> FastAPI:
    """The FastAPI app for ``service``; starting it starts the scheduler, stopping it drains the scheduler."""
    metrics = _Metrics(service)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        service.scheduler.start()
        try:
            yield
        finally:  # uvicorn answers every accepted request before this runs; finish whatever remains
            await asyncio.to_thread(service.scheduler.stop, True)

    app = FastAPI(title="layerexit serve", version="1", lifespan=lifespan,
                  description="Early-exit sequence classification (text-embeddings-inference `/predict` API); "
                              "every answer says which exit layer produced it.")
    app.state.service, app.state.metrics = service, metrics

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "body"
        if first.get("type") == "json_invalid":
            message = f"the body is not valid JSON: {first.get('msg')}; send {{\"inputs\": \"some text\"}}"
        elif where.startswith("inputs"):
            message = (f"inputs: give a text, a list of texts, or a list of [text, text] pairs (got "
                       f"{first.get('input')!r})")
        else:
            message = f"{where}: {first.get('msg')} (got {first.get('input')!r})"
        metrics.requests.labels("422").inc()
        return _error(422, message, "validation")

    async def predict(body: PredictRequest, nested_single: bool) -> Response:
        started = time.perf_counter()
        response = await _predict(service, body, nested_single)
        metrics.requests.labels(str(response.status_code)).inc()
        if response.status_code == 200:
            metrics.latency.observe(time.perf_counter() - started)
        return response

    responses = {413: {"model": ErrorBody}, 422: {"model": ErrorBody}, 503: {"model": ErrorBody}}

    @app.post("/predict", response_model=list[LabelScore] | list[list[LabelScore]], responses=responses,
              summary="Classify texts or text pairs (text-embeddings-inference /predict)")
    async def predict_route(body: PredictRequest):
        return await predict(body, nested_single=False)

    @app.post("/", response_model=list[list[LabelScore]], responses=responses,
              summary="Classify (Hugging Face Inference API shape: always a list per input)")
    async def root_route(body: PredictRequest):
        return await predict(body, nested_single=True)

    @app.get("/health", summary="200 while serving, 503 while draining")
    async def health():
        if not service.scheduler.accepting:
            return _error(503, "draining before shutdown", "unhealthy")
        return {"status": "ok"}

    @app.get("/info", summary="model, layers, rule and its parameters, scheduler")
    async def info():
        return service.info()

    @app.get("/metrics", summary="Prometheus metrics")
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


async def _predict(service: Service, body: PredictRequest, nested_single: bool) -> Response:
    params = body.parameters or Parameters()
    threshold = _one("threshold", body.threshold, params.threshold)
    target = _one("target_accuracy", body.target_accuracy, params.target_accuracy)
    if isinstance(threshold, JSONResponse):
        return threshold
    if isinstance(target, JSONResponse):
        return target
    single = isinstance(body.inputs, str)
    items = [body.inputs] if single else list(body.inputs)
    if not items:
        return _error(422, "inputs: the list is empty; send at least one text", "validation")
    if len(items) > service.max_client_batch:
        return _error(413, f"inputs: {len(items)} inputs is more than this server's max_client_batch_size of "
                      f"{service.max_client_batch}; split the request", "validation")
    texts, pairs = [], []
    for i, item in enumerate(items):
        if isinstance(item, list) and not 1 <= len(item) <= 2:
            return _error(422, f"inputs[{i}]: a pair is [text, text]; got {len(item)} texts", "validation")
        parts = [item] if isinstance(item, str) else item
        for part in parts:
            if not part.strip():
                return _error(422, f"inputs[{i}]: the text is empty; send non-empty text", "validation")
        texts.append(parts[0])
        pairs.append(parts[1] if len(parts) == 2 else None)
    has_pairs = [p is not None for p in pairs]
    if any(has_pairs) and not all(has_pairs):
        return _error(422, "inputs: mix of single texts and pairs; send one kind per request", "validation")
    try:
        futures = service.submit(texts, pairs if all(has_pairs) else None, threshold=threshold,
                                 target_accuracy=target, truncate=body.truncate)
    except RequestError as err:
        return _error(422, str(err), "validation")
    except InputTooLong as err:
        return _error(413, str(err), "validation")
    except QueueFull as err:
        return _error(503, str(err), "overloaded", {"Retry-After": str(math.ceil(err.retry_after))})
    except ShuttingDown as err:
        return _error(503, str(err), "unavailable", {"Retry-After": "1"})
    except LayerExitError as err:
        return _error(422, str(err), "validation")
    try:
        predictions = await asyncio.gather(*(asyncio.wrap_future(f) for f in futures))
    except Exception as err:  # noqa: BLE001 - a failure while running these inputs: reported, server goes on
        return _error(500, f"running the model failed: {type(err).__name__}: {err}", "backend")
    labels = service.engine.labels
    raw = body.raw_scores or params.function_to_apply == "none"
    out = []
    for p in predictions:
        scores = p.logits if raw else p.probabilities
        entries = [{"label": labels[c], "score": float(scores[c]), "exit_layer": p.exit_layer}
                   | ({"cost": p.cost} if (body.return_cost or params.return_cost) else {})
                   for c in range(len(labels))]
        entries.sort(key=lambda e: -e["score"])
        out.append(entries[: params.top_k] if params.top_k else entries)
    return JSONResponse(out[0] if single and not nested_single else out)


def _one(name: str, top: float | None, nested: float | None):
    if top is not None and nested is not None and top != nested:
        return _error(422, f"{name} is given twice ({top} and parameters.{name}={nested}); give it once",
                      "validation")
    return top if top is not None else nested


def make_server(service: Service, host: str = "127.0.0.1", port: int = 8080, log_level: str = "info"):
    """A uvicorn server for ``service`` (call ``.run()``; set ``.should_exit`` to stop it from another thread)."""
    import uvicorn

    config = uvicorn.Config(create_app(service), host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=None, access_log=False)
    return uvicorn.Server(config)


def serve(service: Service, host: str = "127.0.0.1", port: int = 8080, log_level: str = "info") -> None:
    """Run the app under uvicorn until SIGINT/SIGTERM (graceful: accepted requests are answered)."""
    make_server(service, host, port, log_level).run()
