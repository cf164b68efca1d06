"""Scale-out on Ray Serve: the same service (engine, rules, scheduler, FastAPI app) in N replicas.

Each replica loads the model and runs its own scheduler behind the app of :mod:`layerexit.serving.app`, wrapped
with ``serve.ingress`` (Ray runs the app's lifespan, so the scheduler starts and drains with the replica); Ray
Serve's proxy spreads requests over the replicas. No load balancer of our own. Needs ``pip install
'layerexit[ray]'``.

On a cluster: ``ray start --head`` on one machine and ``ray start --address=HEAD:6379`` on the others, then
``layerexit serve --ray --ray-address auto --replicas N ...`` from a machine of the cluster (the model folder must
be readable at the same path on every node).
"""

from __future__ import annotations

import signal
import threading
from typing import Any


def deployment(replicas: int = 1, cpus_per_replica: float = 1.0, **service_kwargs: Any):
    """A bound Ray Serve application of ``replicas`` copies of the service built by ``load_service(**kwargs)``."""
    from ray import serve

    @serve.deployment(name="layerexit", num_replicas=int(replicas),
                      ray_actor_options={"num_cpus": float(cpus_per_replica)})
    @serve.ingress()
    class LayerExitReplica:
        def __init__(self, kwargs: dict):
            from .service import load_service

            self.service = load_service(**kwargs)

        def __serve_build_asgi_app__(self):
            from .app import create_app

            return create_app(self.service)

    return LayerExitReplica.bind(service_kwargs)


def run(replicas: int, host: str = "127.0.0.1", port: int = 8080, address: str | None = None,
        cpus_per_replica: float = 1.0, **service_kwargs: Any) -> None:
    """Start (or join) Ray, deploy, and serve until SIGINT/SIGTERM; then shut the application down."""
    import ray
    from ray import serve

    ray.init(address=address, include_dashboard=False, ignore_reinit_error=True)
    serve.start(http_options={"host": host, "port": int(port)})
    serve.run(deployment(replicas, cpus_per_replica, **service_kwargs), name="layerexit", route_prefix="/")
    print(f"layerexit serve: {replicas} Ray Serve replica(s) on http://{host}:{port}", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    serve.shutdown()  # replicas finish their in-flight requests (Ray's graceful shutdown) before they go
    ray.shutdown()
