"""Shared test setup.

# ---- Local Hub (owned by tests/hub_server.py) -------------------------------------------------
huggingface_hub reads HF_ENDPOINT, HF_HOME, the token and HF_HUB_OFFLINE at import time, so ONE
in-memory Hub is started and the environment set HERE, before anything imports huggingface_hub,
timm, transformers or hubdefend. Subprocesses (the CLI, `hf ...`) inherit the same environment.
Add other fixtures BELOW the "end of local Hub section" marker.
"""

from __future__ import annotations

import atexit
import os
import tempfile
import uuid

from tests.hub_server import HubServer

HUB = HubServer()
HUB_ENDPOINT = HUB.start()
atexit.register(HUB.stop)
HF_TOKEN = "hf_test_token"
HF_HOME = tempfile.mkdtemp(prefix="hubdefend-hf-home-")

os.environ.update(
    HF_ENDPOINT=HUB_ENDPOINT,
    HUBDEFEND_TEST_HUB_ENDPOINT=HUB_ENDPOINT,
    HF_HOME=HF_HOME,
    HF_TOKEN=HF_TOKEN,
    HF_HUB_DISABLE_TELEMETRY="1",
    DISABLE_SAFETENSORS_CONVERSION="1",
    NO_PROXY="127.0.0.1,localhost",
    no_proxy="127.0.0.1,localhost",
)
for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
    os.environ.pop(_var, None)

import pytest  # noqa: E402  (after the environment on purpose)


@pytest.fixture(scope="session")
def hub_server() -> HubServer:
    """The session's in-memory Hub: `repo_files`, `commits`, `fail_next_commit`, `set_gated`, ..."""
    return HUB


@pytest.fixture(scope="session")
def hub_endpoint() -> str:
    return HUB_ENDPOINT


@pytest.fixture
def repo_id() -> str:
    """A fresh, not yet created, repo id for this test."""
    return f"org/t-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def hf_api():
    from huggingface_hub import HfApi

    return HfApi(endpoint=HUB_ENDPOINT, token=HF_TOKEN)


# ---- end of local Hub section: other fixtures go below ----------------------------------------
