"""Sharding of optimizer state: partition specs and abstract state for Orbax.

The state of :func:`rite_optax.scale_by_lora_rite` has three kinds of leaves:
factor-shaped (first moment, basis), which copy their factor's spec; per-adapter
r×r matrices and scalars (second moment, escaped mass), which keep the spec
entries of the factor's batch axes (scanned layers, experts) and are replicated
otherwise; and the step counters, replicated. Every other params-structured
state (AdamW's ``mu``/``nu`` of unpaired leaves, inside ``optax.chain``,
``optax.partition`` or ``optax.inject_hyperparams``) copies the param specs,
and every remaining leaf is replicated.

This policy is written once, in :func:`lora_rite_state_specs`; T5X's partition
rule (``t5x_configs.partition_rules``) calls it too, so a T5X run and
:func:`state_partition_specs` shard the state alike. The factors' batch axes
come from the pairing, which ``lora_rite`` and ``scale_by_lora_rite`` carry on
their ``init`` (:func:`rite_optax.pairing.carried_pairing`).

Everything works from ``jax.ShapeDtypeStruct`` leaves (``jax.eval_shape``), so
the specs exist before any array does. Spec entries are copied, never
interpreted, so logical axis names (T5X/flax ``nn.partitioning``) work the same
as mesh axis names.

On a mesh the update needs no factor-sized communication because each basis
comes from the eigh of the factor's r×r Gram matrix (docs/algorithm.md §4a): a
row-sharded factor contributes a partial Gram, and only that r×r all-reduce
crosses devices. Householder QR does not partition: XLA all-gathers the whole
factor first (measured on 8 CPU devices: ``jnp.linalg.qr`` of a row-sharded
f32[4096, 16] compiles to one all-gather of f32[4096, 16]; the Gram basis to
one all-reduce of f32[16, 16]). ``tests/test_sharding.py`` asserts on the
compiled HLO of a sharded step that no all-gather appears.
"""

from __future__ import annotations

from typing import Any

import jax
import optax
from jax.sharding import NamedSharding, PartitionSpec

from rite_optax import pairing as pairing_lib
from rite_optax.transform import ScaleByLoraRiteState

_MASKED = optax.MaskedNode


def _entries(spec: PartitionSpec | None, ndim: int) -> tuple[Any, ...]:
  """A spec's entries padded with ``None`` to ``ndim`` (``None`` spec: replicated)."""
  entries = () if spec is None else tuple(spec)
  if len(entries) > ndim:
    raise ValueError(f'PartitionSpec {spec} has more entries than the {ndim} dims of its param.')
  return entries + (None,) * (ndim - len(entries))


def _specs_by_path(tree: Any, param_specs: Any) -> dict[str, tuple[Any, ...]]:
  """Path -> the param spec's entries, one per dim of ``tree``'s leaf there.

  ``tree`` has the params' structure: the params, or a params-structured state
  field (``optax.MaskedNode`` where an enclosing ``optax.partition`` masked a
  leaf; masked paths are left out).
  """
  leaves, treedef = jax.tree_util.tree_flatten_with_path(
      tree, is_leaf=lambda x: isinstance(x, _MASKED))
  specs = treedef.flatten_up_to(param_specs)
  return {
      pairing_lib.path_string(path): _entries(spec, len(leaf.shape))
      for (path, leaf), spec in zip(leaves, specs, strict=True)
      if not isinstance(leaf, _MASKED)
  }


def _params_structured(node: Any, treedef: Any) -> bool:
  """Whether ``node`` has the params' structure (masked leaves count as leaves)."""
  return jax.tree.structure(node, is_leaf=lambda x: isinstance(x, _MASKED)) == treedef


def _copy_param_specs(node: Any, by_path: dict[str, tuple[Any, ...]]) -> Any:
  """Param-shaped leaves take their param's spec; other shapes are replicated."""

  def spec(path, leaf):
    entries = by_path[pairing_lib.path_string(path)]
    return PartitionSpec(*entries) if len(entries) == len(leaf.shape) else PartitionSpec()

  return jax.tree_util.tree_map_with_path(spec, node)


