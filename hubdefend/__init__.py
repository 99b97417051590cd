"""hubdefend: find and remove backdoors in vision models shared on the Hugging Face Hub."""

from __future__ import annotations

__version__ = "0.1.0"

from hubdefend.adapters import LoadedModel, discover  # noqa: E402
from hubdefend.bake import PruningPlan, bake  # noqa: E402
from hubdefend.errors import HubDefendError  # noqa: E402
from hubdefend.masks import NeuronMasks, is_masked, masked  # noqa: E402
from hubdefend.model_io import save  # noqa: E402
from hubdefend.neurons import NeuronGroup  # noqa: E402

# `hubdefend.sanitize` names the function (as the API promises); the module stays importable as
# ``from hubdefend.sanitize import ...``.
from hubdefend.sanitize import SanitizeResult, sanitize  # noqa: E402
from hubdefend.sources import load  # noqa: E402

__all__ = [
    "HubDefendError",
    "LoadedModel",
    "NeuronGroup",
    "NeuronMasks",
    "PruningPlan",
    "SanitizeResult",
    "__version__",
    "bake",
    "discover",
    "is_masked",
    "load",
    "masked",
    "sanitize",
    "save",
]
