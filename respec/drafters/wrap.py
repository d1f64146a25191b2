"""Any drafter a user hands the engine, as a `Drafter` (respec/drafters/__init__.py): above the kinds
it wraps, so the package's base module imports none of them."""

from __future__ import annotations

from models.eagle import EagleHead
from respec.drafters import Drafter
from respec.drafters.eagle import EagleDrafter
from respec.drafters.layers import LayerDrafter


def as_drafter(obj) -> Drafter | None:
    """A `Drafter` from what users pass the engine: a Drafter, an EAGLE head, or a causal LM over the
    target's vocabulary (`models/drafter.py`)."""
    if obj is None or isinstance(obj, Drafter):
        return obj
    if isinstance(obj, EagleHead):
        return EagleDrafter(obj)
    return LayerDrafter(obj)
