"""LoRA-RITE as optax transformations: ``scale_by_lora_rite`` and ``lora_rite``.

The transformations validate their options, pair the LoRA factors of a param
tree (:mod:`.pairing`), and hand the step to :mod:`.engine`, which runs the
math of :mod:`.core` over groups of same-shape adapters. Here live the state,
the whole-step skip of :func:`lora_rite`, and :func:`diagnostics`.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from rite_optax import core, engine
from rite_optax import factor_math as fm
from rite_optax import pairing as pairing_lib

# The extra argument by which lora_rite tells scale_by_lora_rite whether the
# gradients of the other (fallback) leaves are finite: both skip the step together.
_OTHERS_FINITE = 'lora_rite_others_finite'

# engine.Leaves field <- ScaleByLoraRiteState field, for the params-structured state.
_STATE_FIELDS = (('moments', 'first_moment'), ('bases', 'basis'),
                 ('seconds', 'second_moment'), ('escapes', 'escaped_mass'))


class ScaleByLoraRiteState(NamedTuple):
  """State of :func:`scale_by_lora_rite`. Every field but the counters has the
  params' tree structure (one leaf per LoRA factor)."""

  count: jax.Array
  """``[]`` int32 (float32 after some restores): steps applied so far."""
  skipped: jax.Array
  """``[]`` int32: steps skipped because a gradient was not finite."""
  first_moment: optax.Updates
  """factor-shaped: M, the first moment in the partner's orthonormal basis."""
  basis: optax.Updates
  """factor-shaped: U, this factor's orthonormal basis at the last applied step."""
  second_moment: optax.Updates
  """``(*batch, r, r)``: V, the second moment of the unmagnified gradient."""
  escaped_mass: optax.Updates
  """``(*batch,)``: ρ, the escaped mass (zeros unless ``apply_escape``)."""
  skipped_factors: jax.Array
  """``[]`` int32: factors whose unmagnified gradient update skipping zeroed in
  the last applied step (docs/algorithm.md step 3)."""
  skipped_factors_total: jax.Array
  """``[]`` int32: the same, summed over every applied step."""
  grad_norm: jax.Array
  """``[]`` compute dtype: the global norm of the kept unmagnified gradients in
  the last applied step, before clipping (step 4)."""
  clip_scale: jax.Array
  """``[]`` compute dtype: the factor clipping applied in the last applied step
  (1 when the norm was within ``clip_unmagnified_grad``)."""


def _check_number(
    name: str, value: Any, low: float, high: float | None = None, infinite_ok: bool = False):
  """Validates Python numbers: in range, never NaN, finite unless ``infinite_ok``.
  Arrays (``inject_hyperparams``) pass through, as their values may be traced."""
  if isinstance(value, bool) or not isinstance(value, numbers.Real):
    if isinstance(value, (jax.Array, jnp.ndarray)) or hasattr(value, 'dtype'):
      return
    raise TypeError(f'{name} must be a real number, got {value!r}.')
  if math.isnan(value) or (math.isinf(value) and not infinite_ok):
    raise ValueError(f'{name} must be finite, got {value!r}.')
  if value < low or (high is not None and value >= high):
    bounds = f'[{low}, {high})' if high is not None else f'>= {low}'
    raise ValueError(f'{name} must be in {bounds}, got {value!r}.')


def _check_learning_rate(name: str, value: Any):
  """A learning rate is a finite number, an array, or a schedule (a callable)."""
  if callable(value):
    return
  if value is None or isinstance(value, (str, bytes)):
    raise TypeError(
        f'{name} must be a number or an optax schedule (a callable of the step),'
        f' got {value!r}.')
  _check_number(name, value, -float('inf'))


def _check_bool(name: str, value: Any):
  if not isinstance(value, bool):
    raise TypeError(f'{name} must be a bool, got {value!r}.')


def _paired_or_raise(params: Any, pairing: pairing_lib.Pairing) -> Any:
  paired = pairing_lib.pair_leaves(params, pairing)
  if paired.unpaired:
    raise ValueError(
        'scale_by_lora_rite only transforms LoRA factors, but these leaves are'
        f' not factors under pairing {pairing.name!r}: {list(paired.unpaired)}.'
        ' Use rite_optax.lora_rite (which routes them to a fallback), or'
        ' optax.partition.'
    )
  return paired


def _state_dtype(pairs) -> jnp.dtype:
  """The dtype of the state's scalar diagnostics: the widest compute dtype."""
  return jnp.result_type(jnp.float32, *(fm.compute_dtype(p.a.dtype) for p in pairs))