def lora_rite_state_specs(
    state: ScaleByLoraRiteState, param_specs: Any, pairing: pairing_lib.Pairing
) -> ScaleByLoraRiteState:
  """Partition specs of one ``ScaleByLoraRiteState``: the one sharding policy of
  LoRA-RITE's state, used by :func:`state_partition_specs` and by T5X's partition
  rule (``t5x_configs.partition_rules``).

  ``first_moment`` and ``basis`` copy their factor's spec; ``second_moment``
  ``(*batch, r, r)`` keeps the entries of the factor's batch axes (scanned layers,
  experts) followed by ``None, None``, and ``escaped_mass`` ``(*batch,)`` the batch
  entries alone, so a layer-sharded stack keeps each layer's r×r state on the
  devices of its layer; the counters and diagnostics are replicated.
  ``optax.MaskedNode`` leaves stay as they are.

  Args:
    state: the state (arrays or ``jax.ShapeDtypeStruct`` s); its fields have the
      params' structure.
    param_specs: the params' ``PartitionSpec`` s (or ``None``, replicated), mesh or
      logical axis names: entries are copied, never interpreted.
    pairing: the pairing the transformation was built with; it says the batch axes.

  Returns:
    A ``ScaleByLoraRiteState`` of ``PartitionSpec`` s (and ``MaskedNode`` s).
  """
  # The first moment has the (possibly masked) factors' shapes, so pairing it
  # finds the batch axes without the params themselves.
  try:
    pairs = pairing_lib.pair_leaves(state.first_moment, pairing).pairs
  except ValueError as e:
    raise ValueError(
        f'{e} (reading the LoRA-RITE state with pairing {pairing.name!r}: the state\'s'
        ' specs need the pairing given to the transformation)') from e
  views = {view.path: view for pair in pairs for view in (pair.a, pair.b)}
  by_path = _specs_by_path(state.first_moment, param_specs)

  def per_adapter(trailing: int):
    def spec(path, leaf):
      path = pairing_lib.path_string(path)
      if path not in views:
        raise ValueError(
            f'{path} has LoRA-RITE state, but it is not a factor under pairing'
            f' {pairing.name!r}: the state\'s specs need the pairing given to the'
            ' transformation.')
      batch = tuple(by_path[path][ax] for ax in views[path].batch_axes)
      if len(batch) + trailing != len(leaf.shape):
        raise ValueError(
            f'{path}: its LoRA-RITE state has shape {tuple(leaf.shape)}, but pairing'
            f' {pairing.name!r} gives it {len(batch)} batch axes: the state\'s specs'
            ' need the pairing given to the transformation.')
      return PartitionSpec(*batch, *(None,) * trailing)
    return spec

  map_with_path = jax.tree_util.tree_map_with_path
  return ScaleByLoraRiteState(
      count=PartitionSpec(),
      skipped=PartitionSpec(),
      first_moment=_copy_param_specs(state.first_moment, by_path),
      basis=_copy_param_specs(state.basis, by_path),
      second_moment=map_with_path(per_adapter(2), state.second_moment),
      escaped_mass=map_with_path(per_adapter(0), state.escaped_mass),
      skipped_factors=PartitionSpec(),
      skipped_factors_total=PartitionSpec(),
      grad_norm=PartitionSpec(),
      clip_scale=PartitionSpec(),
  )


def _children(node: Any) -> tuple[list[Any], Any]:
  """One level of a pytree node: its direct children and how to rebuild it."""
  return jax.tree.flatten(node, is_leaf=lambda x: x is not node)


def _pairing_of(
    tx: optax.GradientTransformation, pairing: str | pairing_lib.Pairing | None
) -> pairing_lib.Pairing | None:
  """The pairing to read ``tx``'s state with: the one given, else the one ``tx`` carries."""
  carried = pairing_lib.carried_pairing(tx)
  if pairing is None:
    return carried
  pairing = pairing_lib.resolve(pairing)
  if carried is not None and carried != pairing:
    names = ((carried.name, pairing.name) if carried.name != pairing.name
             else (carried, pairing))
    raise ValueError(
        f'pairing={names[1]!r} differs from the pairing the transformation was built'
        f' with, {names[0]!r}: leave pairing out (None) to use the transformation\'s.')
  return pairing


