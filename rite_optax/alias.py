"""``lora_rite``: the full optimizer a training loop uses.

LoRA-RITE (:func:`.transform.scale_by_lora_rite`) for the factors, a fallback for every
other trainable leaf (AdamW in the compute dtype, frozen, or an error), the learning rate
and weight decay, and the whole-step skip: a step that would write a non-finite param or
state leaf is skipped whole and counted.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from rite_optax import factor_math as fm
from rite_optax import multihost, options
from rite_optax import pairing as pairing_lib
from rite_optax.balance import balance_lora_factors
from rite_optax.readout import _rite_states
from rite_optax.transform import _OTHERS_OK, ScaleByLoraRiteState, _scale_by_lora_rite

UNPAIRED_CHOICES = ('adamw', 'zero', 'error')


def factor_labels(
    pairing: str | pairing_lib.Pairing = 'nnx', unpaired: str = 'adamw'
) -> Callable[[Any], Any]:
  """Returns ``params -> labels``: ``'lora_rite'`` for factors, else ``'unpaired'``.

  With ``unpaired='error'`` the function raises, naming every leaf that is not
  a factor. Use it with ``optax.partition`` to build your own combinations.
  """
  options.check_choice('unpaired', unpaired, UNPAIRED_CHOICES)
  pairing = pairing_lib.resolve(pairing)

  def labels(params):
    paired = pairing_lib.pair_leaves(params, pairing)
    if unpaired == 'error' and paired.unpaired:
      raise ValueError(
          f"unpaired='error', but these leaves are not LoRA factors under"
          f' pairing {pairing.name!r}: {list(paired.unpaired)}. Freeze them'
          " (optax.partition with optax.set_to_zero) or pass unpaired='adamw'."
      )
    leaves, treedef = jax.tree.flatten(params)
    factor_indices = paired.factor_indices
    return jax.tree.unflatten(treedef, [
        'lora_rite' if i in factor_indices else 'unpaired'
        for i in range(len(leaves))
    ])

  return labels


def lora_rite(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    relative_eps: bool = False,
    clip_unmagnified_grad: float = 1.0,
    update_skipping: float = 1.0,
    update_capping: float = 0.0,
    weight_decay: float = 0.0,
    apply_escape: bool = False,
    balance_factors: bool = False,
    pairing: str | pairing_lib.Pairing = 'nnx',
    unpaired: str = 'adamw',
    unpaired_learning_rate: optax.ScalarOrSchedule | None = None,
    unpaired_weight_decay: float = 1e-4,
    unpaired_eps: float = 1e-8,
) -> optax.GradientTransformationExtraArgs:
  """LoRA-RITE for LoRA factors, with a fallback for every other trainable leaf.

  The factors found by ``pairing`` get :func:`scale_by_lora_rite` (with
  ``weight_decay·param`` added outside the preconditioner, as in the paper's
  code), then ``-learning_rate``. Leaves that are not factors (biases, norms, heads)
  are handled as ``unpaired`` says: ``'adamw'`` (``optax.adamw`` with ``b1``,
  ``b2``, ``unpaired_eps``, ``unpaired_learning_rate`` defaulting to
  ``learning_rate``, and ``unpaired_weight_decay``, computed and kept in the compute
  dtype: float32 for bfloat16 and float16 params), ``'zero'`` (frozen), or
  ``'error'`` (raise at ``init``, naming them).

  Example::

    >>> import jax, jax.numpy as jnp, optax, rite_optax
    >>> params = {'q': {'lora_a': jnp.ones((8, 2)), 'lora_b': jnp.zeros((2, 4))},
    ...           'bias': jnp.zeros(4)}
    >>> tx = rite_optax.lora_rite(optax.cosine_decay_schedule(1e-3, 1000))
    >>> state = tx.init(params)
    >>> grads = jax.tree.map(jnp.ones_like, params)
    >>> updates, state = tx.update(grads, state, params)
    >>> params = optax.apply_updates(params, updates)

  Args:
    learning_rate: a number or an ``optax`` schedule.
    b1, b2, eps, relative_eps, clip_unmagnified_grad, update_skipping,
      update_capping, apply_escape, pairing: see :func:`scale_by_lora_rite`.
    weight_decay: weight decay ``Δ += weight_decay·param`` on factors, added after
      the preconditioner and before the learning rate (docs/algorithm.md step 11).
    balance_factors: after each step, rescale every adapter's factors to equal
      Frobenius norms (product unchanged), see :func:`balance_lora_factors`.
    unpaired: ``'adamw'``, ``'zero'`` or ``'error'``.
    unpaired_learning_rate: learning rate of the AdamW fallback.
    unpaired_weight_decay: weight decay of the AdamW fallback.
    unpaired_eps: the AdamW fallback's denominator epsilon (in its float32 compute
      dtype for half-precision params, so the default is safe in float16).

  Returns:
    An ``optax.GradientTransformationExtraArgs``; ``update`` needs ``params``.
    Its ``init`` carries the resolved pairing (``tx.init.pairing``), which
    :func:`rite_optax.state_partition_specs` and :func:`rite_optax.abstract_state`
    read, so it is given once.

  References:
    Yen et al., `LoRA Done RITE: Robust Invariant Transformation Equilibration
    for LoRA Optimization <https://arxiv.org/abs/2410.20625>`_, ICLR 2025.
  """
  labels = factor_labels(pairing, unpaired)  # checks unpaired
  options.check_learning_rate('learning_rate', learning_rate)
  if unpaired_learning_rate is not None:
    options.check_learning_rate('unpaired_learning_rate', unpaired_learning_rate)
  options.check_bool('balance_factors', balance_factors)
  fallback, fallback_ok = _fallback(
      unpaired, learning_rate if unpaired_learning_rate is None else unpaired_learning_rate,
      b1=b1, b2=b2, eps=unpaired_eps, weight_decay=unpaired_weight_decay)
  rite = optax.chain(
      _scale_by_lora_rite(
          b1=b1, b2=b2, eps=eps, relative_eps=relative_eps,
          clip_unmagnified_grad=clip_unmagnified_grad,
          update_skipping=update_skipping, update_capping=update_capping,
          weight_decay=weight_decay, apply_escape=apply_escape, pairing=pairing,
          updates_in_param_dtype=False),
      optax.scale_by_learning_rate(learning_rate),
  )
  tx = optax.partition({'lora_rite': rite, 'unpaired': fallback}, labels)
  if balance_factors:
    tx = optax.chain(tx, balance_lora_factors(pairing))
  options_ok = lambda count: options.learning_rate_ok(learning_rate, count) & fallback_ok(count)
  return pairing_lib.with_pairing(
      _skip_whole_step(tx, pairing, check_unpaired=unpaired == 'adamw', options_ok=options_ok),
      pairing)


def _fallback(unpaired: str, learning_rate, *, b1, b2, eps, weight_decay):
  """The transformation of the leaves that are not factors, and ``count -> bool``:
  its learning rate at that step finite and its traced options in range."""
  if unpaired != 'adamw':
    return optax.set_to_zero(), lambda count: jnp.array(True)
  checks = {'unpaired_weight_decay': (weight_decay, options.NON_NEGATIVE),
            'unpaired_eps': (eps, options.NON_NEGATIVE)}
  for name, (value, allowed) in checks.items():
    options.check_number(name, value, allowed)
  adamw = _in_compute_dtype(optax.adamw(
      learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay))
  return adamw, lambda count: (options.learning_rate_ok(learning_rate, count)
                               & options.traced_ok(checks))


def _in_compute_dtype(inner: optax.GradientTransformation) -> optax.GradientTransformation:
  """``inner`` with its state, gradients and params in the params' compute dtype
  (float32 for bfloat16 and float16 params): its state keeps the dtypes ``init``
  gave it whatever the gradients' dtype, and ``eps = 1e-8`` is not 0 as in float16.
  Updates come back in the compute dtype (:func:`lora_rite` casts them to the params')."""

  def cast(tree, like):
    return jax.tree.map(lambda x, p: x.astype(fm.compute_dtype(p.dtype)), tree, like)

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    return inner.update(cast(updates, params), state, cast(params, params))

  return optax.GradientTransformation(lambda params: inner.init(cast(params, params)), update_fn)


def _skip_whole_step(
    inner: optax.GradientTransformation, pairing: pairing_lib.Pairing, check_unpaired: bool,
    options_ok: Callable[[jax.Array], jax.Array],
) -> optax.GradientTransformationExtraArgs:
  """Skips ``inner``'s whole step when anything makes it unsound.

  ``scale_by_lora_rite`` skips the factors' step on a non-finite factor gradient
  or a traced option out of range; here a non-finite gradient of any other leaf
  (a bias, a norm) or one whose square overflows (AdamW's second moment could not
  hold it), a non-finite learning rate at this step (a schedule, or an
  ``inject_hyperparams`` array) and a traced fallback option out of range
  (``options_ok`` of the step count) skip the step too. A skipped step leaves
  every update zero and every inner state (the fallback's moments, the
  schedule's count) as it was, except LoRA-RITE's ``skipped``, which counts it.
  LoRA-RITE is told this verdict (an extra argument) and folds it into its own,
  so that it keeps its factor-sized state without a second select here; the
  step's verdict is read back from its ``skipped``. The other leaves'
  gradients are checked only when ``check_unpaired`` (they are applied: with
  ``unpaired='zero'`` they are discarded, and checking them would make XLA
  compute the frozen weights' gradients). Updates come back in the params'
  dtypes, whatever the gradients' dtypes.
  """

  def init_fn(params):
    paired = pairing_lib.pair_leaves(params, pairing)
    pairing_lib.require_pairs(params, paired, pairing)
    multihost.check_same_plan(params, paired, pairing_lib.resolve(pairing))
    return inner.init(params)

  def update_fn(updates, state, params=None, **extra_args):
    if params is None:
      raise ValueError('lora_rite needs params: call update(grads, state, params).')
    paired = pairing_lib.pair_leaves(params, pairing)
    (old_rite,) = _rite_states(state)
    others_ok = options_ok(old_rite.count)
    for i, (g, p) in enumerate(zip(jax.tree.leaves(updates), jax.tree.leaves(params),
                                   strict=True)):
      if check_unpaired and i not in paired.factor_indices:
        # g² finite in the fallback's compute dtype: AdamW's second moment can hold it.
        others_ok &= jnp.all(jnp.isfinite(jnp.square(g.astype(fm.compute_dtype(p.dtype)))))
    new_updates, new_state = inner.update(
        updates, state, params, **extra_args, **{_OTHERS_OK: others_ok})
    (new_rite,) = _rite_states(new_state)
    applied = new_rite.skipped == old_rite.skipped
    new_updates = jax.tree.map(
        lambda u, p: jnp.where(applied, u, 0).astype(p.dtype), new_updates, params)
    # LoRA-RITE kept its own state on a skipped step (it was told others_ok).
    is_rite = lambda x: isinstance(x, ScaleByLoraRiteState)
    new_state = jax.tree.map(
        lambda new, old: new if is_rite(new) else jnp.where(applied, new, old),
        new_state, state, is_leaf=is_rite)
    return new_updates, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
