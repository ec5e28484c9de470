"""Generator-facing types shared by every instance generator (no heavy imports)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

from ..quality import ALPHA_THRESHOLD


@dataclass
class GeneratedInstance:
    """One generated RGBA instance.

    ``rgba``: HxWx4 uint8, RGB order, soft alpha as decoded (cropped to the alpha box by the generator).
    ``provenance``: JSON-serialisable; ``provenance["kind"]`` names the generator ("layerdiffusion", ...).
    """

    rgba: np.ndarray
    prompt: str
    seed: int
    provenance: dict[str, Any] = field(default_factory=dict)
    mask_threshold: int = ALPHA_THRESHOLD

    @property
    def alpha(self) -> np.ndarray:
        return self.rgba[..., 3]

    @property
    def mask(self) -> np.ndarray:
        """Binary mask: ``alpha >= mask_threshold``."""
        return self.rgba[..., 3] >= self.mask_threshold

    @property
    def empty(self) -> bool:
        """True when no pixel reaches the mask threshold (nothing to bank)."""
        return not bool(self.mask.any())


@runtime_checkable
class InstanceGenerator(Protocol):
    """Turns prompts into RGBA instances; one seed per prompt, recorded in the provenance."""

    name: str

    def generate(
        self, prompts: list[str], seeds: list[int], negative_prompt: str | None = None
    ) -> list[GeneratedInstance]: ...
