"""benchmarks/step_time.py defines the workloads it claims and its timing path runs."""

import jax
import optax
import pytest

import rite_optax
from benchmarks import step_time


def test_mt5_workloads_have_the_documented_adapter_counts():
  w = step_time.WORKLOADS
  # q/k/v/o of 24 encoder self-attention and 24 decoder self + cross attention layers.
  assert len(w['xxl_attn_r16'].shapes()) == 24 * 4 + 24 * 8 == 288
  assert set(w['xxl_attn_r16'].shapes()) == {(4096, 4096)}
  # + wi_0, wi_1, wo of the gated-GELU MLP in all 48 layers.
  assert len(w['xxl_attn_mlp_r16'].shapes()) == 288 + 48 * 3
  assert (10240, 4096) in w['xxl_attn_mlp_r16'].shapes()
  assert len(w['base_attn_mlp_r16'].shapes()) == 12 * 4 + 12 * 8 + 24 * 3


def test_scanned_workload_holds_the_same_adapters_in_stacked_leaves():
  scanned = step_time.WORKLOADS['xxl_attn_r16_scanned']
  params = jax.eval_shape(lambda: step_time.make_params(scanned))
  paired = rite_optax.pair_leaves(params, scanned.pairing())
  assert not paired.unpaired and len(paired.pairs) == 4 + 8
  assert sum(p.a.canonical_shape[0] for p in paired.pairs) == len(scanned.shapes()) == 288


@pytest.mark.parametrize('scanned', [False, True])
def test_timing_a_tiny_workload(scanned):
  tiny = step_time.Workload(d_model=16, d_attn=16, d_ff=32, layers=2, rank=2, mlp=True,
                            scanned=scanned)
  params = step_time.make_params(tiny)
  grads = optax.tree.zeros_like(params)
  adam = step_time.time_optimizer(optax.adam(1e-3), params, grads, warmup=1, steps=3)
  rite = step_time.time_optimizer(
      rite_optax.lora_rite(1e-3, pairing=tiny.pairing()), params, grads, warmup=1, steps=3)
  assert 0 < adam['min'] <= adam['median'] <= adam['max']
  assert 0 < rite['min'] <= rite['median'] <= rite['max']
  # First moment + basis per factor, plus r×r and per-adapter scalars.
  assert adam['state_bytes'] <= rite['state_bytes'] <= 1.1 * adam['state_bytes']
  # Both read and write at least their params, gradients and state once.
  for r in (adam, rite):
    assert r['accessed_bytes'] >= 2 * sum(x.nbytes for x in jax.tree.leaves(params))
