"""hubdefend: find and remove backdoors in vision models shared on the Hugging Face Hub."""

from __future__ import annotations

__version__ = "0.1.0"

from hubdefend.errors import HubDefendError  # noqa: E402

__all__ = ["HubDefendError", "__version__"]