def scale_by_lora_rite(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    relative_eps: bool = False,
    clip_unmagnified_grad: float = 1.0,
    update_skipping: float = 1.0,
    update_capping: float = 0.0,
    weight_decay: float = 0.0,
    apply_escape: bool = False,
    pairing: str | pairing_lib.Pairing = 'nnx',
) -> optax.GradientTransformationExtraArgs:
  """Rescales LoRA factor gradients by LoRA-RITE's invariant preconditioner.

  For every adapter ``Z = A Bᵀ`` found by ``pairing``, the gradient of each
  factor is expressed in an orthonormal basis of the other factor (the
  unmagnified gradient), preconditioned by the inverse root of an r×r second
  moment that is carried across steps by basis transport, averaged into a
  first moment, and mapped back. The resulting ``Z``-update is the same for
  every equivalent pair ``(A R, B R⁻ᵀ)``. Every leaf of the params must be a
  LoRA factor; :func:`lora_rite` routes other leaves to a fallback.

  A step in which any unmagnified gradient is not finite returns zero updates
  (weight decay included) and leaves the state unchanged except for
  ``skipped``.

  Example::

    >>> import jax.numpy as jnp, optax, rite_optax
    >>> params = {'q': {'lora_a': jnp.ones((8, 2)), 'lora_b': jnp.zeros((2, 4))}}
    >>> tx = optax.chain(rite_optax.scale_by_lora_rite(), optax.scale(-1e-2))
    >>> state = tx.init(params)
    >>> grads = jax.tree.map(jnp.ones_like, params)
    >>> updates, state = tx.update(grads, state, params)

  Args:
    b1: first-moment decay (bias-corrected as in Adafactor).
    b2: second-moment decay (bias-corrected as in Adafactor).
    eps: added to the root of the second moment's eigenvalues. ``0`` is safe:
      eigen-directions of the second moment at rounding level (λ ≤ eps·λ_max of
      its dtype) get no step whatever ``eps`` is (docs/algorithm.md §6.5).
    relative_eps: scale ``eps`` by ``sqrt(λ_max)`` of each second moment.
    clip_unmagnified_grad: clip the global norm of all unmagnified gradients to
      this value; ``<= 0`` or ``inf`` disables.
    update_skipping: zero an adapter's unmagnified gradient when its RMS exceeds
      this value; ``<= 0`` or ``inf`` disables.
    update_capping: cap the RMS of each first moment at this value before it is
      applied; ``<= 0`` or ``inf`` disables.
    weight_decay: adds ``weight_decay·factor`` to each factor's update, outside
      the preconditioner (docs/algorithm.md step 11).
    apply_escape: add the paper's escaped mass to the second moment's
      eigenvalues.
    pairing: a preset name (``'nnx'``) or a :class:`rite_optax.Pairing`.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; ``update`` needs ``params``.
    Its ``init`` carries the resolved pairing (``tx.init.pairing``), which
    :func:`rite_optax.state_partition_specs` and :func:`rite_optax.abstract_state`
    read, so it is given once.

  References:
    Yen et al., `LoRA Done RITE: Robust Invariant Transformation Equilibration
    for LoRA Optimization <https://arxiv.org/abs/2410.20625>`_, ICLR 2025.
  """
  return pairing_lib.with_pairing(_scale_by_lora_rite(
      b1=b1, b2=b2, eps=eps, relative_eps=relative_eps,
      clip_unmagnified_grad=clip_unmagnified_grad, update_skipping=update_skipping,
      update_capping=update_capping, weight_decay=weight_decay, apply_escape=apply_escape,
      pairing=pairing, updates_in_param_dtype=True), pairing)


def _init_state(params: Any, pairing: pairing_lib.Pairing) -> ScaleByLoraRiteState:
  """Zeros for every factor's state; other leaves keep their place (never read)."""
  paired = _paired_or_raise(params, pairing)
  leaves, treedef = jax.tree.flatten(params)
  moments, bases, seconds, escapes = (list(leaves) for _ in range(4))
  for pair in paired.pairs:
    for view in (pair.a, pair.b):
      dtype = fm.compute_dtype(view.dtype)
      moments[view.index] = jnp.zeros(view.shape, dtype)
      bases[view.index] = jnp.zeros(view.shape, dtype)
      seconds[view.index] = jnp.zeros(view.state_shape(view.rank, view.rank), dtype)
      escapes[view.index] = jnp.zeros(view.state_shape(), dtype)
  unflatten = lambda xs: jax.tree.unflatten(treedef, xs)
  dtype = _state_dtype(paired.pairs)
  return ScaleByLoraRiteState(
      count=jnp.zeros([], jnp.int32),
      skipped=jnp.zeros([], jnp.int32),
      first_moment=unflatten(moments),
      basis=unflatten(bases),
      second_moment=unflatten(seconds),
      escaped_mass=unflatten(escapes),
      skipped_factors=jnp.zeros([], jnp.int32),
      skipped_factors_total=jnp.zeros([], jnp.int32),
      grad_norm=jnp.zeros([], dtype),
      clip_scale=jnp.ones([], dtype),
  )


