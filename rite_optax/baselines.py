"""LoRA baselines that use rite_optax's pairing: LoRA+ and Riemannian-preconditioned Adam.

Both are optax transformations that find LoRA factors with the same static
:class:`~rite_optax.Pairing` as :func:`~rite_optax.lora_rite`, so a comparison
changes only the optimizer. Leaves that are not LoRA factors get plain Adam.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from rite_optax import options
from rite_optax import pairing as pairing_lib


def _check_adam(**values: Any) -> None:
  """Decays in [0, 1); eps, weight decay, ratio and ridge finite and >= 0."""
  for name, value in values.items():
    options.check_number(name, value, options.UNIT if name in ('b1', 'b2')
                         else options.NON_NEGATIVE)


def scale_lora_b(
    ratio: float, pairing: str | pairing_lib.Pairing = 'nnx'
) -> optax.GradientTransformation:
  """Multiplies the updates of every ``b`` factor (LoRA+'s B) by ``ratio``.

  Args:
    ratio: the factor ``η_B / η_A``.
    pairing: a preset name or a :class:`~rite_optax.Pairing`.

  Returns:
    A stateless ``optax.GradientTransformation``.
  """
  options.check_number('ratio', ratio, options.NON_NEGATIVE)
  pairing = pairing_lib.resolve(pairing)

  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None):
    del params
    b_indices = {
        p.b.index for p in pairing_lib.pair_leaves(updates, pairing).pairs}
    leaves, treedef = jax.tree.flatten(updates)
    leaves = [
        (u * ratio).astype(u.dtype) if i in b_indices else u
        for i, u in enumerate(leaves)
    ]
    return jax.tree.unflatten(treedef, leaves), state

  return optax.GradientTransformation(init_fn, update_fn)


def lora_plus(
    learning_rate: optax.ScalarOrSchedule,
    ratio: float = 16.0,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    pairing: str | pairing_lib.Pairing = 'nnx',
) -> optax.GradientTransformationExtraArgs:
  """LoRA+: AdamW whose learning rate on the B factors is ``ratio`` times larger.

  B is the factor LoRA initialises to zero (``lora_b`` in the ``'nnx'``
  preset). Every other leaf, ``lora_a`` included, uses ``learning_rate``. The
  decoupled weight decay of a B factor is scaled by the B learning rate too, as
  with a separate AdamW param group.

  Example::

    >>> import jax.numpy as jnp, rite_optax
    >>> params = {'lora_a': jnp.ones((8, 2)), 'lora_b': jnp.zeros((2, 4))}
    >>> tx = rite_optax.lora_plus(1e-4, ratio=16.0)
    >>> state = tx.init(params)

  Args:
    learning_rate: ``η_A``, a number or an ``optax`` schedule.
    ratio: ``λ = η_B / η_A``. The LoRA+ paper recommends ``λ ≈ 2⁴ = 16`` as
      a default for LLM fine-tuning.
    b1, b2, eps: Adam's decay rates and denominator epsilon.
    weight_decay: decoupled (AdamW) weight decay.
    pairing: a preset name or a :class:`~rite_optax.Pairing`.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; ``update`` needs ``params``
    when ``weight_decay > 0``.

  References:
    Hayou, Ghosh, Yu, `LoRA+: Efficient Low Rank Adaptation of Large Models
    <https://arxiv.org/abs/2402.12354>`_, ICML 2024.
  """
  options.check_learning_rate('learning_rate', learning_rate)
  _check_adam(b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, ratio=ratio)
  return optax.with_extra_args_support(optax.chain(
      optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
      optax.add_decayed_weights(weight_decay),
      scale_lora_b(ratio, pairing),
      optax.scale_by_learning_rate(learning_rate),
  ))


class ScaleByRiemannianAdamState(NamedTuple):
  """State of :func:`scale_by_riemannian_adam`; params-structured moments."""

  count: jax.Array
  """``[]`` int32: steps applied so far."""
  mu: optax.Updates
  """param-shaped: Adam's first moment of the raw gradient."""
  nu: optax.Updates
  """param-shaped: Adam's second moment of the raw gradient."""


def _partner_preconditioner(partner: jax.Array, reg: Any) -> jax.Array:
  """``(partnerᵀ partner + reg·I)⁻¹`` per batch index of a canonical factor."""
  precision = jax.lax.Precision.HIGHEST
  gram = jnp.einsum('bkr,bks->brs', partner, partner, precision=precision)
  eye = jnp.eye(gram.shape[-1], dtype=gram.dtype)
  return jnp.linalg.inv(gram + reg * eye)


def scale_by_riemannian_adam(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    reg: float = 1e-6,
    pairing: str | pairing_lib.Pairing = 'nnx',
) -> optax.GradientTransformationExtraArgs:
  """Adam with Zhang & Pilanci's r×r Riemannian preconditioner on LoRA factors.

  For ``delta = A Bᵀ`` (canonical views), Adam's moments ``m``, ``v`` of the raw
  gradient give the update::

    Δ_A = (m̂_A (BᵀB + reg·I)⁻¹) / (sqrt(v̂_A) + eps)
    Δ_B = (m̂_B (AᵀA + reg·I)⁻¹) / (sqrt(v̂_B) + eps)

  the preconditioned first moment divided elementwise by Adam's denominator, as
  in the authors' scaled-AdamW code. The preconditioner uses the partner factor
  at the current params. Leaves that are not factors get plain Adam.

  Args:
    b1, b2, eps: Adam's decay rates and denominator epsilon.
    reg: ``δ``, the ridge added to the partner's Gram matrix (their default).
    pairing: a preset name or a :class:`~rite_optax.Pairing`.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; ``update`` needs ``params``.

  References:
    Zhang, Pilanci, `Riemannian Preconditioned LoRA for Fine-Tuning Foundation
    Models <https://arxiv.org/abs/2402.02347>`_, ICML 2024.
  """
  _check_adam(b1=b1, b2=b2, eps=eps, reg=reg)
  pairing = pairing_lib.resolve(pairing)

  def init_fn(params):
    zeros = jax.tree.map(jnp.zeros_like, params)
    return ScaleByRiemannianAdamState(
        count=jnp.zeros([], jnp.int32), mu=zeros,
        nu=jax.tree.map(jnp.zeros_like, params))

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    if params is None:
      raise ValueError(
          'scale_by_riemannian_adam needs params: call update(grads, state,'
          ' params).')
    mu = optax.tree.update_moment(updates, state.mu, b1, 1)
    nu = optax.tree.update_moment_per_elem_norm(updates, state.nu, b2, 2)
    count = optax.safe_increment(state.count)
    mu_hat = optax.tree.bias_correction(mu, b1, count)
    nu_hat = optax.tree.bias_correction(nu, b2, count)
    m_leaves, treedef = jax.tree.flatten(mu_hat)
    p_leaves = treedef.flatten_up_to(params)
    for pair in pairing_lib.pair_leaves(params, pairing).pairs:
      dtype = jnp.promote_types(p_leaves[pair.a.index].dtype, jnp.float32)
      a = pair.a.to_canonical(p_leaves[pair.a.index]).astype(dtype)
      b = pair.b.to_canonical(p_leaves[pair.b.index]).astype(dtype)
      for view, partner in ((pair.a, b), (pair.b, a)):
        m = view.to_canonical(m_leaves[view.index]).astype(dtype)
        m = jnp.einsum(
            'bkr,brs->bks', m, _partner_preconditioner(partner, reg),
            precision=jax.lax.Precision.HIGHEST)
        m_leaves[view.index] = view.from_canonical(m).astype(
            m_leaves[view.index].dtype)
    mu_hat = jax.tree.unflatten(treedef, m_leaves)
    new_updates = jax.tree.map(
        lambda m, v: (m / (jnp.sqrt(v) + eps)).astype(m.dtype), mu_hat, nu_hat)
    return new_updates, ScaleByRiemannianAdamState(count=count, mu=mu, nu=nu)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def riemannian_adam(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    reg: float = 1e-6,
    weight_decay: float = 0.0,
    pairing: str | pairing_lib.Pairing = 'nnx',
) -> optax.GradientTransformationExtraArgs:
  """Scaled AdamW of Riemannian preconditioned LoRA (Zhang & Pilanci, 2024).

  :func:`scale_by_riemannian_adam`, then decoupled weight decay, then
  ``-learning_rate``.

  Example::

    >>> import jax.numpy as jnp, rite_optax
    >>> params = {'lora_a': jnp.ones((8, 2)), 'lora_b': jnp.zeros((2, 4))}
    >>> tx = rite_optax.riemannian_adam(1e-4)
    >>> state = tx.init(params)

  Args:
    learning_rate: a number or an ``optax`` schedule.
    b1, b2, eps, reg, pairing: see :func:`scale_by_riemannian_adam`.
    weight_decay: decoupled (AdamW) weight decay.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; ``update`` needs ``params``.

  References:
    Zhang, Pilanci, `Riemannian Preconditioned LoRA for Fine-Tuning Foundation
    Models <https://arxiv.org/abs/2402.02347>`_, ICML 2024.
  """
  options.check_learning_rate('learning_rate', learning_rate)
  _check_adam(weight_decay=weight_decay)
  return optax.with_extra_args_support(optax.chain(
      scale_by_riemannian_adam(b1=b1, b2=b2, eps=eps, reg=reg, pairing=pairing),
      optax.add_decayed_weights(weight_decay),
      optax.scale_by_learning_rate(learning_rate),
  ))
