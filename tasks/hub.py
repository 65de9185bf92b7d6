"""The Hugging Face Hub token: from $HF_TOKEN, else a Prefect Secret block named `hf-token`; never logged."""

from __future__ import annotations

import os


def hub_token() -> str | None:
    token = os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")
    if token:
        return token
    try:
        from prefect.blocks.system import Secret

        return Secret.load("hf-token").get()
    except Exception:  # no server, no block: anonymous access
        return None