def _next_state(state: ScaleByLoraRiteState, out: engine.Leaves, scalars: core.Scalars,
                treedef: Any) -> ScaleByLoraRiteState:
  """The state after a step: counters and diagnostics move only on an applied step."""
  finite = scalars.finite
  keep_old = lambda new, old: jnp.where(finite, new, old).astype(old.dtype)
  return ScaleByLoraRiteState(
      count=state.count + finite.astype(state.count.dtype),
      skipped=state.skipped + (~finite).astype(state.skipped.dtype),
      **{field: jax.tree.unflatten(treedef, getattr(out, name)) for name, field in _STATE_FIELDS},
      skipped_factors=keep_old(scalars.skipped_factors, state.skipped_factors),
      skipped_factors_total=keep_old(
          state.skipped_factors_total + scalars.skipped_factors, state.skipped_factors_total),
      grad_norm=keep_old(scalars.grad_norm, state.grad_norm),
      clip_scale=keep_old(scalars.clip_scale, state.clip_scale),
  )


def _scale_by_lora_rite(
    *, b1, b2, eps, relative_eps, clip_unmagnified_grad, update_skipping, update_capping,
    weight_decay, apply_escape, pairing, updates_in_param_dtype: bool,
) -> optax.GradientTransformationExtraArgs:
  """:func:`scale_by_lora_rite`; with ``updates_in_param_dtype=False`` the updates stay
  in the compute dtype, so that :func:`lora_rite` rounds them to bf16 params once,
  after the learning rate, not twice."""
  _check_number('b1', b1, 0.0, 1.0)
  _check_number('b2', b2, 0.0, 1.0)
  _check_number('eps', eps, 0.0)
  # Thresholds: <= 0 and +inf both switch the feature off.
  _check_number('clip_unmagnified_grad', clip_unmagnified_grad, -float('inf'), infinite_ok=True)
  _check_number('update_skipping', update_skipping, -float('inf'), infinite_ok=True)
  _check_number('update_capping', update_capping, -float('inf'), infinite_ok=True)
  _check_number('weight_decay', weight_decay, 0.0)
  _check_bool('relative_eps', relative_eps)
  _check_bool('apply_escape', apply_escape)
  pairing = pairing_lib.resolve(pairing)
  capping_off = isinstance(update_capping, numbers.Real) and not 0 < update_capping < math.inf
  hyper = core.Hyper(
      b1=b1, b2=b2, eps=eps, relative_eps=relative_eps,
      clip_unmagnified_grad=clip_unmagnified_grad, update_skipping=update_skipping,
      update_capping=None if capping_off else update_capping,
      weight_decay=None if isinstance(weight_decay, numbers.Real) and weight_decay == 0
      else weight_decay, apply_escape=apply_escape)

  def init_fn(params):
    return _init_state(params, pairing)

  def update_fn(updates, state, params=None, **extra_args):
    if params is None:
      raise ValueError('scale_by_lora_rite needs params: call update(grads, state, params).')
    others_finite = extra_args.get(_OTHERS_FINITE, jnp.array(True))
    paired = _paired_or_raise(params, pairing)
    grads, treedef = jax.tree.flatten(updates)
    leaves = engine.Leaves(
        factors=jax.tree.leaves(params), grads=grads,
        **{name: treedef.flatten_up_to(getattr(state, field)) for name, field in _STATE_FIELDS})
    dtype = _state_dtype(paired.pairs)
    out, scalars = engine.step(hyper, paired.pairs, leaves, state.count.astype(dtype), dtype,
                               updates_in_param_dtype, others_finite)
    return jax.tree.unflatten(treedef, out.factors), _next_state(state, out, scalars, treedef)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


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


UNPAIRED_CHOICES = ('adamw', 'zero', 'error')


