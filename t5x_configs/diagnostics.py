"""LoRA-RITE's diagnostics in T5X's training metrics (needs T5X).

T5X's trainer logs whatever its ``weight_metrics_computer`` returns after each step,
next to the loss and the learning rate (TensorBoard and ``metrics.jsonl``).
:class:`LoraRiteMetrics` returns :func:`rite_optax.diagnostics` of the new optimizer
state, as ``lora_rite/<name>``. ``gin/lora_rite.gin`` binds it::

  import t5x_configs.diagnostics
  trainer.Trainer.weight_metrics_computer = @diagnostics.LoraRiteMetrics()

Per-step values (``skipped_factors``, ``grad_norm``, ``clip_scale``) are averaged
over each logging period; counters (``step``, ``skipped_steps``,
``skipped_factors_total``) show their last value. A ``skipped_factors`` close to
the number of factors means the loss is summed over tokens (T5X's default) while
the update-skipping threshold assumes a mean.
"""

from __future__ import annotations

from typing import Any

import clu.metrics
import jax.numpy as jnp
from t5x import trainer

import rite_optax

_LAST_VALUE = ('step', 'skipped_steps', 'skipped_factors_total')


class LoraRiteMetrics(trainer.WeightMetricsComputer):
  """Logs LoRA-RITE's diagnostics instead of T5X's per-weight statistics."""

  def compute_metrics(
      self, gradients: Any, old_train_state: Any, new_train_state: Any
  ) -> dict[str, clu.metrics.Metric]:
    del gradients, old_train_state
    metrics = {}
    for name, value in rite_optax.diagnostics(new_train_state.param_states).items():
      kind = clu.metrics.LastValue if name in _LAST_VALUE else clu.metrics.Average
      metrics[f'lora_rite/{name}'] = kind.from_model_output(
          jnp.asarray([value], jnp.float32))
    return metrics
