"""Turn a pretrained Llama-family checkpoint into a differential-attention model (DiffLlama).

    from conversion import convert
    convert(source="HuggingFaceTB/SmolLM2-135M-Instruct", output="out/smollm2-widened", strategy="widened", preserve=True)

or, from a shell, `python -m conversion SOURCE OUTPUT --strategy widened --preserve`.
"""

from .convert import convert
from .errors import ConversionError
from .fold import export_folded, fold_dex
from .weight_map import (
    STRATEGIES,
    SUPPORTED_ARCHITECTURES,
    WIDENED_INITS,
    WeightMap,
    target_config,
)

__all__ = [
    "STRATEGIES",
    "SUPPORTED_ARCHITECTURES",
    "WIDENED_INITS",
    "ConversionError",
    "WeightMap",
    "convert",
    "export_folded",
    "fold_dex",
    "target_config",
]
