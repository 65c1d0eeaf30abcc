"""Which param leaves are LoRA factors, how they pair, and their canonical views.

A LoRA adapter writes its weight delta as ``Z = A Bᵀ``. LoRA libraries store the
two factors under different names and layouts; this module turns a param tree
into a list of :class:`FactorPair` by matching leaf paths against a static
:class:`Pairing` (a tuple of :class:`FactorRule`). Pairing is by path, never by
leaf order and never by guessing the rank axis from shapes.

Every factor is viewed as ``(batch, rows, r)`` (:meth:`FactorView.to_canonical`):
declared batch axes (scanned layers, experts) first and flattened, the rank axis
last, every other axis flattened into rows. The optimizer computes in the layout
closest to the stored one (:meth:`FactorView.to_compute`): rank-major
``(batch, r, rows)`` when the rank axis precedes the rows (``lora_b (r, n)``), so
that no factor is ever transposed in memory.
"""

from __future__ import annotations

import dataclasses
import math
import re
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import Any, Literal

import jax
import numpy as np
import optax

Role = Literal['a', 'b']


@dataclasses.dataclass(frozen=True)
class FactorRule:
  """Recognises one LoRA factor by its param path.

  Attributes:
    pattern: regular expression matched (``re.fullmatch``) against the param path
      written as ``'encoder/layers_0/attention/query/lora_a'``. It must define a
      named group ``pair``: two leaves whose ``pair`` groups are equal (and whose
      roles differ) form one adapter. Other named groups (e.g. an adapter name
      in the middle of the path) are appended to the key, ``pair[value]``.
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


def _leading(batch_axes: Sequence[int], preset: str) -> tuple[int, ...]:
  batch_axes = tuple(batch_axes)
  if sorted(batch_axes) != list(range(len(batch_axes))):
    raise ValueError(
        f'{preset}(batch_axes={batch_axes}): this preset fixes its rank axes by'
        ' position, so batch axes must be the leading axes (0, 1, ...). Write a'
        ' rite_optax.regex rule for other layouts.'
    )
  return batch_axes


def qwix(batch_axes: Sequence[int] = ()) -> Pairing:
  """MaxText / Tunix LoRA made by qwix: ``<w>_lora_a`` and ``<w>_lora_b``.

  Checked against google/qwix ``qwix/_src/providers/lora.py`` (commit
  0b9ddbd8): ``_get_or_create_lora_params`` stores ``name + '_lora_a'`` and
  ``name + '_lora_b'`` next to the weight ``name`` (e.g. ``kernel_lora_a``).
  Shapes: ``dot_general`` gives ``a (batch..., prod(contract), r)`` and
  ``b (batch..., r, prod(remain))``; ``einsum`` gives ``a (shared dims..., r)``
  and ``b (r, output-only dims...)``; ``conv`` gives ``a (*window, in, r)`` and
  ``b (r, out)``. The rank is the last non-batch axis of ``a`` and the first
  of ``b``, ``delta = a @ b``.

  Args:
    batch_axes: the ``dot_general`` batch axes (leading in both factors) or
      the scanned-layer axis of MaxText (``param_scan_axis``); declared, never
      guessed. Einsum dims shared with the input live in ``a`` only: they are
      rows, not batch axes.
  """
  batch_axes = tuple(batch_axes)
  return Pairing(
      rules=(
          FactorRule(r'(?P<pair>.+)_lora_a', 'a', batch_axes=batch_axes),
          FactorRule(r'(?P<pair>.+)_lora_b', 'b', batch_axes=batch_axes),
      ),
      name='qwix',
  )


def gemma_peft(batch_axes: Sequence[int] = ()) -> Pairing:
  """The ``gemma.peft`` linen adapters: ``<layer>/lora/a`` and ``<layer>/lora/b``.

  Checked against google-deepmind/gemma ``gemma/peft/_lora.py`` (commit
  09471c79) and ``_einsum_utils.py``: the adapter module is named ``'lora'``
  with params ``'a'`` and ``'b'``. ``LoRADense``: ``a (in, r)``,
  ``b (r, features)``. ``LoRAEinsum`` (``'BTNH,NHD->BTD'``): ``a (N, H, r)``,
  ``b (r, D)``, i.e. ``a (in dims..., r)``, ``b (r, out dims...)``.
  ``LoRADenseGeneral``: ``a (batch..., axis dims..., r)``,
  ``b (batch..., r, features...)``. ``delta = a @ b`` over the rank.

  Args:
    batch_axes: ``LoRADenseGeneral`` ``batch_dims`` or a scanned-layer axis.
  """
  batch_axes = tuple(batch_axes)
  return Pairing(
      rules=(
          FactorRule(r'(?:(?P<pair>.*)/)?lora/a', 'a', batch_axes=batch_axes),
          FactorRule(r'(?:(?P<pair>.*)/)?lora/b', 'b', batch_axes=batch_axes),
      ),
      name='gemma_peft',
  )


def lorax(batch_axes: Sequence[int] = (), positional: bool = False) -> Pairing:
  """lorax (davisyoshida/lorax) ``LoraNode``/``LoraWeight``: ``delta = b @ a``.

  Checked against davisyoshida/lorax ``lorax/transform.py`` (commit 977f0f13):
  ``init_lora`` splits a kernel ``(in, out)`` into ``b (in, r)`` (zeros) and
  ``a (r, out)`` (normal), ``LoraNode.evaluate`` is ``b @ a``; for a conv
  kernel ``(*window, in, out)``: ``b (*window, in, r)``, ``a (1, ..., 1, r,
  out)``. The roles are swapped with respect to ``delta = a @ b``: lorax's
  ``b`` is this library's ``a`` (rank last) and lorax's ``a`` is this
  library's ``b`` (rank second to last, which covers the conv layout).

  Args:
    batch_axes: leading axes of stacked adapters.
    positional: ``LoraNode`` (lorax 0.1) flattens without key names, so its
      ``a`` and ``b`` appear as ``<kernel>/0`` and ``<kernel>/1``; set this to
      pair those paths instead of ``<kernel>/a`` and ``<kernel>/b`` (the
      field names of lorax 0.2's ``LoraWeight``).
  """
  batch_axes = _leading(batch_axes, 'lorax')
  a_name, b_name = ('0', '1') if positional else ('a', 'b')
  return Pairing(
      rules=(
          FactorRule(rf'(?P<pair>.+)/{b_name}', 'a', batch_axes=batch_axes),
          FactorRule(
              rf'(?P<pair>.+)/{a_name}', 'b', rank_axis=-2, batch_axes=batch_axes
          ),
      ),
      name='lorax',
  )


def peft(batch_axes: Sequence[int] = ()) -> Pairing:
  """Hugging Face PEFT names and torch layouts, as found after conversion.

  Checked against huggingface/peft ``src/peft/tuners/lora/layer.py`` (the
  public text of the 0.1x releases and main; the earliest releases stored
  embedding factors transposed, which needs a :func:`regex` rule):
  ``lora_A`` is ``nn.Linear(in, r)``, weight ``(r, in)``; ``lora_B`` is
  ``nn.Linear(r, out)``, weight ``(out, r)``; ``delta_W = lora_B @ lora_A``
  (``(out, in)``). Paths look like
  ``base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight``
  (in the model) or ``...q_proj.lora_A.weight`` (in a saved adapter), with
  ``.`` or ``/`` separators; the adapter name (``default``) is part of the pair
  key. Embeddings: ``lora_embedding_A (r, num_embeddings)``,
  ``lora_embedding_B (embedding_dim, r)``. So ``lora_B`` plays ``a`` (rank
  axis 1 after the batch axes) and ``lora_A`` plays ``b`` (rank axis 0).

  Args:
    batch_axes: leading axes of stacked adapters (layers stacked after
      conversion).
  """
  batch_axes = _leading(batch_axes, 'peft')
  nb = len(batch_axes)
  tail = r'(?:[./](?P<adapter>[^./]+))?[./]weight'
  return Pairing(
      rules=(
          FactorRule(rf'(?P<pair>.+)[./]lora_B{tail}', 'a', nb + 1, batch_axes),
          FactorRule(rf'(?P<pair>.+)[./]lora_A{tail}', 'b', nb, batch_axes),
          FactorRule(
              r'(?P<pair>.+)[./]lora_embedding_B(?:[./](?P<adapter>[^./]+))?',
              'a', nb + 1, batch_axes,
          ),
          FactorRule(
              r'(?P<pair>.+)[./]lora_embedding_A(?:[./](?P<adapter>[^./]+))?',
              'b', nb, batch_axes,
          ),
      ),
      name='peft',
  )


def regex(
    a: str,
    b: str,
    *,
    a_rank_axis: int | None = None,
    b_rank_axis: int | None = None,
    batch_axes: Sequence[int] = (),
    name: str = 'regex',
) -> Pairing:
  """A user rule for any other layout: two path patterns and the rank axes.

  Example::

    pairing = rite_optax.regex(
        r'(?P<pair>.+)/down', r'(?P<pair>.+)/up', b_rank_axis=0)

  Args:
    a: pattern (``re.fullmatch`` on ``'x/y/z'`` paths, with a named group
      ``pair``) of the factor whose rows are the input side, ``delta = a @ b``.
    b: pattern of the other factor.
    a_rank_axis: rank axis of ``a``; ``None`` is its last non-batch axis.
    b_rank_axis: rank axis of ``b``; ``None`` is its first non-batch axis.
    batch_axes: axes of stacked adapters, the same in both factors.
    name: a label for messages and :func:`describe`.

  Returns:
    The :class:`Pairing`.
  """
  batch_axes = tuple(batch_axes)
  return Pairing(
      rules=(
          FactorRule(a, 'a', a_rank_axis, batch_axes),
          FactorRule(b, 'b', b_rank_axis, batch_axes),
      ),
      name=name,
  )


PRESETS = {
    'nnx': nnx,
    'qwix': qwix,
    'gemma_peft': gemma_peft,
    'lorax': lorax,
    'peft': peft,
}


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
class _InitWithPairing:
  """A transformation's ``init`` that also says which :class:`Pairing` it was built with.

  :func:`rite_optax.state_partition_specs` needs the factors' batch axes, which only
  the pairing knows; carrying it on ``init`` spares the caller from repeating it. It
  calls like the wrapped ``init`` (``jit``, ``eval_shape``, optax combinators).
  """

  init: Callable[[Any], Any]
  pairing: Pairing

  def __call__(self, params: Any) -> Any:
    return self.init(params)


def with_pairing(
    tx: optax.GradientTransformation, pairing: str | Pairing
) -> optax.GradientTransformationExtraArgs:
  """``tx`` whose ``init`` carries the resolved ``pairing`` (read by :func:`carried_pairing`)."""
  return optax.GradientTransformationExtraArgs(
      _InitWithPairing(tx.init, resolve(pairing)), tx.update)


def carried_pairing(tx: optax.GradientTransformation) -> Pairing | None:
  """The pairing ``tx`` was built with (:func:`with_pairing`), or ``None`` when it
  carries none (e.g. an ``optax.chain`` built around ``scale_by_lora_rite``)."""
  return tx.init.pairing if isinstance(tx.init, _InitWithPairing) else None


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
  def rank_major(self) -> bool:
    """Whether the rank axis comes before every row axis (``lora_b (r, n)``)."""
    return all(self.rank_axis < ax for ax in self._row_axes)

  @property
  def _row_axes(self) -> list[int]:
    return [ax for ax in range(len(self.shape))
            if ax != self.rank_axis and ax not in self.batch_axes]

  @property
  def permutation(self) -> tuple[int, ...]:
    """Stored axes -> compute layout: batch axes, then rank and rows in stored order."""
    if self.rank_major:
      return (*self.batch_axes, self.rank_axis, *self._row_axes)
    return (*self.batch_axes, *self._row_axes, self.rank_axis)

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

  @property
  def compute_shape(self) -> tuple[int, int, int]:
    """``(batch, r, rows)`` when :attr:`rank_major`, else ``(batch, rows, r)``."""
    batch, rows, rank = self.canonical_shape
    return (batch, rank, rows) if self.rank_major else (batch, rows, rank)

  def to_compute(self, x: jax.Array) -> jax.Array:
    """(stored layout) -> :attr:`compute_shape`: a reshape, with no transpose unless
    the rank axis sits between row axes or the batch axes are not leading."""
    return x.transpose(self.permutation).reshape(self.compute_shape)

  def from_compute(self, x: jax.Array) -> jax.Array:
    """:attr:`compute_shape` -> stored layout."""
    permuted = tuple(self.shape[ax] for ax in self.permutation)
    return x.reshape(permuted).transpose(np.argsort(self.permutation))

  def to_canonical(self, x: jax.Array) -> jax.Array:
    """(stored layout) -> (batch, rows, r)."""
    x = self.to_compute(x)
    return x.swapaxes(-1, -2) if self.rank_major else x

  def from_canonical(self, x: jax.Array) -> jax.Array:
    """(batch, rows, r) -> stored layout."""
    return self.from_compute(x.swapaxes(-1, -2) if self.rank_major else x)

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


def layout_warning(pair: FactorPair) -> str | None:
  """Why a pair's layout looks misread, or ``None``.

  A LoRA rank above the row counts of both factors is almost always a transposed
  layout read with the wrong rank axis: a torch/PEFT tree ``lora_a (r, in)``,
  ``lora_b (out, r)`` with ``in == out`` pairs under the ``nnx`` convention with
  "rank" ``in`` and r rows on both sides. (One narrow side is legitimate: a router
  with 8 outputs adapted at r = 16.) Shapes alone cannot tell, so this warns (in
  :func:`pair_leaves` and :func:`describe`) rather than guess.
  """
  a, b = pair.a, pair.b
  if a.rank <= max(a.rows, b.rows):
    return None
  return (
      f'{a.path} {a.shape} and {b.path} {b.shape}: rank {a.rank} is larger than the'
      f' rows of both factors ({a.rows} and {b.rows}); the layout may be transposed (torch/PEFT'
      " stores lora_A (r, in) and lora_B (out, r): use pairing='peft', or a rite_optax.regex"
      ' rule with explicit rank axes).')


def _checked_pair(key: str, a: FactorView, b: FactorView) -> FactorPair:
  """The pair of ``a`` and ``b``, or an error naming both paths; warns on a suspect layout."""
  if a.rank != b.rank:
    raise ValueError(
        f'{a.path} and {b.path}: rank mismatch, {a.rank} (axis'
        f' {a.rank_axis} of {a.shape}) vs {b.rank} (axis {b.rank_axis} of'
        f' {b.shape}).'
    )
  if a.rank == 0:
    raise ValueError(f'{a.path} and {b.path}: rank 0 (shapes {a.shape}, {b.shape}).')
  if 0 in a.shape or 0 in b.shape:
    raise ValueError(
        f'{a.path} and {b.path}: zero-size factor (shapes {a.shape}, {b.shape}); an adapter'
        ' needs rows on both sides.')
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
  pair = FactorPair(key, a, b)
  if (suspect := layout_warning(pair)):
    warnings.warn(suspect, stacklevel=3)
  return pair


def pair_leaves(tree: Any, pairing: str | Pairing) -> PairedTree:
  """Finds the LoRA factor pairs of a param tree.

  Works on anything with ``.shape`` and ``.dtype`` leaves: arrays,
  ``jax.ShapeDtypeStruct``, tracers.

  Raises:
    ValueError: a factor without its partner, a leaf matched by two rules, two
      factors with the same role and pair key, or shapes that do not pair (rank
      or batch sizes differ, rank 0, a zero-size factor). The message names the
      offending paths.

  Warns (``UserWarning``) when a pair's rank exceeds a factor's rows
  (:func:`layout_warning`).
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
    key = (match.group('pair') or '') + ''.join(
        f'[{v}]' for g, v in match.groupdict().items() if g != 'pair' and v
    )
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
    pair = _checked_pair(key, slot['a'], slot['b'])
    pairs.append(pair)
  pairs.sort(key=lambda p: p.a.index)
  return PairedTree(tuple(pairs), tuple(unpaired), tuple(paths))


def require_pairs(tree: Any, paired: PairedTree, pairing: str | Pairing) -> None:
  """Raises :func:`no_pairs_error` when ``pairing`` found no pair in ``tree``.

  A tree without leaves of the type ``optax.tree_map_params`` passes to ``init``
  (its params placeholder) is let through: it asks for the state's layout, not
  for an optimizer of nothing.
  """
  placeholder = type(tree).__name__ == '_ParamsPlaceholder' and not jax.tree.leaves(tree)
  if not paired.pairs and not placeholder:
    raise no_pairs_error(tree, pairing)


def no_pairs_error(tree: Any, pairing: str | Pairing) -> ValueError:
  """The error for a tree in which ``pairing`` finds no pair, naming the presets that
  do find pairs in it (a forgotten ``pairing='qwix'``, say)."""
  pairing = resolve(pairing)
  fits = []
  for name in PRESETS:
    with warnings.catch_warnings():
      warnings.simplefilter('ignore')
      try:
        if name != pairing.name and pair_leaves(tree, name).pairs:
          fits.append(name)
      except (ValueError, TypeError):
        pass
  paths = [path_string(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
  hint = (f' They pair under pairing={" or ".join(map(repr, fits))}.' if fits
          else ' Pass the pairing preset or Pairing that matches the factor names.')
  shown = paths[:8] + (['...'] if len(paths) > 8 else [])
  return ValueError(
      f'pairing {pairing.name!r} finds no LoRA factor pair in the params (leaves: {shown}).'
      + hint)


def describe(
    params: Any, pairing: str | Pairing = 'nnx', *, print_output: bool = True
) -> str:
  """Summarises the pairs, canonical shapes, batch axes and unpaired leaves.

  The first thing to run on a new model: it shows what :func:`lora_rite` will
  do with each leaf. Works on arrays, ``jax.ShapeDtypeStruct`` and flax
  containers (``nnx.State``, ``nn.Partitioned``).

  Example::

    >>> model = nnx.LoRALinear(8, 4, lora_rank=2, rngs=nnx.Rngs(0))
    >>> _ = rite_optax.describe(nnx.state(model, nnx.Param))  # doctest: +SKIP
    pairing 'nnx': 1 pair, 2 unpaired leaves
      lora: a lora/lora_a (8, 2) rank axis 1 | b lora/lora_b (2, 4) rank axis 0
        canonical (1, 8, 2) x (1, 4, 2), batch axes a () b ()
    unpaired (AdamW fallback, 'zero' or 'error' in lora_rite):
      bias (4,)
      kernel (8, 4)

  Args:
    params: the trainable param tree.
    pairing: a preset name or a :class:`Pairing`.
    print_output: also print the summary to stdout.

  Returns:
    The summary text.

  Raises:
    ValueError, TypeError: as :func:`pair_leaves`.
  """
  pairing = resolve(pairing)
  paired = pair_leaves(params, pairing)
  leaves = jax.tree_util.tree_leaves(params)
  n_pairs, n_unpaired = len(paired.pairs), len(paired.unpaired)
  lines = [
      f'pairing {pairing.name!r}: {n_pairs} pair{"s" * (n_pairs != 1)},'
      f' {n_unpaired} unpaired {"leaf" if n_unpaired == 1 else "leaves"}'
  ]
  for pair in paired.pairs:
    a, b = pair.a, pair.b
    lines.append(
        f'  {pair.key or "<root>"}: a {a.path} {a.shape} rank axis'
        f' {a.rank_axis} | b {b.path} {b.shape} rank axis {b.rank_axis}'
    )
    lines.append(
        f'    canonical {a.canonical_shape} x {b.canonical_shape}, batch axes'
        f' a {a.batch_axes} b {b.batch_axes}'
    )
    if (suspect := layout_warning(pair)):
      lines.append(f'    warning: {suspect}')
  if paired.unpaired:
    lines.append(
        "unpaired (AdamW fallback, 'zero' or 'error' in lora_rite):"
    )
    for i, path in enumerate(paired.paths):
      if path in paired.unpaired and i not in paired.factor_indices:
        lines.append(f'  {path} {tuple(getattr(leaves[i], "shape", ()))}')
  text = '\n'.join(lines)
  if print_output:
    print(text, file=sys.stdout)
  return text
