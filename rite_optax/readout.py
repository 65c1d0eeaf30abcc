"""LoRA-RITE's per-step diagnostics, read from any optax state that holds its state."""

from __future__ import annotations

from typing import Any

import jax

from rite_optax.transform import ScaleByLoraRiteState


def _rite_states(state: Any) -> list[ScaleByLoraRiteState]:
  is_rite = lambda x: isinstance(x, ScaleByLoraRiteState)
  return [x for x in jax.tree.leaves(state, is_leaf=is_rite) if is_rite(x)]


def diagnostics(state: Any) -> dict[str, jax.Array]:
  """LoRA-RITE's per-step diagnostics, as scalars a training loop can log.

  Finds the one :class:`ScaleByLoraRiteState` inside any optax state
  (:func:`lora_rite`, ``optax.chain``, ``optax.partition``,
  ``optax.inject_hyperparams``, ``optax.MultiSteps``). Works inside ``jit``.

  Example::

    >>> tx = rite_optax.lora_rite(1e-3)  # doctest: +SKIP
    >>> updates, state = tx.update(grads, state, params)  # doctest: +SKIP
    >>> logs = {k: float(v) for k, v in rite_optax.diagnostics(state).items()}  # doctest: +SKIP

  Returns:
    ``step`` (applied steps), ``skipped_steps`` (steps skipped whole for a
    non-finite gradient), ``skipped_factors`` (factors whose unmagnified gradient
    update skipping zeroed in the last applied step) and its running total
    ``skipped_factors_total``, ``grad_norm`` (global norm of the kept unmagnified
    gradients, before clipping) and ``clip_scale`` (1 when not clipped). A
    ``skipped_factors`` near the number of factors usually means a loss summed
    over tokens: the skipping threshold assumes a mean.

  Raises:
    ValueError: ``state`` holds no LoRA-RITE state, or more than one.
  """
  rites = _rite_states(state)
  if len(rites) != 1:
    raise ValueError(
        f'diagnostics needs exactly one ScaleByLoraRiteState in the state, found {len(rites)}.')
  rite, = rites
  return {
      'step': rite.count,
      'skipped_steps': rite.skipped,
      'skipped_factors': rite.skipped_factors,
      'skipped_factors_total': rite.skipped_factors_total,
      'grad_norm': rite.grad_norm,
      'clip_scale': rite.clip_scale,
  }
