"""Freezing the base model: only LoRA factors (and leaves you name) are trained.

T5X's ``MultiOptimizer`` does not work with optax and ``optax.masked`` alone
applies raw gradients to masked leaves, so freezing is one
``optax.partition`` inside T5X's ``OptaxWrapper``: trainable leaves get the
optimizer, every other leaf ``optax.set_to_zero()``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import optax

from rite_optax import pairing as pairing_lib
from t5x_configs import partition_rules

LORA_FACTORS = (r'(?:.*/)?lora_[ab]',)
"""Default trainable leaves: every ``lora_a``/``lora_b``."""

TRAINABLE = 'trainable'
FROZEN = 'frozen'


def _compile(trainable: Sequence[str]) -> tuple[re.Pattern, ...]:
  if isinstance(trainable, str) or not trainable:
    raise ValueError(
        f'trainable must be a non-empty sequence of path regexes, got {trainable!r}.')
  compiled = []
  for pattern in trainable:
    try:
      compiled.append(re.compile(pattern))
    except re.error as e:
      raise ValueError(f'trainable: invalid pattern {pattern!r}: {e}') from e
  return tuple(compiled)


def trainable_labels(trainable: Sequence[str] = LORA_FACTORS) -> Callable[[Any], Any]:
  """Returns ``params -> labels``: ``'trainable'`` where a regex fully matches
  the leaf's ``/``-joined path (``encoder/layers_0/attention/query/lora_a``),
  ``'frozen'`` elsewhere.

  Example::

    >>> labels = trainable_labels()(
    ...     {'q': {'kernel': 0.0, 'lora_a': 0.0, 'lora_b': 0.0}})
    >>> labels['q']['kernel'], labels['q']['lora_a']
    ('frozen', 'trainable')

  Raises:
    ValueError: when ``trainable`` is empty, a bare string or an invalid regex,
      or (at call time) when no leaf matches.
  """
  patterns = _compile(trainable)

  def labels(params):
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    out = [
        TRAINABLE if any(p.fullmatch(pairing_lib.path_string(path)) for p in patterns)
        else FROZEN
        for path, _ in flat
    ]
    if TRAINABLE not in out:
      raise ValueError(
          f'trainable={list(trainable)} matches no param; the first paths are'
          f' {[pairing_lib.path_string(p) for p, _ in flat[:5]]}. Is the LoRA layer'
          ' bound in gin (gin/lora.gin)?')
    return jax.tree_util.tree_unflatten(treedef, out)

  return labels


def freeze_base(
    tx: optax.GradientTransformation, trainable: Sequence[str] = LORA_FACTORS
) -> optax.GradientTransformationExtraArgs:
  """Applies ``tx`` to the ``trainable`` leaves and zero updates to all others.

  When ``tx`` carries its pairing (:func:`rite_optax.lora_rite`,
  :func:`rite_optax.scale_by_lora_rite`), the result carries it too, and T5X's
  partition rule for LoRA-RITE's state is registered again with it (so a
  scanned-layers pairing shards the r×r state by layer): the gin files build
  the optimizer through this function.

  Example::

    >>> import rite_optax
    >>> tx = freeze_base(rite_optax.lora_rite(1e-3, unpaired='error'))

  Args:
    tx: the optimizer of the trainable leaves (e.g. :func:`rite_optax.lora_rite`).
    trainable: path regexes of the trainable leaves (default: LoRA factors).

  Returns:
    ``optax.partition({'trainable': tx, 'frozen': optax.set_to_zero()}, labels)``.
  """
  frozen = optax.partition(
      {TRAINABLE: tx, FROZEN: optax.set_to_zero()}, trainable_labels(trainable))
  pairing = pairing_lib.carried_pairing(tx)
  if pairing is None:
    return frozen
  partition_rules.register(pairing)
  return pairing_lib.with_pairing(frozen, pairing)
