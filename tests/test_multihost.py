"""Multi-controller JAX, as every TPU pod slice runs: one process per host (here N
processes on localhost, gloo collectives), against the same run in one process."""

import os
import pathlib
import time

import jax
import numpy as np
import pytest

import rite_optax
from tests import multiprocess
from tests import test_sharding as sh

pytestmark = pytest.mark.slow
MESH = ((2, 4), ('data', 'model'))


def flat(tree) -> dict[str, np.ndarray]:
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {f'{i:03d}{jax.tree_util.keystr(path)}': np.asarray(x)
          for i, (path, x) in enumerate(leaves)}


def train(index):
  """Scenario: test_sharding's problem, STEPS steps on a (2, 4) mesh over every process;
  params and the basis-free state (diagnostics included), gathered to every host."""
  from jax.experimental import multihost_utils  # noqa: PLC0415

  del index
  params, targets = sh.problem()
  params, state = sh.run(params, targets, sh.STEPS, sh.make_mesh(*MESH), sh.row_specs(*MESH[1]))
  return flat(multihost_utils.process_allgather(
      {'params': params, 'state': sh.z_space(state)}, tiled=True))


def unflat(arrays: dict[str, np.ndarray], like):
  return jax.tree.unflatten(jax.tree.structure(like), [arrays[k] for k in sorted(arrays)])


@pytest.fixture(scope='module')
def one_process(unsharded):
  """The same (2, 4) mesh in this process (8 devices), and the float64 run."""
  params, targets = sh.problem()
  sharded = sh.run(params, targets, sh.STEPS, sh.make_mesh(*MESH), sh.row_specs(*MESH[1]))
  like = {'params': sharded[0], 'state': sh.z_space(sharded[1])}
  exact = {'params': unsharded[1][0], 'state': sh.z_space(unsharded[1][1])}
  return jax.tree.map(np.asarray, like), exact


unsharded = sh.unsharded


@pytest.mark.parametrize('processes,devices', [(2, 4), (4, 2)])
def test_processes_match_one_process_within_the_sharding_tolerance(processes, devices,
                                                                   one_process):
  baseline, exact = one_process
  results = multiprocess.launch('tests.test_multihost:train', processes, devices)
  for result in results:
    got = unflat(result, baseline)
    sh.assert_rounding_level(got, baseline, exact, sh.STEPS)
    jax.tree.map(np.testing.assert_array_equal, got, unflat(results[0], baseline))


def drift(index):
  """Scenario: process 1 builds one adapter more than the others."""
  params, _ = sh.problem()
  if index == 1:
    params = dict(params, extra={'lora_a': np.ones((8, 2), np.float32),
                                 'lora_b': np.ones((2, 4), np.float32)})
  pairing = rite_optax.Pairing(sh.SCANNED.rules + (
      rite_optax.FactorRule(r'(?P<pair>extra)/lora_a', 'a'),
      rite_optax.FactorRule(r'(?P<pair>extra)/lora_b', 'b')), name='drift')
  start = time.monotonic()
  try:
    jax.jit(rite_optax.lora_rite(1e-3, pairing=pairing).init)(params)
    error = ''
  except ValueError as e:
    error = str(e)
  return {'error': np.array(error), 'seconds': np.array(time.monotonic() - start)}


def test_a_process_with_another_tree_fails_on_every_process_naming_the_leaf():
  results = multiprocess.launch('tests.test_multihost:drift', 2, 1, timeout=120)
  for index, result in enumerate(results):
    error = str(result['error'])
    assert f'process {index} and process {1 - index} derived different LoRA pair plans' in error
    assert 'they first differ at entry 2' in error, error
    assert 'extra/lora_a a (8, 2)' in error and 'q/lora_a a (64, 4)' in error, error
    assert float(result['seconds']) < 20


