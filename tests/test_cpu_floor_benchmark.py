"""benchmarks/cpu_floor.py: its hand-fused passes compute the step's products it claims to time."""

import json
import subprocess

import numpy as np
import pytest

from benchmarks import cpu_floor


@pytest.fixture(scope='module', params=[4, 16])
def fused(request, tmp_path_factory):
  binary, why_not = cpu_floor.build_fused(request.param, str(tmp_path_factory.mktemp('fused')))
  if binary is None:
    pytest.skip(why_not)
  return request.param, binary


def sines(shape, scale):
  """fused_passes.cc's deterministic inputs: sin(scale · flat index) in float32."""
  i = np.arange(np.prod(shape), dtype=np.float32)
  return np.sin(np.float32(scale) * i).astype(np.float64).reshape(shape)


def test_fused_passes_compute_the_products_of_a_step(fused):
  rank, binary = fused
  got = json.loads(subprocess.run([str(binary), 'check'], check=True, capture_output=True,
                                  text=True).stdout)
  assert got['rank'] == rank
  rows = 8
  x, g, m, u = (sines((rows, rank), s) for s in (0.1, 0.2, 0.3, 0.4))
  p, c, ka, kb, kc = (sines((rank, rank), 0.05 * (s + 1)) for s in range(5))
  u1 = x @ p
  m_new = g @ ka + m @ kb
  expected = {'xx': x.T @ x, 'gg': g.T @ g, 'xu': x.T @ u, 'u1u1': u1.T @ u1,
              'u': x @ c, 'm': m_new, 'x': x - m_new @ kc}
  for name, want in expected.items():
    np.testing.assert_allclose(np.reshape(got[name], want.shape), want, rtol=1e-4, atol=1e-4,
                               err_msg=name)


def test_fused_pass_times_cover_every_factor(fused):
  _, binary = fused
  times = cpu_floor.fused_pass_times(binary, [8, 8, 24], reps=3)
  assert times['threads'] >= 1
  for name in ('pass1', 'pass2', 'pass3'):
    assert len(times[name]) == 3 and all(t >= 0 for t in times[name])


def test_machine_measurements_are_positive():
  assert cpu_floor.matmul_peak_flops(size=64, reps=2) > 0
  assert cpu_floor.eigh_ms(factors=3, rank=4, reps=2) > 0


def test_bench_usage_error_exits_nonzero(fused):
  _, binary = fused
  assert subprocess.run([str(binary), 'bench'], capture_output=True).returncode == 2
