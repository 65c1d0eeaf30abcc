"""rite_optax: LoRA-RITE (Yen et al., ICLR 2025) as optax transformations."""

from rite_optax.alias import factor_labels, lora_rite
from rite_optax.balance import balance_lora_factors
from rite_optax.baselines import (
    ScaleByRiemannianAdamState,
    lora_plus,
    riemannian_adam,
    scale_by_riemannian_adam,
    scale_lora_b,
)
from rite_optax.pairing import (
    FactorRule,
    Pairing,
    describe,
    gemma_peft,
    lorax,
    nnx,
    pair_leaves,
    peft,
    qwix,
    regex,
)
from rite_optax.readout import diagnostics
from rite_optax.sharding import abstract_state, state_partition_specs
from rite_optax.transform import ScaleByLoraRiteState, scale_by_lora_rite

__version__ = '0.1.0'

__all__ = [
    'FactorRule',
    'Pairing',
    'ScaleByLoraRiteState',
    'ScaleByRiemannianAdamState',
    'abstract_state',
    'balance_lora_factors',
    'describe',
    'diagnostics',
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
