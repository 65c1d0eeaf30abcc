"""Equal-norm rebalancing of LoRA factor pairs: the product, and so the adapter, unchanged."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from rite_optax import factor_math as fm
from rite_optax import pairing as pairing_lib


def balance_lora_factors(
    pairing: str | pairing_lib.Pairing = 'nnx',
) -> optax.GradientTransformationExtraArgs:
  """Rescales each adapter's new factors to equal Frobenius norms.

  Changes ``updates`` so that ``params + updates`` becomes ``(c·A', B'/c)`` with
  ``‖c·A'‖ = ‖B'/c‖`` per adapter: the product ``A' B'ᵀ`` is unchanged, so the
  LoRA delta and LoRA-RITE's trajectory are too. Adapters with an all-zero
  factor or a zero update (a skipped step) keep their update unchanged. Leaves that are not factors pass through. Put it
  last in a chain: it needs the final updates.
  """
  pairing = pairing_lib.resolve(pairing)

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    if params is None:
      raise ValueError('balance_lora_factors needs params.')
    paired = pairing_lib.pair_leaves(params, pairing)
    deltas, treedef = jax.tree.flatten(updates)
    factors = jax.tree.leaves(params)
    out = list(deltas)
    for pair in paired.pairs:
      dtype = fm.compute_dtype(pair.a.dtype)
      old, step = {}, {}
      for role, view in (('a', pair.a), ('b', pair.b)):
        old[role] = view.to_canonical(factors[view.index]).astype(dtype)
        step[role] = view.to_canonical(deltas[view.index]).astype(dtype)
      new = {role: old[role] + step[role] for role in 'ab'}
      norm_a, norm_b = (jnp.linalg.norm(new[role], axis=(-2, -1)) for role in 'ab')
      moved = jnp.any(step['a'] != 0, axis=(-2, -1)) | jnp.any(step['b'] != 0, axis=(-2, -1))
      # Adapters that did not move (a skipped step) or have a zero factor keep
      # their update bit for bit: (p + u)·1 - p is not u in floating point.
      ok = moved & (norm_a > 0) & (norm_b > 0)
      c = jnp.sqrt(norm_b / jnp.where(ok, norm_a, 1.0))
      for role, view, scale in (('a', pair.a, c), ('b', pair.b, 1.0 / c)):
        balanced = new[role] * scale[:, None, None] - old[role]
        out[view.index] = view.from_canonical(
            jnp.where(ok[:, None, None], balanced, step[role])
        ).astype(deltas[view.index].dtype)
    return jax.tree.unflatten(treedef, out), state

  return optax.GradientTransformationExtraArgs(
      lambda params: optax.EmptyState(), update_fn)
