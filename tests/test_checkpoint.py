"""Checkpoints of the full train state: Orbax across meshes, float32 counters, flax."""

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import serialization

import rite_optax
from tests.test_sharding import (
  SCANNED,
  make_mesh,
  optimizer,
  problem,
  rite_state,
  row_specs,
  shardings,
  train_step,
)

SAVE_AT, STEPS = 10, 20
ALL = ('data', 'model')


def layout(mesh_shape, specs):
  """Mesh, param shardings and state shardings of one layout."""
  mesh = make_mesh(*mesh_shape)
  params, _ = problem()
  state_specs = rite_optax.state_partition_specs(optimizer(), params, specs, SCANNED)
  return mesh, shardings(specs, mesh), shardings(state_specs, mesh)


FLAT = (((8,), ('data',)), row_specs('data'))
# Rows over both axes of (2, 4): the same 8-way split as FLAT, on another mesh.
SQUARE = (((2, 4), ALL), row_specs(ALL))
# Scanned layers over 'data', rows over 'model': another layout altogether.
SQUARE_2D = (((2, 4), ALL), row_specs('data', 'model'))


class Trainer:
  """Jitted steps of the test problem on one layout."""

  def __init__(self, mesh_shape, specs):
    self.mesh, self.param_shardings, self.state_shardings = layout(mesh_shape, specs)
    self.tx = optimizer()
    self.step = jax.jit(train_step(self.tx),
                        out_shardings=(self.param_shardings, self.state_shardings))
    params, targets = problem()
    self.targets = targets
    self.initial = {
        'params': jax.device_put(params, self.param_shardings),
        'opt_state': jax.jit(self.tx.init, out_shardings=self.state_shardings)(params),
    }

  def abstract(self):
    """The restore target: the train state's ShapeDtypeStructs with shardings."""
    params = jax.eval_shape(lambda: problem()[0])
    return {
        'params': jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), params,
            self.param_shardings),
        # The pairing is the one self.tx carries.
        'opt_state': rite_optax.abstract_state(
            self.tx, params, jax.tree.map(lambda s: s.spec, self.param_shardings), self.mesh),
    }

  def place(self, train_state):
    return jax.device_put(train_state, {'params': self.param_shardings,
                                        'opt_state': self.state_shardings})

  def run(self, train_state, steps):
    params, state = train_state['params'], train_state['opt_state']
    for _ in range(steps):
      params, state = self.step(params, state, self.targets)
    return {'params': params, 'opt_state': state}


def assert_bit_identical(actual, expected):
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
    assert a.dtype == e.dtype
    np.testing.assert_array_equal(np.asarray(a), np.asarray(e))


@pytest.fixture(scope='module')
def flat():
  trainer = Trainer(*FLAT)
  return trainer, trainer.run(trainer.initial, SAVE_AT)


def test_checkpoint_manager_restores_onto_another_mesh_bit_identically(flat, tmp_path):
  flat_trainer, at_save = flat
  with ocp.CheckpointManager(tmp_path / 'run') as manager:
    manager.save(SAVE_AT, args=ocp.args.StandardSave(at_save))
    manager.wait_until_finished()

  square = Trainer(*SQUARE)
  with ocp.CheckpointManager(tmp_path / 'run') as manager:
    restored = manager.restore(manager.latest_step(),
                               args=ocp.args.StandardRestore(square.abstract()))
  for leaf, target in zip(jax.tree.leaves(restored), jax.tree.leaves(square.abstract()),
                          strict=True):
    assert leaf.sharding == target.sharding and leaf.dtype == target.dtype
  assert_bit_identical(restored, at_save)
  resumed = square.run(restored, STEPS - SAVE_AT)
  uninterrupted = square.run(square.initial, STEPS)
  assert_bit_identical(resumed, uninterrupted)
  assert int(rite_state(resumed['opt_state']).count) == STEPS


def test_standard_checkpointer_restores_onto_a_different_layout(flat, tmp_path):
  _, at_save = flat
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(tmp_path / 'ckpt', at_save)
  other = Trainer(*SQUARE_2D)
  with ocp.StandardCheckpointer() as checkpointer:
    restored = checkpointer.restore(tmp_path / 'ckpt', other.abstract())
  assert_bit_identical(restored, at_save)
  # Resuming from the checkpoint equals resharding in memory and going on.
  assert_bit_identical(other.run(restored, 3), other.run(other.place(at_save), 3))


def test_restore_with_float32_counters(flat, tmp_path):
  """Some pipelines bring integer counters back as float32; training goes on alike."""
  trainer, at_save = flat
  as_float = jax.tree.map(
      lambda x: x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.integer) else x, at_save)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(tmp_path / 'ckpt', as_float)
  expected = trainer.run(at_save, STEPS - SAVE_AT)

  # Onto the int32 target: Orbax casts the counters back, and nothing differs.
  with ocp.StandardCheckpointer() as checkpointer:
    restored = checkpointer.restore(tmp_path / 'ckpt', trainer.abstract())
  assert_bit_identical(restored, at_save)
  assert_bit_identical(trainer.run(restored, STEPS - SAVE_AT), expected)

  # Kept as float32: LoRA-RITE's factors go on bit-identically (its bias
  # correction reads the count as a float anyway); the AdamW fallback's
  # ``decay ** count`` becomes a float power, hence a rounding-level difference.
  target = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), as_float)
  with ocp.StandardCheckpointer() as checkpointer:
    restored = checkpointer.restore(tmp_path / 'ckpt', target)
  assert rite_state(restored['opt_state']).count.dtype == jnp.float32
  step = jax.jit(train_step(trainer.tx))
  params, state = restored['params'], restored['opt_state']
  for _ in range(STEPS - SAVE_AT):
    params, state = step(params, state, trainer.targets)
  assert rite_state(state).count == STEPS
  factors = lambda p: {k: p[k] for k in ('q', 'v', 'scan')}
  assert_bit_identical(factors(params), factors(expected['params']))
  np.testing.assert_allclose(params['bias'], expected['params']['bias'], rtol=1e-5, atol=1e-5)


def test_flax_state_dict_and_msgpack_round_trip(flat):
  trainer, at_save = flat
  state_dict = serialization.to_state_dict(at_save)
  template = trainer.initial
  restored = serialization.from_state_dict(template, state_dict)
  assert jax.tree.structure(restored) == jax.tree.structure(at_save)
  assert_bit_identical(restored, at_save)

  from_bytes = serialization.from_bytes(template, serialization.to_bytes(at_save))
  assert_bit_identical(from_bytes, at_save)
  resumed = trainer.run(trainer.place(from_bytes), STEPS - SAVE_AT)
  assert_bit_identical(resumed, trainer.run(at_save, STEPS - SAVE_AT))
