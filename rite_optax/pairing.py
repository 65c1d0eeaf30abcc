"""Which param leaves are LoRA factors, how they pair, and their canonical views.

A LoRA adapter writes its weight delta as ``Z = A Bᵀ``. LoRA libraries store the
two factors under different names and layouts; this module turns a param tree
into a list of :class:`FactorPair` by matching leaf paths against a static
:class:`Pairing` (a tuple of :class:`FactorRule`). Pairing is by path, never by
leaf order and never by guessing the rank axis from shapes.

Every factor is viewed canonically as ``(batch, rows, r)``: declared batch axes
(scanned layers, experts) first and flattened, the rank axis last, every other
axis flattened into rows. The optimizer math only ever sees canonical views.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from typing import Any, Literal

import jax
import numpy as np

Role = Literal['a', 'b']


@dataclasses.dataclass(frozen=True)
class FactorRule:
  """Recognises one LoRA factor by its param path.

  Attributes:
    pattern: regular expression matched (``re.fullmatch``) against the param path
      written as ``'encoder/layers_0/attention/query/lora_a'``. It must define a
      named group ``pair``: two leaves whose ``pair`` groups are equal (and whose
      roles differ) form one adapter.
    role: ``'a'`` or ``'b'``: which side of ``delta = a @ b`` the leaf is.
    rank_axis: axis of the LoRA rank in the stored array. ``None`` uses the
      matmul convention ``delta = a @ b``: the last non-batch axis for ``a``, the
      first non-batch axis for ``b``.
    batch_axes: axes that index independent adapters (scanned layers, experts).
      They are declared, never guessed, and must have equal sizes in ``a``
      and ``b``.
  """

  pattern: str
  role: Role
  rank_axis: int | None = None
  batch_axes: tuple[int, ...] = ()

  def __post_init__(self):
    if self.role not in ('a', 'b'):
      raise ValueError(f"FactorRule.role must be 'a' or 'b', got {self.role!r}.")
    if 'pair' not in re.compile(self.pattern).groupindex:
      raise ValueError(
          f'FactorRule.pattern {self.pattern!r} must define a named group'
          " '(?P<pair>...)' that identifies the adapter."
      )
    object.__setattr__(self, 'batch_axes', tuple(self.batch_axes))


@dataclasses.dataclass(frozen=True)
class Pairing:
  """A static, hashable description of how to find LoRA factor pairs.

  Attributes:
    rules: the factor rules; a leaf matched by more than one rule is an error.
    name: a label used in messages and :func:`describe`.
  """

  rules: tuple[FactorRule, ...]
  name: str = 'custom'

  def __post_init__(self):
    object.__setattr__(self, 'rules', tuple(self.rules))
    if not self.rules:
      raise ValueError('Pairing needs at least one FactorRule.')


def nnx(batch_axes: Sequence[int] = ()) -> Pairing:
  """Sibling leaves ``lora_a`` (..., m, r) and ``lora_b`` (r, ...): ``delta = a @ b``.

  This is Flax NNX's ``nnx.LoRA`` / ``nnx.LoRALinear`` layout (checked against
  flax 0.12.8, ``flax/nnx/nn/lora.py``: ``lora_a (in_features, lora_rank)``,
  ``lora_b (lora_rank, out_features)``) and the flaxformer-style ``lora_a`` /
  ``lora_b`` of :mod:`t5x_configs`.

  Args:
    batch_axes: axes of stacked adapters, e.g. ``(0,)`` for ``nnx.scan``-ned
      layers or ``(1,)`` for T5X ``scan_layers`` with ``param_scan_axis=1``.
  """
  batch_axes = tuple(batch_axes)
  return Pairing(
      rules=(
          FactorRule(r'(?:(?P<pair>.*)/)?lora_a', 'a', batch_axes=batch_axes),
          FactorRule(r'(?:(?P<pair>.*)/)?lora_b', 'b', batch_axes=batch_axes),
      ),
      name='nnx',
  )


PRESETS = {'nnx': nnx}


def resolve(pairing: str | Pairing) -> Pairing:
  """Returns the :class:`Pairing` for a preset name or a ``Pairing``."""
  if isinstance(pairing, Pairing):
    return pairing
  if isinstance(pairing, str) and pairing in PRESETS:
    return PRESETS[pairing]()
  raise ValueError(
      f'pairing must be one of {sorted(PRESETS)} or a rite_optax.Pairing, got'
      f' {pairing!r}.'
  )


@dataclasses.dataclass(frozen=True)
class FactorView:
  """How one stored factor maps to its canonical ``(batch, rows, r)`` view."""

  path: str
  index: int  # position among the tree's flattened leaves
  shape: tuple[int, ...]
  dtype: Any
  rank_axis: int  # non-negative
  batch_axes: tuple[int, ...]  # non-negative

  @property
  def permutation(self) -> tuple[int, ...]:
    rows = [
        ax
        for ax in range(len(self.shape))
        if ax != self.rank_axis and ax not in self.batch_axes
    ]
    return (*self.batch_axes, *rows, self.rank_axis)

  @property
  def batch_shape(self) -> tuple[int, ...]:
    return tuple(self.shape[ax] for ax in self.batch_axes)

  @property
  def rank(self) -> int:
    return self.shape[self.rank_axis]

  @property
  def rows(self) -> int:
    return math.prod(self.shape) // (math.prod(self.batch_shape) * self.rank)

  @property
  def canonical_shape(self) -> tuple[int, int, int]:
    return (math.prod(self.batch_shape), self.rows, self.rank)

  def to_canonical(self, x: jax.Array) -> jax.Array:
    """(stored layout) -> (batch, rows, r)."""
    return x.transpose(self.permutation).reshape(self.canonical_shape)

  def from_canonical(self, x: jax.Array) -> jax.Array:
    """(batch, rows, r) -> stored layout."""
    permuted = tuple(self.shape[ax] for ax in self.permutation)
    return x.reshape(permuted).transpose(np.argsort(self.permutation))

  def state_shape(self, *trailing: int) -> tuple[int, ...]:
    """Shape of a per-adapter state leaf: ``batch_shape + trailing``."""
    return (*self.batch_shape, *trailing)


@dataclasses.dataclass(frozen=True)
class FactorPair:
  """One adapter: ``delta = a_canonical @ b_canonicalᵀ`` per batch index."""

  key: str
  a: FactorView
  b: FactorView


@dataclasses.dataclass(frozen=True)
class PairedTree:
  """The result of pairing a param tree.

  Attributes:
    pairs: the adapters found, in tree order of their ``a`` factor.
    unpaired: paths of array leaves that are not LoRA factors.
    paths: the '/'-joined path of every flattened leaf, in flatten order.
  """

  pairs: tuple[FactorPair, ...]
  unpaired: tuple[str, ...]
  paths: tuple[str, ...]

  @property
  def factor_indices(self) -> frozenset[int]:
    return frozenset(i for p in self.pairs for i in (p.a.index, p.b.index))


def _key_name(key: Any) -> str:
  for attr in ('key', 'name', 'idx'):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def path_string(path: Sequence[Any]) -> str:
  """Joins a pytree key path into ``'a/b/c'``, ignoring container ``value`` slots."""
  names = [_key_name(k) for k in path]
  # Flax boxes (nnx.Variable, linen Partitioned) flatten to an extra 'value' key.
  while names and names[-1] == 'value':
    names.pop()
  return '/'.join(names)


def _normalize_axis(axis: int, ndim: int, what: str, path: str) -> int:
  if not -ndim <= axis < ndim:
    raise ValueError(
        f'{path}: {what} {axis} is out of range for a {ndim}-d factor.'
    )
  return axis % ndim


def _factor_view(
    rule: FactorRule, path: str, index: int, leaf: Any
) -> FactorView:
  shape = tuple(leaf.shape)
  dtype = leaf.dtype
  if not np.issubdtype(np.dtype(dtype), np.floating) and dtype != jax.numpy.bfloat16:
    raise TypeError(
        f'{path}: LoRA factors must be floating point, got dtype {dtype}.'
    )
  batch_axes = tuple(
      _normalize_axis(ax, len(shape), 'batch axis', path)
      for ax in rule.batch_axes
  )
  if len(set(batch_axes)) != len(batch_axes):
    raise ValueError(f'{path}: repeated batch axes {rule.batch_axes}.')
  if len(shape) < len(batch_axes) + 2:
    raise ValueError(
        f'{path}: a LoRA factor needs a rank axis and at least one row axis'
        f' besides its {len(batch_axes)} batch axes; got shape {shape}.'
    )
  free = [ax for ax in range(len(shape)) if ax not in batch_axes]
  if rule.rank_axis is None:
    rank_axis = free[-1] if rule.role == 'a' else free[0]
  else:
    rank_axis = _normalize_axis(rule.rank_axis, len(shape), 'rank axis', path)
    if rank_axis in batch_axes:
      raise ValueError(f'{path}: rank axis {rank_axis} is also a batch axis.')
  return FactorView(path, index, shape, dtype, rank_axis, batch_axes)


def pair_leaves(tree: Any, pairing: str | Pairing) -> PairedTree:
  """Finds the LoRA factor pairs of a param tree.

  Works on anything with ``.shape`` and ``.dtype`` leaves: arrays,
  ``jax.ShapeDtypeStruct``, tracers.

  Raises:
    ValueError: a factor without its partner, a leaf matched by two rules, two
      factors with the same role and pair key, or shapes that do not pair (rank
      or batch sizes differ). The message names the offending paths.
    TypeError: a factor that is not floating point.
  """
  pairing = resolve(pairing)
  leaves_with_path, _ = jax.tree_util.tree_flatten_with_path(tree)
  found: dict[str, dict[str, FactorView]] = {}
  unpaired = []
  paths = []
  for index, (key_path, leaf) in enumerate(leaves_with_path):
    path = path_string(key_path)
    paths.append(path)
    matches = [
        (rule, m)
        for rule in pairing.rules
        if (m := re.fullmatch(rule.pattern, path)) is not None
    ]
    if not matches:
      unpaired.append(path)
      continue
    if len(matches) > 1:
      raise ValueError(
          f'{path}: ambiguous, matched by {len(matches)} rules of pairing'
          f' {pairing.name!r}: {[r.pattern for r, _ in matches]}.'
      )
    rule, match = matches[0]
    key = match.group('pair') or ''
    slot = found.setdefault(key, {})
    if rule.role in slot:
      raise ValueError(
          f'{path}: ambiguous, {slot[rule.role].path} is also factor'
          f' {rule.role!r} of adapter {key!r}.'
      )
    slot[rule.role] = _factor_view(rule, path, index, leaf)

  pairs = []
  for key, slot in found.items():
    if set(slot) != {'a', 'b'}:
      (role, view), = slot.items()
      other = 'b' if role == 'a' else 'a'
      raise ValueError(
          f'{view.path}: LoRA factor {role!r} has no partner {other!r} (adapter'
          f' {key!r}, pairing {pairing.name!r}). If its partner is frozen or'
          ' masked, freeze or mask both factors.'
      )
    a, b = slot['a'], slot['b']
    if a.rank != b.rank:
      raise ValueError(
          f'{a.path} and {b.path}: rank mismatch, {a.rank} (axis'
          f' {a.rank_axis} of {a.shape}) vs {b.rank} (axis {b.rank_axis} of'
          f' {b.shape}).'
      )
    if a.batch_shape != b.batch_shape:
      raise ValueError(
          f'{a.path} and {b.path}: batch axes differ in size,'
          f' {a.batch_shape} vs {b.batch_shape}.'
      )
    if a.dtype != b.dtype:
      raise TypeError(
          f'{a.path} and {b.path}: factors of one adapter must share a dtype,'
          f' got {a.dtype} and {b.dtype}.'
      )
    pairs.append(FactorPair(key, a, b))
  pairs.sort(key=lambda p: p.a.index)
  return PairedTree(tuple(pairs), tuple(unpaired), tuple(paths))