def state_partition_specs(
    tx: optax.GradientTransformation,
    params: Any,
    param_specs: Any,
    pairing: str | pairing_lib.Pairing | None = None,
) -> Any:
  """Partition specs of ``tx``'s state, derived from the params' specs.

  Each ``ScaleByLoraRiteState`` gets :func:`lora_rite_state_specs`: first moment
  and basis copy their factor's spec, the second moment and escaped mass keep
  the factor's batch-axis entries, counters and diagnostics are replicated. Any
  other params-structured state (e.g. AdamW's ``mu``/``nu``) copies the param
  specs, ``optax.MaskedNode`` leaves of ``optax.partition`` stay as they are,
  and every other leaf is replicated (``PartitionSpec()``).

  Example::

    >>> import jax, jax.numpy as jnp, rite_optax
    >>> from jax.sharding import PartitionSpec as P
    >>> params = {'q': {'lora_a': jax.ShapeDtypeStruct((64, 4), jnp.float32),
    ...                 'lora_b': jax.ShapeDtypeStruct((4, 32), jnp.float32)}}
    >>> specs = {'q': {'lora_a': P('data', None), 'lora_b': P(None, 'model')}}
    >>> tx = rite_optax.lora_rite(1e-3)
    >>> state_specs = rite_optax.state_partition_specs(tx, params, specs)

  Args:
    tx: the transformation whose state is described (``lora_rite``,
      ``scale_by_lora_rite``, or any optax combination containing them).
    params: the params, or their ``jax.ShapeDtypeStruct`` s.
    param_specs: a tree of ``PartitionSpec`` (or ``None``, replicated) with
      the structure of ``params``; entries may be mesh or logical axis names.
    pairing: ``None`` (default) reads the pairing ``tx`` carries
      (``lora_rite`` and ``scale_by_lora_rite`` carry theirs); a preset name or
      a :class:`rite_optax.Pairing` is needed when ``tx`` is a combination built
      around them (``optax.chain``, ``optax.inject_hyperparams``), and must equal
      the carried one when there is one.

  Returns:
    A tree of ``PartitionSpec`` (and ``optax.MaskedNode``) with the structure
    of ``tx.init(params)``.

  Raises:
    ValueError: ``pairing`` differs from the one ``tx`` carries; the state holds
      a ``ScaleByLoraRiteState``, ``tx`` carries no pairing and none is given; or
      the pairing does not describe the state (naming the param path).
  """
  pairing = _pairing_of(tx, pairing)
  abstract = jax.eval_shape(tx.init, params)
  treedef = jax.tree.structure(params)
  by_path = _specs_by_path(params, param_specs)

  def describe(node):
    if isinstance(node, ScaleByLoraRiteState):
      if pairing is None:
        raise ValueError(
            'The state holds a ScaleByLoraRiteState, but the transformation carries no'
            ' pairing (an optax.chain, optax.inject_hyperparams, ... built around'
            ' lora_rite or scale_by_lora_rite): pass pairing=, the one given to them.')
      return lora_rite_state_specs(node, param_specs, pairing)
    if isinstance(node, _MASKED) or node is None:
      return node
    if _params_structured(node, treedef):
      return _copy_param_specs(node, by_path)
    children, node_def = _children(node)
    if node_def.num_nodes == 1 and node_def.num_leaves == 1:  # an array leaf
      return PartitionSpec()
    return jax.tree.unflatten(node_def, [describe(child) for child in children])

  return describe(abstract)


def abstract_state(
    tx: optax.GradientTransformation,
    params: Any,
    param_specs: Any,
    mesh: jax.sharding.Mesh,
    pairing: str | pairing_lib.Pairing | None = None,
) -> Any:
  """``tx``'s state as ``jax.ShapeDtypeStruct`` s with their ``NamedSharding``.

  This is the restore target Orbax expects (``StandardCheckpointer.restore``,
  ``args.StandardRestore``), and the ``out_shardings`` source for a jitted
  ``tx.init``; restoring onto another mesh only needs another ``mesh``.

  Example::

    >>> import orbax.checkpoint as ocp
    >>> target = rite_optax.abstract_state(tx, params, specs, mesh)  # doctest: +SKIP
    >>> state = ocp.StandardCheckpointer().restore(path, target)  # doctest: +SKIP

  Args:
    tx: the transformation, see :func:`state_partition_specs`.
    params: the params, or their ``jax.ShapeDtypeStruct`` s.
    param_specs: the params' ``PartitionSpec`` s, in ``mesh`` axis names.
    mesh: the mesh the state lives (or will be restored) on.
    pairing: ``None`` for the pairing ``tx`` carries, see :func:`state_partition_specs`.

  Returns:
    The abstract state: ``jax.ShapeDtypeStruct`` leaves with ``sharding`` set.
  """
  specs = state_partition_specs(tx, params, param_specs, pairing)
  abstract = jax.eval_shape(tx.init, params)
  return jax.tree.map(
      lambda leaf, spec: jax.ShapeDtypeStruct(
          leaf.shape, leaf.dtype, sharding=NamedSharding(mesh, spec)),
      abstract, specs)
