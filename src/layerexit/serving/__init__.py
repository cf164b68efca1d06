"""Serving early-exit models under live traffic: an engine stepped one layer at a time, schedulers that batch
rows per request, per batch or per layer, an online budget controller and a FastAPI app (``layerexit serve``).

The library never imports :mod:`layerexit.cli`; FastAPI, uvicorn and prometheus-client are imported only by
:mod:`layerexit.serving.app` (the ``serve`` extra).
"""

from .engine import Engine, InputTooLong, Prediction, Row
from .schedulers import POLICIES, SCHEDULERS, QueueFull, Scheduler, ShuttingDown, make_scheduler

__all__ = ["Engine", "InputTooLong", "Prediction", "Row", "POLICIES", "SCHEDULERS", "QueueFull", "Scheduler",
           "ShuttingDown", "make_scheduler"]
