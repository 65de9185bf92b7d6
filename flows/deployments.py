"""Publish every flow as a deployment of a running Prefect server (`make server`), then serve them.

Each deployment carries the preset's full config as its default parameters, so the UI shows the pipeline's
configuration as a form (from the pydantic models) and `prefect deployment run` can override any field.
"""

from __future__ import annotations

import os

from t2i.flows.config import PipelineConfig


def serve_flows(cfg: PipelineConfig, name: str | None = None, limit: int | None = None) -> None:
    from prefect import serve
    from prefect.types.entrypoint import EntrypointType

    from t2i.flows.ablation import ablation_flow
    from t2i.flows.pipeline import STAGE_FLOWS, pipeline_flow

    if not os.environ.get("PREFECT_API_URL"):
        from prefect.settings import PREFECT_API_URL

        if not PREFECT_API_URL.value():
            raise RuntimeError(
                "t2i serve needs a Prefect server: start one with `make server` and set "
                "PREFECT_API_URL=http://127.0.0.1:4200/api"
            )
    name = name or cfg.preset
    params = {"cfg": cfg.model_dump(mode="json")}
    # Module entrypoints (`t2i.flows.pipeline.pipeline_flow`) load the installed package wherever the
    # worker's working directory is; a file entrypoint would import the flow's file a second time.
    deployments = [
        f.to_deployment(
            name=name,
            parameters=params,
            tags=["t2i", name],
            enforce_parameter_schema=True,
            entrypoint_type=EntrypointType.MODULE_PATH,
        )
        for f in (pipeline_flow, *STAGE_FLOWS.values(), ablation_flow)
    ]
    serve(*deployments, limit=limit)
