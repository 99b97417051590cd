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
import torch  # noqa: E402


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


# ---- Backdoored fixtures ------------------------------------------------------------------------
# A tiny timm ResNet trained inside the session on 4000 Fashion-MNIST images (32x32, 3 channels) with
# 10% BadNets poisoning, and the same model trained without poisoning. About 10 s each on 2 cores.
from hubdefend.example import RECIPE as TINY_RECIPE  # noqa: E402  (the bundled example's recipe)


class TinyBackdoor:
    """A trained tiny model, where it is saved, and the clean data a defender and an evaluator get."""

    def __init__(self, folder, backdoored) -> None:
        from hubdefend.data import load_data
        from hubdefend.preprocess import Preprocessing
        from hubdefend.triggers import parse_trigger

        self.folder = folder
        self.model = backdoored.model
        self.record = backdoored.record
        self.trigger = parse_trigger(self.record["trigger"])
        self.preprocessing = Preprocessing.from_timm(self.model)
        train = load_data("fmnist:train", self.preprocessing)
        # Defender images come from the part of the training set the model was not trained on.
        self.defender = torch.utils.data.Subset(train, range(50000, 50625))
        self.test = load_data("fmnist:test", self.preprocessing, limit=2000)


def _train_tiny(tmp_path_factory, name: str, **overrides) -> TinyBackdoor:
    from hubdefend.factory import AttackRecipe, make_backdoored

    folder = tmp_path_factory.mktemp("fixtures") / name
    # Trained with 2 threads whatever OMP_NUM_THREADS says: the thread count changes the float sums,
    # and the ResNet-18 fixture's backdoor is planted with 2 threads (ASR 92.6%) but not with 1 (4.7%).
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        backdoored = make_backdoored(AttackRecipe(**{**TINY_RECIPE, **overrides}), folder, progress=False)
    finally:
        torch.set_num_threads(threads)
    return TinyBackdoor(folder, backdoored)


@pytest.fixture(scope="session")
def tiny_backdoor(tmp_path_factory) -> TinyBackdoor:
    return _train_tiny(tmp_path_factory, "tiny-badnets")


@pytest.fixture(scope="session")
def resnet18_backdoor(tmp_path_factory) -> TinyBackdoor:
    """The efficacy fixture: the same recipe on timm ``resnet18`` (about 50 s on 2 cores).

    ``test_resnet`` has one block per stage and 16 to 192 channels: clean and backdoor features share
    its few neurons, and no defense separates them (ANP's best sweep point there: ASR 50% at -2 BA
    points). ResNet-18's 4800 norm channels are the width the defenses were designed for.
    """
    return _train_tiny(tmp_path_factory, "resnet18-badnets", architecture="resnet18")


@pytest.fixture(scope="session")
def tiny_clean(tmp_path_factory) -> TinyBackdoor:
    return _train_tiny(tmp_path_factory, "tiny-clean", poison_rate=0.0)
