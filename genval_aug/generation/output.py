"""Write generated instances into an instance bank with their provenance."""
from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .types import GeneratedInstance

logger = logging.getLogger(__name__)


def add_to_bank(
    bank: Any,
    instances: Sequence[GeneratedInstance],
    category: str,
    *,
    category_id: int | None = None,
    verdicts: Sequence[dict | None] | None = None,
) -> list[str | None]:
    """``BankWriter.add(rgba, category=..., source=provenance)`` for each instance; returns record ids.

    ``bank``: an open ``BankWriter`` or a bank path (opened and closed here). Instances whose alpha never
    reaches their mask threshold are skipped (id ``None``) and counted in the bank's rejection stats as
    ``"generation:empty_alpha"``.
    """
    from ..bank import BankWriter

    if verdicts is not None and len(verdicts) != len(instances):
        raise ValueError(f"got {len(verdicts)} verdicts for {len(instances)} instances")
    if isinstance(bank, (str, Path)):
        with BankWriter(bank) as w:
            return add_to_bank(w, instances, category, category_id=category_id, verdicts=verdicts)
    ids: list[str | None] = []
    empty = 0
    for i, inst in enumerate(instances):
        if inst.empty:
            empty += 1
            ids.append(None)
            continue
        v = verdicts[i] if verdicts is not None else None
        ids.append(bank.add(inst.rgba, category=category, category_id=category_id, source=inst.provenance,
                            verdict=v))
    if empty:
        logger.warning("%d of %d generated %r instances had an empty alpha and were not banked",
                       empty, len(instances), category)
        bank.record_rejections({"generation:empty_alpha": empty})
    return ids
