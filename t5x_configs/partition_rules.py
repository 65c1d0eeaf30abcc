"""T5X optimizer-state partition rule for :class:`rite_optax.ScaleByLoraRiteState`.

T5X derives the logical axes of an optax state from
``t5x.optimizers.OptaxStatePartitionRules._RULES``, keyed by state type, and
aborts on an unregistered ``*State``. Importing this module registers the rule
when T5X is installed (``gin/lora_rite.gin`` does ``import
t5x_configs.partition_rules``); without T5X there is nothing to register.
"""

from __future__ import annotations

from typing import Any

import jax
import optax

import rite_optax


def _is_masked(x: Any) -> bool:
  return isinstance(x, optax.MaskedNode)


def _like_params(state_tree: Any, params_axes: Any) -> Any:
  """Param axes for factor-shaped leaves; ``MaskedNode`` stays where optax masked."""
  return jax.tree.map(
      lambda axes, leaf: leaf if _is_masked(leaf) else axes,
      params_axes, state_tree, is_leaf=_is_masked)


def _replicated(state_tree: Any, params_axes: Any) -> Any:
  """``None`` (replicated) for the tiny ``(*batch, r, r)`` and ``(*batch,)`` leaves."""
  return jax.tree.map(
      lambda _, leaf: leaf if _is_masked(leaf) else None,
      params_axes, state_tree, is_leaf=_is_masked)


def lora_rite_state_axes(
    state: rite_optax.ScaleByLoraRiteState, params_axes: Any
) -> rite_optax.ScaleByLoraRiteState:
  """Logical axes of a LoRA-RITE state, in T5X's ``_RULES`` signature.

  The first moment and the previous basis are factor-shaped and take the
  factor's param axes (so they shard exactly like ``lora_a``/``lora_b``); the
  second moment ``(*batch, r, r)``, the escaped mass and the counters are
  replicated: with ``r ≤ 64`` they are a few KiB per factor.

  Args:
    state: a ``ScaleByLoraRiteState`` whose fields have the params' structure
      (``optax.MaskedNode`` where an enclosing ``optax.partition`` masked leaves).
    params_axes: the params' logical axes (``PartitionSpec`` leaves).

  Returns:
    A ``ScaleByLoraRiteState`` of logical axes (``None`` means replicated).
  """
  return rite_optax.ScaleByLoraRiteState(
      count=None,
      skipped=None,
      first_moment=_like_params(state.first_moment, params_axes),
      basis=_like_params(state.basis, params_axes),
      second_moment=_replicated(state.second_moment, params_axes),
      escaped_mass=_replicated(state.escaped_mass, params_axes),
      skipped_factors=None,
      skipped_factors_total=None,
      grad_norm=None,
      clip_scale=None,
  )


def register() -> bool:
  """Registers :func:`lora_rite_state_axes` with T5X; returns whether T5X is installed."""
  try:
    from t5x import optimizers  # pylint: disable=g-import-not-at-top
  except ImportError:
    return False
  optimizers.OptaxStatePartitionRules._RULES[rite_optax.ScaleByLoraRiteState] = (  # pylint: disable=protected-access
      lora_rite_state_axes)
  return True


register()
