"""rite_optax: LoRA-RITE (Yen et al., ICLR 2025) as optax transformations."""

from rite_optax.lora_rite import ScaleByLoraRiteState
from rite_optax.lora_rite import balance_lora_factors
from rite_optax.lora_rite import factor_labels
from rite_optax.lora_rite import lora_rite
from rite_optax.lora_rite import scale_by_lora_rite
from rite_optax.pairing import FactorRule
from rite_optax.pairing import Pairing
from rite_optax.pairing import pair_leaves

__version__ = '0.1.0'

__all__ = [
    'FactorRule',
    'Pairing',
    'ScaleByLoraRiteState',
    'balance_lora_factors',
    'factor_labels',
    'lora_rite',
    'pair_leaves',
    'scale_by_lora_rite',
]
