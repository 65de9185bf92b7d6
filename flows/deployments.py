"""`t2i serve`: publish every flow as a deployment of a running Prefect server (`make server`) and serve them
from this one process: the laptop way. A team deploys to a work pool instead (`t2i.flows.service`).

Each deployment carries the preset's full config as its default parameters, so the UI shows the pipeline's
configuration as a form (from the pydantic models) and `prefect deployment run` can override any field.
"""

from __future__ import annotations

from t2i.flows.config import PipelineConfig
from t2i.flows.service import flow_deployments, require_server


def serve_flows(cfg: PipelineConfig, name: str | None = None, limit: int | None = 1) -> None:
    from prefect import serve

    require_server("t2i serve")
    serve(*flow_deployments(cfg, name or cfg.preset), limit=limit)
