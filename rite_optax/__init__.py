"""rite_optax: LoRA-RITE (Yen et al., ICLR 2025) as optax transformations."""

from rite_optax.baselines import ScaleByRiemannianAdamState
from rite_optax.baselines import lora_plus
from rite_optax.baselines import riemannian_adam
from rite_optax.baselines import scale_by_riemannian_adam
from rite_optax.baselines import scale_lora_b
from rite_optax.lora_rite import ScaleByLoraRiteState
from rite_optax.lora_rite import balance_lora_factors
from rite_optax.lora_rite import factor_labels
from rite_optax.lora_rite import lora_rite
from rite_optax.lora_rite import scale_by_lora_rite
from rite_optax.pairing import FactorRule
from rite_optax.pairing import Pairing
from rite_optax.pairing import describe
from rite_optax.pairing import gemma_peft
from rite_optax.pairing import lorax
from rite_optax.pairing import nnx
from rite_optax.pairing import pair_leaves
from rite_optax.pairing import peft
from rite_optax.pairing import qwix
from rite_optax.pairing import regex
from rite_optax.sharding import abstract_state
from rite_optax.sharding import state_partition_specs

__version__ = '0.1.0'

__all__ = [
    'FactorRule',
    'Pairing',
    'ScaleByLoraRiteState',
    'ScaleByRiemannianAdamState',
    'abstract_state',
    'balance_lora_factors',
    'describe',
    'factor_labels',
    'lora_plus',
    'gemma_peft',
    'lora_rite',
    'lorax',
    'nnx',
    'pair_leaves',
    'riemannian_adam',
    'peft',
    'qwix',
    'regex',
    'scale_by_lora_rite',
    'scale_by_riemannian_adam',
    'scale_lora_b',
    'state_partition_specs',
]
