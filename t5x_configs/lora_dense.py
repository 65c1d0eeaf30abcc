"""flaxformer ``DenseGeneral`` with a LoRA adapter (needs flaxformer).

Bind it to flaxformer's ``dense_general_factory`` hooks from gin (see
``gin/lora.gin``)::

  dense_attention.MultiHeadDotProductAttention.dense_general_factory = @lora_dense.LoraDenseGeneral
  dense.MlpBlock.dense_general_factory = @lora_dense.LoraDenseGeneral
  lora_dense.LoraDenseGeneral.rank = 16

The base ``kernel`` keeps its name, shape and axis names, so public T5X
checkpoints load; ``lora_a``/``lora_b`` are new params with logical axes.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flaxformer.components import dense
from flaxformer.sharding import partitioning

from t5x_configs import lora


class LoraDenseGeneral(dense.DenseGeneral):
  """``DenseGeneral`` plus ``(alpha / rank) · dropout(x) · lora_a · lora_b``.

  Attributes:
    rank: LoRA rank ``r``; 0 makes the layer a plain ``DenseGeneral``.
    alpha: the update is scaled by ``alpha / rank``.
    dropout_rate: dropout on the adapter's input, active when the caller
      provides a ``'dropout'`` RNG (T5X does so in training only).
    a_init: ``'kaiming_uniform'``, ``'normal'`` or ``'zeros'``; ``lora_b``
      starts at zero, so the adapted model starts equal to the base model.
    targets: regexes over the module path (``encoder/layers_0/attention/query``)
      selecting which projections get an adapter; others stay plain.
  """

  rank: int = 16
  alpha: float = 32.0
  dropout_rate: float = 0.0
  a_init: str = 'kaiming_uniform'
  targets: Sequence[str] = lora.ALL_PROJECTIONS

  @nn.compact
  def __call__(self, inputs):
    out = super().__call__(inputs)
    lora.check_rank_and_alpha(self.rank, self.alpha)
    lora.check_dropout(self.dropout_rate)
    module_path = '/'.join(self.scope.path)
    if self.rank == 0 or not lora.is_target(module_path, lora.compile_targets(self.targets)):
      return out
    features = dense._canonicalize_tuple(self.features)  # pylint: disable=protected-access
    axis = dense._normalize_axes(dense._canonicalize_tuple(self.axis), inputs.ndim)  # pylint: disable=protected-access
    names = None if self.kernel_axis_names is None else tuple(self.kernel_axis_names)
    reshaped = self.reshaped_kernel_axis_name_map if self.reshape_kernel else {}
    a_axes, b_axes = lora.factor_axis_names(names, len(axis), reshaped, module_path)
    in_size = int(np.prod([inputs.shape[ax] for ax in axis]))
    lora_a = partitioning.param_with_axes(
        'lora_a', lora.a_initializer(self.a_init), (in_size, self.rank), jnp.float32,
        axes=a_axes)
    lora_b = partitioning.param_with_axes(
        'lora_b', nn.initializers.zeros, (self.rank, int(np.prod(features))), jnp.float32,
        axes=b_axes)
    x = jnp.asarray(inputs, self.dtype)
    x = jnp.moveaxis(x, axis, tuple(range(x.ndim - len(axis), x.ndim)))
    if self.dropout_rate > 0:
      x = nn.Dropout(rate=self.dropout_rate)(x, deterministic=not self.has_rng('dropout'))
    delta = lora.lora_delta(x, lora_a, lora_b, len(axis), features, self.alpha / self.rank)
    return out + delta.astype(out.dtype)