def stuck(index, pid_dir):
  """Scenario: process 0 fails at once, process 1 would wait forever."""
  (pathlib.Path(pid_dir) / f'{index}.pid').write_text(str(os.getpid()))
  if index == 0:
    raise RuntimeError('planted failure in process 0')
  time.sleep(3600)
  return {}


@pytest.mark.parametrize('timeout', [5.0, 120.0])
def test_a_failed_or_stuck_run_kills_every_process(tmp_path, timeout):
  """Process 0 fails: the harness reports its traceback and kills process 1 (120 s);
  or the run outlives its timeout (5 s, before process 0 may even fail): every
  process is killed all the same, none outlives the call."""
  start = time.monotonic()
  with pytest.raises(RuntimeError, match='tests.test_multihost:stuck (failed|timed out)'):
    multiprocess.launch('tests.test_multihost:stuck', 2, 1, timeout=timeout,
                        args=(str(tmp_path),))
  assert time.monotonic() - start < 60
  pids = [int(p.read_text()) for p in tmp_path.glob('*.pid')]
  for pid in pids:
    with pytest.raises(ProcessLookupError):
      os.kill(pid, 0)


def save_at_ten(index, path):
  """Scenario: SAVE_AT steps on (2, 4) over every process, saved by all of them with an
  async CheckpointManager; the saved train state, gathered, for comparison."""
  import orbax.checkpoint as ocp  # noqa: PLC0415
  from jax.experimental import multihost_utils  # noqa: PLC0415

  from tests import test_checkpoint as ck  # noqa: PLC0415

  del index
  trainer = ck.Trainer(*ck.SQUARE_2D)
  at_save = trainer.run(trainer.initial, ck.SAVE_AT)
  with ocp.CheckpointManager(path, options=ocp.CheckpointManagerOptions(
      enable_async_checkpointing=True)) as manager:
    manager.save(ck.SAVE_AT, args=ocp.args.StandardSave(at_save))
    manager.wait_until_finished()
  return flat(multihost_utils.process_allgather(at_save, tiled=True))


def resume_from(index, path):
  """Scenario: restore the checkpoint at SAVE_AT in ``path`` onto (2, 4) over every
  process through ``abstract_state``, train to STEPS; the restored and the final train
  state, gathered."""
  import orbax.checkpoint as ocp  # noqa: PLC0415
  from jax.experimental import multihost_utils  # noqa: PLC0415

  from tests import test_checkpoint as ck  # noqa: PLC0415

  del index
  trainer = ck.Trainer(*ck.SQUARE_2D)
  with ocp.CheckpointManager(path) as manager:
    restored = manager.restore(ck.SAVE_AT, args=ocp.args.StandardRestore(trainer.abstract()))
  resumed = trainer.run(restored, ck.STEPS - ck.SAVE_AT)
  gather = lambda tree: flat(multihost_utils.process_allgather(tree, tiled=True))
  return {f'{name}/{key}': value for name, tree in (('restored', restored), ('resumed', resumed))
          for key, value in gather(tree).items()}


