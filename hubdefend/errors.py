"""Every error hubdefend raises on purpose.

Each class names what went wrong and what to do about it; the CLI prints the message (no traceback,
unless ``HUBDEFEND_DEBUG=1``) and exits non-zero. Subclasses also inherit the builtin they refine, so
``except ValueError`` keeps working for callers that do not know hubdefend.
"""

from __future__ import annotations


class HubDefendError(Exception):
    """Root of every error hubdefend raises on purpose."""


class NoNormLayersError(HubDefendError, ValueError):
    """The model has no normalization layer, so there is no neuron to mask or prune."""

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        super().__init__(
            f"{model_name} has no normalization layer (BatchNorm, LayerNorm, GroupNorm, RmsNorm, ...), so "
            "hubdefend has no neurons to mask or prune. Use a defense that changes weights rather than norm "
            "channels, or pick a variant of the architecture with normalization layers."
        )


class NotAModelError(HubDefendError, FileNotFoundError):
    """A path that should hold a saved model does not."""


class UnknownArchitectureError(HubDefendError, ValueError):
    """A config names an architecture that the model family does not know."""


class WeightsMismatchError(HubDefendError, ValueError):
    """Saved weights do not fit the architecture their config describes."""


class MaskError(HubDefendError, RuntimeError):
    """Masks cannot be attached, detached or baked as asked."""


class PlanError(HubDefendError, ValueError):
    """A pruning plan names layers or neurons that the model does not have."""


class TriggerSpecError(HubDefendError, ValueError):
    """A trigger spec string or JSON object is malformed or names an unknown trigger or option."""


class DataError(HubDefendError, ValueError):
    """Defender or evaluation data is missing, malformed or does not fit the model."""


class UnknownDefenseError(HubDefendError, KeyError):
    """No defense is registered under the name asked for."""

    def __init__(self, name: str, known: list[str]) -> None:
        self.name = name
        super().__init__(f"No defense named {name!r}. Choose one of: {', '.join(known)}.")

    def __str__(self) -> str:  # KeyError would quote the message
        return self.args[0]


class DefenseError(HubDefendError, RuntimeError):
    """A defense cannot run on this model or data as asked."""
