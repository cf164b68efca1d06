"""`layerexit serve`: serve an early-exit classifier over HTTP (FastAPI + uvicorn, Prometheus metrics).

The API follows text-embeddings-inference (`POST /predict`, `POST /`, `GET /health`, `/info`, `/metrics`,
OpenAPI docs at `/docs`); each answer carries the exit layer that produced it. Rule sources: `--rule` and
`--threshold` (or `--param`), `--calibration DIR --target-accuracy T` (PCEE-WS from `layerexit calibrate`), or
`--budget B --calibration DIR` (online budget controller). See docs/serving.md.

Needs the `serve` extra: pip install 'layerexit[serve]'.
"""

from __future__ import annotations

from ..catalog import BACKENDS
from .common import command_parser

EXAMPLES = """examples:
  layerexit serve --model runs/rt/best --rule maxprob --threshold 0.9
  layerexit serve --model runs/sst2/best --calibration runs/sst2/calibration --target-accuracy 0.85
  layerexit serve --model runs/sst2/best --calibration runs/sst2/calibration --budget 0.5 --scheduler layer
  curl -s localhost:8080/predict -H 'content-type: application/json' -d '{"inputs": "a gripping film"}'
"""


def add_parser(subparsers):
    p = command_parser(subparsers, "serve", "serve a model over HTTP with per-layer batching and early exit",
                       __doc__, EXAMPLES)
    p.add_argument("--model", help="checkpoint folder (default: the model `make demo` wrote, runs/demo/model/best)")
    rules = p.add_argument_group("exit rule (one source)")
    rules.add_argument("--rule", help="exit rule name, as `layerexit list` shows (default maxprob; with "
                       "--calibration: pcee-ws)")
    rules.add_argument("--threshold", type=float, help="the rule's threshold (default: the rule's own)")
    rules.add_argument("--param", action="append", help="other rule parameter NAME=VALUE (repeatable)")
    rules.add_argument("--calibration", help="folder written by `layerexit calibrate` (rules.json, fit_logits.pt)")
    rules.add_argument("--target-accuracy", type=float, help="serve PCEE(-WS) at this target accuracy")
    rules.add_argument("--budget", type=float, help="hold the average cost at this fraction of the full model's, "
                       "online (needs --calibration)")
    net = p.add_argument_group("server")
    net.add_argument("--host", default="127.0.0.1", help="address to listen on")
    net.add_argument("--port", type=int, default=8080)
    net.add_argument("--scheduler", default="layer", choices=["layer", "batch", "none"],
                     help="per-layer re-batching, dynamic batching, or one request at a time")
    net.add_argument("--policy", default="largest", choices=["largest", "deepest"],
                     help="which layer the `layer` scheduler runs next")
    net.add_argument("--max-batch", type=int, default=64, help="rows per batch / per layer step")
    net.add_argument("--max-wait-ms", type=float, default=5.0, help="longest wait to fill a batch (`batch`)")
    net.add_argument("--max-queue", type=int, default=1024, help="rows accepted and unanswered before 503")
    net.add_argument("--max-client-batch", type=int, default=32, help="most inputs in one request (else 413)")
    net.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    net.add_argument("--backend", default="eager", choices=sorted(BACKENDS),
                     help="layer backend (docs/backends.md); a saved CHECKPOINT/optimized/<backend>/ is used")
    ray = p.add_argument_group("scale-out on Ray Serve (pip install 'layerexit[ray]')")
    ray.add_argument("--ray", action="store_true", help="serve through Ray Serve replicas of the same service")
    ray.add_argument("--replicas", type=int, default=1, help="number of replicas (with --ray)")
    ray.add_argument("--ray-address", help="Ray cluster to join (e.g. auto); default: start a local Ray")
    ray.add_argument("--cpus-per-replica", type=float, default=1.0, help="Ray CPUs reserved per replica")
    net.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(run=run)
    return p


def run(args) -> int:  # heavy imports here, not at parse time
    from ..serving.service import load_service
    from .common import parse_rule_params

    kwargs = dict(rule=args.rule, threshold=args.threshold, params=parse_rule_params(args.param),
                  calibration=args.calibration, target_accuracy=args.target_accuracy, budget=args.budget,
                  scheduler=args.scheduler, policy=args.policy, max_batch=args.max_batch,
                  max_wait_ms=args.max_wait_ms, max_queue=args.max_queue, max_client_batch=args.max_client_batch,
                  threads=args.threads, backend=args.backend)
    if args.ray:
        return _run_ray(args, kwargs)

    try:
        from ..serving.app import serve
    except ImportError as err:
        from ..errors import LayerExitError

        raise LayerExitError(f"`layerexit serve` needs FastAPI, uvicorn and prometheus-client ({err}): "
                             "pip install 'layerexit[serve]'") from None
    service = load_service(args.model, **kwargs)
    info = service.info()
    print(f"layerexit serve: {info['model_id']} ({info['num_layers']} layers), rule {info['rule']['name']} "
          f"{info['rule']['params']}, scheduler {args.scheduler}; http://{args.host}:{args.port}/docs", flush=True)
    serve(service, args.host, args.port, args.log_level)
    return 0


def _run_ray(args, kwargs: dict) -> int:
    from pathlib import Path

    from ..errors import LayerExitError, bad_value
    from ..serving.service import find_default_model

    try:
        from ..serving import ray_deploy
    except ImportError as err:  # pragma: no cover - depends on the optional extra
        raise LayerExitError(f"--ray needs Ray Serve ({err}): pip install 'layerexit[ray]'") from None
    if args.replicas < 1:
        raise bad_value("--replicas", args.replicas, "use a whole number of replicas >= 1")
    model = args.model or find_default_model()
    if model is None:
        raise bad_value("--model", None, "no model given and none from `make demo` here: pass --model DIR")
    ray_deploy.run(args.replicas, args.host, args.port, args.ray_address, args.cpus_per_replica,
                   model=str(Path(model).resolve()), **kwargs)
    return 0
