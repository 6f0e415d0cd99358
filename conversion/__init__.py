"""Turn a pretrained Llama-family checkpoint into a differential-attention model (DiffLlama).

    from conversion import convert
    convert(source="HuggingFaceTB/SmolLM2-135M-Instruct", output="smollm2-diff", strategy="widened", preserve=True)

or, from a shell, `python -m conversion SOURCE OUTPUT --strategy widened --preserve`.
"""

from .convert import convert
from .errors import ConversionError
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
    "target_config",
]
