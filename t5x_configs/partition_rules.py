"""T5X optimizer-state partition rule for :class:`rite_optax.ScaleByLoraRiteState`.

T5X derives the logical axes of an optax state from
``t5x.optimizers.OptaxStatePartitionRules._RULES``, keyed by state type, and
aborts on an unregistered ``*State``. Importing this module registers the rule
when T5X is installed (``gin/lora_rite.gin`` does ``import
t5x_configs.partition_rules``); without T5X there is nothing to register.

The rule is :func:`rite_optax.sharding.lora_rite_state_specs`, the policy
:func:`rite_optax.state_partition_specs` applies, so the state is sharded alike
in and out of T5X. It needs the pairing to know the factors' batch axes
(scanned layers): importing registers it with the default ``'nnx'``, and
:func:`t5x_configs.labels.freeze_base` (which the gin files wrap the optimizer
in) registers it again with the pairing its optimizer carries; an optimizer
that carries none (e.g. ``optax.inject_hyperparams(rite_optax.lora_rite)``)
needs :func:`register` called with its pairing. T5X's rule table is a class
attribute, one per process, so a process shards the LoRA-RITE states of one
pairing: the last one registered.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
from jax.sharding import PartitionSpec

import rite_optax
from rite_optax import pairing as pairing_lib
from rite_optax import sharding


def lora_rite_state_axes(
    state: rite_optax.ScaleByLoraRiteState,
    params_axes: Any,
    pairing: str | rite_optax.Pairing = 'nnx',
) -> rite_optax.ScaleByLoraRiteState:
  """Logical axes of a LoRA-RITE state, in T5X's ``_RULES`` signature.

  The first moment and the basis take the factor's param axes (so they shard
  exactly like ``lora_a``/``lora_b``); the r×r second moment and the escaped
  mass keep the axes of the factor's batch axes (the layers of a scanned stack)
  and are replicated otherwise; counters are replicated
  (:func:`rite_optax.sharding.lora_rite_state_specs`). Scalar leaves are
  ``None``, T5X's "replicated" for its own counters.

  Args:
    state: a ``ScaleByLoraRiteState`` whose fields have the params' structure
      (``optax.MaskedNode`` where an enclosing ``optax.partition`` masked leaves).
    params_axes: the params' logical axes (``PartitionSpec`` leaves).
    pairing: the pairing the optimizer was built with.

  Returns:
    A ``ScaleByLoraRiteState`` of logical axes (``None`` means replicated).
  """
  specs = sharding.lora_rite_state_specs(state, params_axes, pairing_lib.resolve(pairing))
  return _scalars_as_none(specs)


def _scalars_as_none(specs: rite_optax.ScaleByLoraRiteState) -> rite_optax.ScaleByLoraRiteState:
  """``PartitionSpec()`` (a scalar's spec) becomes ``None``, as in T5X's own rules."""
  is_spec = lambda x: isinstance(x, PartitionSpec)
  return jax.tree.map(lambda spec: spec if len(spec) else None, specs, is_leaf=is_spec)


def register(pairing: str | rite_optax.Pairing = 'nnx') -> bool:
  """Registers :func:`lora_rite_state_axes` with T5X for ``pairing``, replacing
  the rule registered before; returns whether T5X is installed."""
  pairing = pairing_lib.resolve(pairing)
  try:
    from t5x import optimizers  # pylint: disable=g-import-not-at-top
  except ImportError:
    return False
  optimizers.OptaxStatePartitionRules._RULES[rite_optax.ScaleByLoraRiteState] = (  # pylint: disable=protected-access
      functools.partial(lora_rite_state_axes, pairing=pairing))
  return True


register()