def factor_labels(
    pairing: str | pairing_lib.Pairing = 'nnx', unpaired: str = 'adamw'
) -> Callable[[Any], Any]:
  """Returns ``params -> labels``: ``'lora_rite'`` for factors, else ``'unpaired'``.

  With ``unpaired='error'`` the function raises, naming every leaf that is not
  a factor. Use it with ``optax.partition`` to build your own combinations.
  """
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
) -> optax.GradientTransformationExtraArgs:
  """LoRA-RITE for LoRA factors, with a fallback for every other trainable leaf.

  The factors found by ``pairing`` get :func:`scale_by_lora_rite` (with
  ``weight_decay·param`` added outside the preconditioner, as in the paper's
  code), then ``-learning_rate``. Leaves that are not factors (biases, norms, heads)
  are handled as ``unpaired`` says: ``'adamw'`` (``optax.adamw`` with ``b1``,
  ``b2``, ``eps=1e-8``, ``unpaired_learning_rate`` defaulting to
  ``learning_rate``, and ``unpaired_weight_decay``), ``'zero'`` (frozen), or
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

  Returns:
    An ``optax.GradientTransformationExtraArgs``; ``update`` needs ``params``.
    Its ``init`` carries the resolved pairing (``tx.init.pairing``), which
    :func:`rite_optax.state_partition_specs` and :func:`rite_optax.abstract_state`
    read, so it is given once.

  References:
    Yen et al., `LoRA Done RITE: Robust Invariant Transformation Equilibration
    for LoRA Optimization <https://arxiv.org/abs/2410.20625>`_, ICLR 2025.
  """
  if unpaired not in UNPAIRED_CHOICES:
    raise ValueError(
        f'unpaired must be one of {UNPAIRED_CHOICES}, got {unpaired!r}.')
  _check_learning_rate('learning_rate', learning_rate)
  if unpaired_learning_rate is not None:
    _check_learning_rate('unpaired_learning_rate', unpaired_learning_rate)
  _check_number('unpaired_weight_decay', unpaired_weight_decay, 0.0)
  _check_bool('balance_factors', balance_factors)
  rite = optax.chain(
      _scale_by_lora_rite(
          b1=b1, b2=b2, eps=eps, relative_eps=relative_eps,
          clip_unmagnified_grad=clip_unmagnified_grad,
          update_skipping=update_skipping, update_capping=update_capping,
          weight_decay=weight_decay, apply_escape=apply_escape, pairing=pairing,
          updates_in_param_dtype=False),
      optax.scale_by_learning_rate(learning_rate),
  )
  if unpaired == 'adamw':
    fallback = optax.adamw(
        learning_rate if unpaired_learning_rate is None else unpaired_learning_rate,
        b1=b1, b2=b2, eps=1e-8, weight_decay=unpaired_weight_decay)
  else:
    fallback = optax.set_to_zero()
  tx = optax.partition(
      {'lora_rite': rite, 'unpaired': fallback},
      factor_labels(pairing, unpaired))
  if balance_factors:
    tx = optax.chain(tx, balance_lora_factors(pairing))
  return pairing_lib.with_pairing(
      _skip_whole_step(tx, pairing, check_unpaired=unpaired == 'adamw'), pairing)


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


def _skip_whole_step(
    inner: optax.GradientTransformation, pairing: pairing_lib.Pairing, check_unpaired: bool
) -> optax.GradientTransformationExtraArgs:
  """Skips ``inner``'s whole step when any gradient is not finite.

  ``scale_by_lora_rite`` alone skips the factors' step on a non-finite
  unmagnified gradient; here a non-finite gradient of any other leaf (a bias, a
  norm) skips the step too, and a skipped step leaves every update zero and
  every inner state (the fallback's moments, the schedule's count) as it was,
  except LoRA-RITE's ``skipped``, which counts it. Only the other leaves'
  gradients are checked here; LoRA-RITE is told the result (an extra argument)
  and folds it into its own finiteness check, so that it keeps its factor-sized
  state without a second select here, and the step's verdict is read back from
  its ``skipped``. The other leaves are checked only when ``check_unpaired`` (they are
  applied: with ``unpaired='zero'`` they are discarded, and checking them would
  make XLA compute the frozen weights' gradients). Updates come back in the
  params' dtypes, whatever the gradients' dtypes.
  """

  def update_fn(updates, state, params=None, **extra_args):
    if params is None:
      raise ValueError('lora_rite needs params: call update(grads, state, params).')
    paired = pairing_lib.pair_leaves(params, pairing)
    others_finite = jnp.array(True)
    for i, g in enumerate(jax.tree.leaves(updates)):
      if check_unpaired and i not in paired.factor_indices:
        others_finite &= jnp.all(jnp.isfinite(g))
    new_updates, new_state = inner.update(
        updates, state, params, **extra_args, **{_OTHERS_FINITE: others_finite})
    (old_rite,), (new_rite,) = _rite_states(state), _rite_states(new_state)
    finite = new_rite.skipped == old_rite.skipped
    new_updates = jax.tree.map(
        lambda u, p: jnp.where(finite, u, 0).astype(p.dtype), new_updates, params)
    # LoRA-RITE kept its own state on a skipped step (it was told others_finite).
    is_rite = lambda x: isinstance(x, ScaleByLoraRiteState)
    new_state = jax.tree.map(
        lambda new, old: new if is_rite(new) else jnp.where(finite, new, old),
        new_state, state, is_leaf=is_rite)
    return new_updates, new_state

  return optax.GradientTransformationExtraArgs(inner.init, update_fn)
