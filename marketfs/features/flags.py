"""Quality flags carried by every feature vector, and what each one means."""

from __future__ import annotations

from enum import StrEnum


class QualityFlag(StrEnum):
    MISSING_OHLCV = "MISSING_OHLCV"
    INSUFFICIENT_OHLCV = "INSUFFICIENT_OHLCV"
    COMPUTATION_ERROR = "COMPUTATION_ERROR"


FLAG_MEANINGS: dict[QualityFlag, str] = {
    QualityFlag.MISSING_OHLCV: "The bar at ts is absent from the source and was not computed from data.",
    QualityFlag.INSUFFICIENT_OHLCV: (
        "Fewer bars precede ts (this bar included) than at least one feature's lookback; that feature is null."
    ),
    QualityFlag.COMPUTATION_ERROR: "A feature came out non-finite (inf or NaN) and was stored as null.",
}