def test_a_checkpoint_of_two_processes_resumes_in_one_and_in_four(tmp_path, unsharded):
  import orbax.checkpoint as ocp  # noqa: PLC0415

  from tests import test_checkpoint as ck  # noqa: PLC0415

  saved = multiprocess.launch('tests.test_multihost:save_at_ten', 2, 4,
                              args=(str(tmp_path / 'run'),))[0]
  trainer = ck.Trainer(*ck.SQUARE_2D)
  with ocp.CheckpointManager(tmp_path / 'run') as manager:
    assert manager.latest_step() == ck.SAVE_AT
    restored = manager.restore(ck.SAVE_AT, args=ocp.args.StandardRestore(trainer.abstract()))
  ck.assert_bit_identical(restored, unflat(saved, restored))
  resumed = trainer.run(restored, ck.STEPS - ck.SAVE_AT)
  assert int(sh.rite_state(resumed['opt_state']).count) == ck.STEPS == sh.STEPS
  (baseline_params, baseline_state), (exact_params, exact_state) = unsharded
  sh.assert_rounding_level(resumed['params'], baseline_params, exact_params, sh.STEPS)
  sh.assert_rounding_level(sh.z_space(resumed['opt_state']), sh.z_space(baseline_state),
                           sh.z_space(exact_state), sh.STEPS)

  # Four processes of two devices each restore the same files onto the same global mesh.
  four = multiprocess.launch('tests.test_multihost:resume_from', 4, 2,
                             args=(str(tmp_path / 'run'),))
  part = lambda result, name: {k.split('/', 1)[1]: v for k, v in result.items()
                               if k.startswith(name + '/')}
  for result in four:
    ck.assert_bit_identical(unflat(part(result, 'restored'), restored), restored)
    resumed_in_four = unflat(part(result, 'resumed'), resumed)
    sh.assert_rounding_level(resumed_in_four['params'], baseline_params, exact_params, sh.STEPS)
    sh.assert_rounding_level(sh.z_space(resumed_in_four['opt_state']),
                             sh.z_space(baseline_state), sh.z_space(exact_state), sh.STEPS)


def preemptible(index, path, kill):
  """Scenario: train to STEPS from the latest complete checkpoint in ``path`` (async
  saves every 5 steps); with ``kill``, process 1 is SIGKILLed at step 12 after the save
  at 10 is complete ('between_saves'), or as soon as the save at 15 is under way
  ('during_save')."""
  import signal  # noqa: PLC0415

  import orbax.checkpoint as ocp  # noqa: PLC0415
  from jax.experimental import multihost_utils  # noqa: PLC0415

  from tests import test_checkpoint as ck  # noqa: PLC0415

  trainer = ck.Trainer(*ck.SQUARE_2D)
  die = lambda: os.kill(os.getpid(), signal.SIGKILL)
  options = ocp.CheckpointManagerOptions(enable_async_checkpointing=True)
  with ocp.CheckpointManager(path, options=options) as manager:
    start = manager.latest_step()
    state = trainer.initial if start is None else manager.restore(
        start, args=ocp.args.StandardRestore(trainer.abstract()))
    for step in range((start or 0) + 1, ck.STEPS + 1):
      state = trainer.run(state, 1)
      if step % 5 == 0:
        manager.save(step, args=ocp.args.StandardSave(state))
        if kill == 'during_save' and index == 1 and step == 15:
          die()
      if kill == 'between_saves' and index == 1 and step == 12:
        manager.wait_until_finished()
        jax.block_until_ready(state)
        die()
    manager.wait_until_finished()
  result = flat(multihost_utils.process_allgather(state, tiled=True))
  return dict(result, restored_from=np.array(-1 if start is None else start))


def test_preempted_processes_resume_from_the_last_complete_checkpoint(tmp_path):
  """SIGKILL of one process between saves, then during a save; every process restarted
  each time. The run resumes from the last complete checkpoint (10: the save at 15 was
  cut) and ends bit-identical to the uninterrupted run."""
  run = str(tmp_path / 'run')
  for kill in ('between_saves', 'during_save'):
    with pytest.raises(RuntimeError, match='preemptible failed'):
      multiprocess.launch('tests.test_multihost:preemptible', 2, 4, args=(run, kill))
  resumed = multiprocess.launch('tests.test_multihost:preemptible', 2, 4, args=(run, 'none'))
  reference = multiprocess.launch('tests.test_multihost:preemptible', 2, 4,
                                  args=(str(tmp_path / 'reference'), 'none'))
  assert int(resumed[0].pop('restored_from')) == 10
  assert int(reference[0].pop('restored_from')) == -1
  assert resumed[0].keys() == reference[0].keys()
  for key, value in reference[0].items():
    np.testing.assert_array_equal(resumed[0][key], value, err_msg=key)
