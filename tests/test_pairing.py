"""Pairing presets, N-D and scanned factors, containers, diagnostics (pairing.py).

Every preset is exercised on a param tree built the way its library builds it
(flax NNX directly; for the others the exact paths and shapes of their source,
see each preset's docstring), then through the core invariance test: (A, B) and
(A R, B R^{-T}) written in that library's layout, fed the same dZ, give the same
Z = A Bᵀ, with Z and its gradients computed the library's way.
"""

import math

import hypothesis
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx
from hypothesis import strategies as st

import rite_optax
from rite_optax import pairing as pairing_lib

ALL_ON = dict(
    apply_escape=True, relative_eps=True, update_capping=0.5, weight_decay=1e-3,
    balance_factors=True, clip_unmagnified_grad=0.05, update_skipping=3.0)


def random_transform(rng, r, cond=1e3):
  """An invertible r×r matrix with condition number ``cond``."""
  q1, _ = np.linalg.qr(rng.standard_normal((r, r)))
  q2, _ = np.linalg.qr(rng.standard_normal((r, r)))
  return q1 @ np.diag(np.geomspace(1.0, cond, r)) @ q2


def rel_err(x, y):
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  return np.linalg.norm(x - y) / max(np.linalg.norm(y), 1e-300)


def canonical_factors(seed, shapes):
  """Canonical float64 factors [(A (batch..., m, r), B (batch..., n, r))]."""
  rng = np.random.default_rng(seed)
  return [(rng.standard_normal((*batch, m, r)) / np.sqrt(m),
           rng.standard_normal((*batch, n, r)) / np.sqrt(n)) for batch, m, n, r in shapes]


def make_step(pairing, z_fn, unpaired='zero'):
  """One jitted lora_rite step on the loss Σ⟨dZ, Z(params)⟩ (Z computed the library's way)."""
  tx = rite_optax.lora_rite(1e-2, pairing=pairing, unpaired=unpaired, **ALL_ON)
  loss = lambda p, dz: sum(jnp.sum(d * z) for d, z in zip(dz, z_fn(p), strict=True))

  @jax.jit
  def step(params, state, dz):
    updates, state = tx.update(jax.grad(loss)(params, dz), state, params)
    return optax.apply_updates(params, updates), state

  return tx, step


def run_steps(tx_and_step, params, z_fn, dzs):
  """Applies the step for every dZ; returns Z after every step."""
  tx, step = tx_and_step
  state = tx.init(params)
  zs = []
  for dz in dzs:
    params, state = step(params, state, dz)
    zs.append([np.asarray(z) for z in z_fn(params)])
  return zs


def check_invariance(pairing, build, z_fn, factors, steps=10, seed=1):
  """(A, B) vs (A R, B R^{-T}) in a library layout: Z agrees to 1e-10 for ``steps``."""
  rng = np.random.default_rng(seed)
  moved = []
  for a, b in factors:
    *batch, _, r = a.shape
    rs = np.stack([random_transform(rng, r) for _ in range(math.prod(batch))])
    rs = rs.reshape(*batch, r, r)
    moved.append((a @ rs, b @ np.linalg.inv(rs).swapaxes(-1, -2)))
  p0, p1 = build(factors), build(moved)
  z_init = [np.asarray(z) for z in z_fn(p0)]
  for z0, z1 in zip(z_init, z_fn(p1), strict=True):
    assert rel_err(z1, z0) < 1e-12
  dzs = [[jnp.asarray(0.5 * rng.standard_normal(z.shape)) for z in z_init] for _ in range(steps)]
  tx_and_step = make_step(pairing, z_fn)
  out0, out1 = run_steps(tx_and_step, p0, z_fn, dzs), run_steps(tx_and_step, p1, z_fn, dzs)
  for t, (zs0, zs1) in enumerate(zip(out0, out1, strict=True)):
    for z0, z1 in zip(zs0, zs1, strict=True):
      assert rel_err(z1, z0) <= 1e-10, (t, rel_err(z1, z0))
  # The optimizer did move Z, so the comparison above can fail.
  assert min(rel_err(z, z0) for z, z0 in zip(out0[-1], z_init, strict=True)) > 1e-3


def keys_and_shapes(tree, pairing):
  paired = rite_optax.pair_leaves(tree, pairing)
  return {p.key: (p.a.path, p.a.canonical_shape, p.b.path, p.b.canonical_shape)
          for p in paired.pairs}, set(paired.unpaired)


f64 = lambda x: jnp.asarray(x, jnp.float64)


# ---------------------------------------------------------------- nnx (flax NNX)

def test_nnx_real_modules_pair():
  model = nnx.Sequential(
      nnx.LoRALinear(6, 5, lora_rank=2, rngs=nnx.Rngs(0)),
      nnx.LoRA(5, 2, 3, rngs=nnx.Rngs(1)),
  )
  pairs, unpaired = keys_and_shapes(nnx.state(model, nnx.Param), 'nnx')
  assert pairs == {
      'layers/0/lora': ('layers/0/lora/lora_a', (1, 6, 2), 'layers/0/lora/lora_b', (1, 5, 2)),
      'layers/1': ('layers/1/lora_a', (1, 5, 2), 'layers/1/lora_b', (1, 3, 2)),
  }
  assert unpaired == {'layers/0/kernel', 'layers/0/bias'}


def test_nnx_invariance_on_real_module_paths():
  real = nnx.state(nnx.LoRALinear(7, 5, lora_rank=3, rngs=nnx.Rngs(0)), nnx.LoRAParam)
  build = lambda fs: {f'layer_{i}': {'lora': {'lora_a': f64(a), 'lora_b': f64(b.T)}}
                      for i, (a, b) in enumerate(fs)}
  z_fn = lambda p: [p[k]['lora']['lora_a'] @ p[k]['lora']['lora_b'] for k in sorted(p)]
  factors = canonical_factors(0, [((), 7, 5, 3), ((), 9, 4, 2)])
  assert jax.tree.structure(build(factors[:1])['layer_0']) == jax.tree.structure(
      real.to_pure_dict())
  check_invariance('nnx', build, z_fn, factors)


# ---------------------------------------------------------------- qwix (MaxText / Tunix)

def qwix_tree(fs, frozen=True):
  """A MaxText-style scanned decoder (param_scan_axis=1) with qwix LoRA.

  mlp/wi: dot_general kernel (D, L, F): kernel_lora_a (D, L, r), kernel_lora_b (r, L, F).
  query: einsum 'BTD,DNH->BTNH' weights (D, L, N, H): w_lora_a (D, L, r), w_lora_b (r, L, N, H).
  """
  (a1, b1), (a2, b2) = fs
  n_heads = 2
  tree = {'decoder': {'layers': {
      'mlp': {'wi': {'kernel_lora_a': f64(a1.transpose(1, 0, 2)),
                     'kernel_lora_b': f64(b1.transpose(2, 0, 1))}},
      'self_attention': {'query': {
          'w_lora_a': f64(a2.transpose(1, 0, 2)),
          'w_lora_b': f64(b2.transpose(2, 0, 1).reshape(
              b2.shape[2], b2.shape[0], n_heads, b2.shape[1] // n_heads))}}}}}
  if frozen:
    tree['decoder']['layers']['mlp']['wi']['kernel'] = jnp.zeros((a1.shape[1], 3, b1.shape[1]))
  return tree


def qwix_z(p):
  layers = p['decoder']['layers']
  wi, q = layers['mlp']['wi'], layers['self_attention']['query']
  return [jnp.einsum('dlr,rlf->ldf', wi['kernel_lora_a'], wi['kernel_lora_b']),
          jnp.einsum('dlr,rlnh->ldnh', q['w_lora_a'], q['w_lora_b'])]


def test_qwix_pairs_and_invariance():
  factors = canonical_factors(2, [((3,), 8, 6, 2), ((3,), 8, 10, 4)])
  pairs, unpaired = keys_and_shapes(qwix_tree(factors), rite_optax.qwix(batch_axes=(1,)))
  assert pairs == {
      'decoder/layers/mlp/wi/kernel': (
          'decoder/layers/mlp/wi/kernel_lora_a', (3, 8, 2),
          'decoder/layers/mlp/wi/kernel_lora_b', (3, 6, 2)),
      'decoder/layers/self_attention/query/w': (
          'decoder/layers/self_attention/query/w_lora_a', (3, 8, 4),
          'decoder/layers/self_attention/query/w_lora_b', (3, 10, 4)),
  }
  assert unpaired == {'decoder/layers/mlp/wi/kernel'}
  check_invariance(rite_optax.qwix(batch_axes=(1,)),
                   lambda fs: qwix_tree(fs, frozen=False), qwix_z, factors)


# ---------------------------------------------------------------- gemma.peft

def gemma_tree(fs):
  """gemma.peft LoRADense (mlp) and LoRAEinsum 'BTNH,NHD->BTD' (attn_vec_einsum)."""
  (a1, b1), (a2, b2) = fs
  return {'layer_0': {
      'mlp': {'gating_einsum': {'kernel': jnp.zeros((a1.shape[0], b1.shape[0])),
                                'lora': {'a': f64(a1), 'b': f64(b1.T)}}},
      'attn': {'attn_vec_einsum': {'w': jnp.zeros((2, a2.shape[0] // 2, b2.shape[0])),
                                   'lora': {'a': f64(a2.reshape(2, -1, a2.shape[1])),
                                            'b': f64(b2.T)}}}}}


def gemma_z(p):
  layer = p['layer_0']
  mlp, attn = layer['mlp']['gating_einsum']['lora'], layer['attn']['attn_vec_einsum']['lora']
  return [mlp['a'] @ mlp['b'], jnp.einsum('nhr,rd->nhd', attn['a'], attn['b'])]


def test_gemma_peft_pairs_and_invariance():
  factors = canonical_factors(3, [((), 8, 12, 3), ((), 10, 6, 2)])
  pairs, unpaired = keys_and_shapes(gemma_tree(factors), 'gemma_peft')
  assert pairs == {
      'layer_0/mlp/gating_einsum': ('layer_0/mlp/gating_einsum/lora/a', (1, 8, 3),
                                    'layer_0/mlp/gating_einsum/lora/b', (1, 12, 3)),
      'layer_0/attn/attn_vec_einsum': ('layer_0/attn/attn_vec_einsum/lora/a', (1, 10, 2),
                                       'layer_0/attn/attn_vec_einsum/lora/b', (1, 6, 2)),
  }
  assert unpaired == {'layer_0/mlp/gating_einsum/kernel', 'layer_0/attn/attn_vec_einsum/w'}
  check_invariance('gemma_peft', gemma_tree, gemma_z, factors)


# ---------------------------------------------------------------- lorax

class LoraNode:
  """lorax 0.1's LoraNode: delta = b @ a, flattened positionally (a, b)."""

  def __init__(self, a, b):
    self.a, self.b = a, b


jax.tree_util.register_pytree_node(
    LoraNode, lambda n: ((n.a, n.b), None), lambda _, xs: LoraNode(*xs))


def lorax_tree(fs, node):
  """init_lora on {'dense': kernel (in, out), 'conv': kernel (3, 3, in, out)}."""
  (a1, b1), (a2, b2) = fs
  c_in = a2.shape[0] // 9
  dense = node(a=f64(b1.T), b=f64(a1))                      # a (r, out), b (in, r)
  conv = node(a=f64(b2.T.reshape(1, 1, -1, b2.shape[0])),   # a (1, 1, r, out)
              b=f64(a2.reshape(3, 3, c_in, -1)))            # b (3, 3, in, r)
  return {'dense': {'kernel': dense}, 'conv': {'kernel': conv}}


def lorax_z(p):
  get = (lambda n: (n.a, n.b)) if isinstance(p['dense']['kernel'], LoraNode) else (
      lambda n: (n['a'], n['b']))
  (a1, b1), (a2, b2) = get(p['dense']['kernel']), get(p['conv']['kernel'])
  return [b1 @ a1, jnp.einsum('hwir,ro->hwio', b2, a2[0, 0])]


@pytest.mark.parametrize('positional', [True, False])
def test_lorax_pairs_and_invariance(positional):
  node = LoraNode if positional else (lambda a, b: {'a': a, 'b': b})
  factors = canonical_factors(4, [((), 8, 6, 2), ((), 18, 5, 3)])
  pairing = rite_optax.lorax(positional=positional)
  ida, idb = ('1', '0') if positional else ('b', 'a')
  pairs, unpaired = keys_and_shapes(lorax_tree(factors, node), pairing)
  assert pairs == {
      'dense/kernel': (f'dense/kernel/{ida}', (1, 8, 2), f'dense/kernel/{idb}', (1, 6, 2)),
      'conv/kernel': (f'conv/kernel/{ida}', (1, 18, 3), f'conv/kernel/{idb}', (1, 5, 3)),
  }
  assert not unpaired
  if positional:  # one layout through the optimizer is enough: the views are the same
    check_invariance(pairing, lambda fs: lorax_tree(fs, node), lorax_z, factors)


# ---------------------------------------------------------------- HF PEFT (converted)

PEFT_PREFIX = 'base_model.model.model.layers.0.self_attn.q_proj'


def peft_tree(fs):
  """A converted PEFT state dict: flat dotted keys, torch layouts."""
  (a1, b1), (a2, b2) = fs
  return {
      f'{PEFT_PREFIX}.base_layer.weight': jnp.zeros((a1.shape[0], b1.shape[0])),
      f'{PEFT_PREFIX}.lora_A.default.weight': f64(b1.T),   # (r, in)
      f'{PEFT_PREFIX}.lora_B.default.weight': f64(a1),     # (out, r)
      'base_model.model.model.embed_tokens.lora_embedding_A.default': f64(b2.T),  # (r, V)
      'base_model.model.model.embed_tokens.lora_embedding_B.default': f64(a2),    # (E, r)
  }


def peft_z(p):
  a = lambda name: p[name]
  return [a(f'{PEFT_PREFIX}.lora_B.default.weight') @ a(f'{PEFT_PREFIX}.lora_A.default.weight'),
          (a('base_model.model.model.embed_tokens.lora_embedding_B.default')
           @ a('base_model.model.model.embed_tokens.lora_embedding_A.default')).T]


def test_peft_pairs_and_invariance():
  factors = canonical_factors(5, [((), 8, 6, 2), ((), 5, 11, 3)])
  pairs, unpaired = keys_and_shapes(peft_tree(factors), 'peft')
  assert pairs == {
      f'{PEFT_PREFIX}[default]': (f'{PEFT_PREFIX}.lora_B.default.weight', (1, 8, 2),
                                  f'{PEFT_PREFIX}.lora_A.default.weight', (1, 6, 2)),
      'base_model.model.model.embed_tokens[default]': (
          'base_model.model.model.embed_tokens.lora_embedding_B.default', (1, 5, 3),
          'base_model.model.model.embed_tokens.lora_embedding_A.default', (1, 11, 3)),
  }
  assert unpaired == {f'{PEFT_PREFIX}.base_layer.weight'}
  check_invariance('peft', peft_tree, peft_z, factors)


def test_peft_nested_saved_adapter_and_two_adapters():
  tree = {'q_proj': {'lora_A': {'weight': jnp.zeros((2, 6))},
                     'lora_B': {'weight': jnp.zeros((4, 2))}},
          'v_proj': {'lora_A': {'x': {'weight': jnp.zeros((2, 6))},
                                'y': {'weight': jnp.zeros((3, 6))}},
                     'lora_B': {'x': {'weight': jnp.zeros((4, 2))},
                                'y': {'weight': jnp.zeros((4, 3))}}}}
  pairs, _ = keys_and_shapes(tree, 'peft')
  assert {k: (v[1], v[3]) for k, v in pairs.items()} == {
      'q_proj': ((1, 4, 2), (1, 6, 2)),
      'v_proj[x]': ((1, 4, 2), (1, 6, 2)),
      'v_proj[y]': ((1, 4, 3), (1, 6, 3))}


# ---------------------------------------------------------------- regex user rule

def test_regex_rule_invariance():
  pairing = rite_optax.regex(r'(?P<pair>.+)/down', r'(?P<pair>.+)/up', b_rank_axis=1)
  build = lambda fs: {f'blk{i}': {'down': f64(a), 'up': f64(b)} for i, (a, b) in enumerate(fs)}
  z_fn = lambda p: [p[k]['down'] @ p[k]['up'].T for k in sorted(p)]
  factors = canonical_factors(6, [((), 7, 5, 2), ((), 4, 9, 3)])
  assert keys_and_shapes(build(factors), pairing)[0]['blk1'][1:4:2] == ((1, 4, 3), (1, 9, 3))
  check_invariance(pairing, build, z_fn, factors)


# ---------------------------------------------------------------- scanned / stacked factors

@pytest.mark.parametrize('scan_axis', [0, 1])
def test_stacked_pair_equals_separate_pairs(scan_axis):
  """A stacked (L, m, r)/(L, r, n) pair, or T5X param_scan_axis=1 (m, L, r)/(r, L, n),
  gives the same updates as L separate pairs."""
  (a, b), = canonical_factors(7, [((4,), 9, 7, 3)])
  rng = np.random.default_rng(8)
  dzs = [rng.standard_normal((4, 9, 7)) for _ in range(4)]
  if scan_axis == 0:
    stacked = {'lora_a': f64(a), 'lora_b': f64(b.swapaxes(1, 2))}
    z_stacked = lambda p: [jnp.einsum('lmr,lrn->lmn', p['lora_a'], p['lora_b'])]
  else:
    stacked = {'lora_a': f64(a.transpose(1, 0, 2)), 'lora_b': f64(b.transpose(2, 0, 1))}
    z_stacked = lambda p: [jnp.einsum('mlr,rln->lmn', p['lora_a'], p['lora_b'])]
  separate = {f'l{i}': {'lora_a': f64(a[i]), 'lora_b': f64(b[i].T)} for i in range(4)}
  z_separate = lambda p: [p[f'l{i}']['lora_a'] @ p[f'l{i}']['lora_b'] for i in range(4)]
  out_stacked = run_steps(make_step(rite_optax.nnx(batch_axes=(scan_axis,)), z_stacked),
                          stacked, z_stacked, [[jnp.asarray(dz)] for dz in dzs])
  out_separate = run_steps(make_step('nnx', z_separate), separate, z_separate,
                           [[jnp.asarray(d) for d in dz] for dz in dzs])
  for zs, zl in zip(out_stacked, out_separate, strict=True):
    np.testing.assert_allclose(zs[0], np.stack(zl), rtol=0, atol=1e-12 * np.abs(zs[0]).max())
  assert rel_err(out_stacked[-1][0], np.einsum('lmr,lnr->lmn', a, b)) > 1e-3


N_HEADS, HEAD_DIM = 2, 3


class MaxTextLikeLayer(nn.Module):
  """A decoder layer with MaxText's DenseGeneral projections (qwix LoRA via dot_general)."""

  @nn.compact
  def __call__(self, x, _):
    h = nn.Dense(7, use_bias=False, name='wi_0')(x)
    q = nn.DenseGeneral((N_HEADS, HEAD_DIM), use_bias=False, name='query')(x)
    o = nn.DenseGeneral(x.shape[-1], axis=(-2, -1), use_bias=False, name='out')(q)
    return x + o + h.sum(-1, keepdims=True), None


class MaxTextLikeDecoder(nn.Module):
  """Layers scanned the MaxText way: ``nn.scan`` with the params' layer axis at 1."""

  @nn.compact
  def __call__(self, x):
    scanned = nn.scan(MaxTextLikeLayer, variable_axes={'params': 1},
                      split_rngs={'params': True}, length=4)
    return scanned(name='layers')(x, None)[0]


def test_qwix_on_a_real_scanned_linen_decoder():
  """MaxText's scanned layout: qwix LoRA on a linen decoder whose layers are scanned with
  the params' layer axis at 1 (MaxText's param_scan_axis: 1; needs qwix, not MaxText).
  Every factor pairs with qwix(batch_axes=(1,)), slicing axis 1 gives exactly the factors
  qwix makes for one unscanned layer, and the scanned updates equal the per-layer updates
  to 1e-12 in float64."""
  qwix = pytest.importorskip('qwix', reason='needs qwix (pip install "rite_optax[qwix]")')
  provider = qwix.LoraProvider(module_path='.*', rank=2, alpha=2.0)
  x = jnp.ones((2, 3, 5))
  init = lambda module, *args: qwix.apply_lora_to_model(module, provider).init(
      jax.random.key(0), x, *args)
  shapes = lambda tree: jax.tree.map(lambda v: v.shape, tree)
  lora_only = lambda tree: {m: {k: v for k, v in leaves.items() if '_lora_' in k}
                            for m, leaves in tree.items()}
  scanned = lora_only(init(MaxTextLikeDecoder())['params']['layers'])
  one_layer = lora_only(init(MaxTextLikeLayer(), None)['params'])
  assert shapes(scanned) == {  # qwix dot_general: a (contract, r), b (r, remain), L at 1
      'wi_0': {'kernel_lora_a': (5, 4, 2), 'kernel_lora_b': (2, 4, 7)},
      'query': {'kernel_lora_a': (5, 4, 2), 'kernel_lora_b': (2, 4, N_HEADS * HEAD_DIM)},
      'out': {'kernel_lora_a': (N_HEADS * HEAD_DIM, 4, 2), 'kernel_lora_b': (2, 4, 5)}}
  layer_i = lambda tree, i: jax.tree.map(lambda v: v[:, i], tree)
  assert shapes(layer_i(scanned, 0)) == shapes(one_layer)

  pairing = rite_optax.qwix(batch_axes=(1,))
  paired = rite_optax.pair_leaves(scanned, pairing)
  assert not paired.unpaired and len(paired.pairs) == 3
  assert all(p.a.batch_shape == (4,) and p.a.rank_axis == 2 and p.b.rank_axis == 0
             for p in paired.pairs)
  params = jax.tree.map(f64, scanned)
  params['out']['kernel_lora_b'] = f64(np.random.default_rng(11).standard_normal((2, 4, 5)))
  rng = np.random.default_rng(12)
  grads = [jax.tree.map(lambda v: f64(rng.standard_normal(v.shape)), params) for _ in range(3)]
  tx = rite_optax.lora_rite(1e-2, pairing=pairing, unpaired='error', **ALL_ON)
  tx_layer = rite_optax.lora_rite(1e-2, pairing='qwix', unpaired='error', **ALL_ON)
  per_layer = {f'layers_{i}': layer_i(params, i) for i in range(4)}
  state, state_layer = tx.init(params), tx_layer.init(per_layer)
  for g in grads:
    updates, state = jax.jit(tx.update)(g, state, params)
    updates_layer, state_layer = jax.jit(tx_layer.update)(
        {f'layers_{i}': layer_i(g, i) for i in range(4)}, state_layer, per_layer)
    for i in range(4):
      jax.tree.map(lambda u, v: np.testing.assert_allclose(
          u, v, rtol=0, atol=1e-12 * np.abs(v).max()), layer_i(updates, i),
          updates_layer[f'layers_{i}'])
    params = optax.apply_updates(params, updates)
    per_layer = optax.apply_updates(per_layer, updates_layer)
  assert min(float(jnp.abs(u).max()) for u in jax.tree.leaves(updates)) > 0
  # Undeclared, the layer axis becomes rows: the same leaves pair, as one adapter per weight
  # spanning all layers ((D·L, r) x (L·F, r)), and the updates differ.
  tx_undeclared = rite_optax.lora_rite(1e-2, pairing='qwix', unpaired='error', **ALL_ON)
  undeclared, _ = jax.jit(tx_undeclared.update)(grads[0], tx_undeclared.init(params), params)
  declared, _ = jax.jit(tx.update)(grads[0], tx.init(params), params)
  assert max(rel_err(u, d) for u, d in zip(jax.tree.leaves(undeclared),
                                           jax.tree.leaves(declared), strict=True)) > 1e-3


def test_expert_and_layer_batch_axes_canonical_view():
  tree = {'moe': {'lora_a': jnp.zeros((4, 8, 16, 2)), 'lora_b': jnp.zeros((4, 8, 2, 5))}}
  (pair,) = rite_optax.pair_leaves(tree, rite_optax.nnx(batch_axes=(0, 1))).pairs
  assert pair.a.canonical_shape == (32, 16, 2) and pair.b.canonical_shape == (32, 5, 2)
  assert pair.a.state_shape(2, 2) == (4, 8, 2, 2)


# ---------------------------------------------------------------- errors name paths

@pytest.mark.parametrize('tree, pairing, match', [
    ({'x': {'lora_a': jnp.zeros((4, 2))}}, 'nnx', r"x/lora_a: LoRA factor 'a' has no partner"),
    ({'x': {'lora_a': jnp.zeros((4, 2)), 'lora_b': jnp.zeros((3, 5))}}, 'nnx',
     r'x/lora_a and x/lora_b: rank mismatch, 2 .* vs 3'),
    ({'x': {'lora_a': jnp.zeros((3, 4, 2)), 'lora_b': jnp.zeros((5, 2, 6))}},
     rite_optax.nnx(batch_axes=(0,)), r'x/lora_a and x/lora_b: batch axes differ in size,'
     r' \(3,\) vs \(5,\)'),
    ({'x': {'w': jnp.zeros((4, 2))}},
     rite_optax.Pairing((pairing_lib.FactorRule(r'(?P<pair>.*)/w', 'a'),
                         pairing_lib.FactorRule(r'(?P<pair>.*)/.', 'b'))),
     r'x/w: ambiguous, matched by 2 rules'),
    ({'m': {'lora_A': {'weight': jnp.zeros((2, 4))}, 'lora_B': {'weight': jnp.zeros((4, 2))}},
      'm.lora_A.weight': jnp.zeros((2, 4))}, 'peft',
     r'm.lora_A.weight: ambiguous, m/lora_A/weight is also factor'),
    ({'x': {'lora_a': jnp.zeros((4, 2), jnp.int32), 'lora_b': jnp.zeros((2, 4))}}, 'nnx',
     r'x/lora_a: LoRA factors must be floating point'),
])
def test_errors_name_the_offending_paths(tree, pairing, match):
  with pytest.raises((ValueError, TypeError), match=match):
    rite_optax.pair_leaves(tree, pairing)


def test_spec_errors():
  with pytest.raises(ValueError, match='named group'):
    pairing_lib.FactorRule(r'.*/lora_a', 'a')
  with pytest.raises(ValueError, match="role must be 'a' or 'b'"):
    pairing_lib.FactorRule(r'(?P<pair>.*)', 'c')
  with pytest.raises(ValueError, match='must be the leading axes'):
    rite_optax.peft(batch_axes=(1,))
  with pytest.raises(ValueError, match="pairing must be one of .*'gemma_peft'"):
    pairing_lib.resolve('flaxformer')


# ---------------------------------------------------------------- static, hashable spec

@pytest.mark.parametrize('name', sorted(pairing_lib.PRESETS))
def test_presets_are_static_and_hashable(name):
  spec = pairing_lib.resolve(name)
  assert spec == pairing_lib.PRESETS[name]() and hash(spec) == hash(pairing_lib.resolve(name))
  assert spec.name == name and not callable(spec)


def test_pairing_under_inject_hyperparams_is_static():
  params = {'x': {'lora_a': jnp.ones((4, 2)), 'lora_b': jnp.ones((2, 3))}}
  tx = optax.inject_hyperparams(rite_optax.lora_rite)(
      learning_rate=1e-2, pairing=rite_optax.nnx(), unpaired='zero')
  state = tx.init(params)
  assert set(state.hyperparams) >= {'learning_rate'} and 'pairing' not in state.hyperparams
  updates, _ = jax.eval_shape(tx.update, params, state, params)
  assert jax.tree.structure(updates) == jax.tree.structure(params)


# ---------------------------------------------------------------- containers and abstract values

def test_flax_containers_shape_dtype_structs_and_eval_shape():
  concrete = {'dense': {'kernel': jnp.zeros((6, 4)), 'lora_a': jnp.zeros((6, 2)),
                        'lora_b': jnp.zeros((2, 4))}}
  boxed = jax.tree.map(lambda x: nn.Partitioned(x, names=(None,) * x.ndim), concrete)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), concrete)
  expected = keys_and_shapes(concrete, 'nnx')
  assert keys_and_shapes(boxed, 'nnx') == expected == keys_and_shapes(abstract, 'nnx')
  tx = rite_optax.lora_rite(1e-3)
  state_shapes = jax.eval_shape(tx.init, abstract)
  assert jax.tree.structure(state_shapes) == jax.tree.structure(tx.init(concrete))
  seen = []
  jax.eval_shape(lambda p: seen.append(rite_optax.pair_leaves(p, 'nnx')), abstract)
  assert {p.key for p in seen[0].pairs} == {'dense'}


def test_nnx_optimizer_real_update_step():
  model = nnx.LoRALinear(6, 4, lora_rank=2, rngs=nnx.Rngs(0))
  model.lora.lora_b[...] = jax.random.normal(jax.random.key(1), (2, 4), jnp.float32)
  optimizer = nnx.Optimizer(model, rite_optax.lora_rite(1e-2), wrt=nnx.LoRAParam)
  x, y = jax.random.normal(jax.random.key(2), (8, 6)), jax.random.normal(jax.random.key(3), (8, 4))
  before = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))

  @nnx.jit
  def train_step(model, optimizer):
    loss = lambda m: jnp.mean((m(x) - y) ** 2)
    optimizer.update(model, nnx.grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(model))

  train_step(model, optimizer)
  after = nnx.state(model, nnx.Param)
  assert not np.allclose(before['lora']['lora_a'], after['lora']['lora_a'])
  np.testing.assert_array_equal(before['kernel'], after['kernel'])


# ---------------------------------------------------------------- unpaired leaves

@pytest.mark.parametrize('unpaired', ['adamw', 'zero', 'error'])
def test_unpaired_leaves(unpaired):
  params = {'head': {'bias': jnp.ones(3)},
            'dense': {'lora_a': jnp.ones((5, 2)), 'lora_b': jnp.ones((2, 3))}}
  grads = jax.tree.map(jnp.ones_like, params)
  tx = rite_optax.lora_rite(1e-2, unpaired=unpaired)
  if unpaired == 'error':
    with pytest.raises(ValueError, match=r"unpaired='error'.*'head/bias'"):
      tx.init(params)
    return
  updates, _ = tx.update(grads, tx.init(params), params)
  bias_update = np.asarray(updates['head']['bias'])
  if unpaired == 'zero':
    np.testing.assert_array_equal(bias_update, 0.0)
  else:
    np.testing.assert_allclose(bias_update, -1e-2 * (1.0 + 1e-4), rtol=1e-6)


def test_unpaired_adamw_hyperparameters():
  params = {'bias': jnp.ones(3), 'lora_a': jnp.ones((5, 2)), 'lora_b': jnp.ones((2, 3))}
  tx = rite_optax.lora_rite(1e-2, unpaired_learning_rate=0.5, unpaired_weight_decay=0.0)
  updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)
  np.testing.assert_allclose(updates['bias'], -0.5, rtol=1e-6)


# ---------------------------------------------------------------- describe

def test_describe_lists_pairs_canonical_shapes_batch_axes_and_unpaired(capsys):
  tree = {'enc': {'layers': {'lora_a': jnp.zeros((16, 3, 4)), 'lora_b': jnp.zeros((4, 3, 8)),
                             'kernel': jnp.zeros((16, 3, 8))}},
          'norm': {'scale': jnp.zeros(16)}}
  text = rite_optax.describe(tree, rite_optax.nnx(batch_axes=(1,)))
  assert capsys.readouterr().out.strip() == text
  assert text.splitlines() == [
      "pairing 'nnx': 1 pair, 2 unpaired leaves",
      '  enc/layers: a enc/layers/lora_a (16, 3, 4) rank axis 2 |'
      ' b enc/layers/lora_b (4, 3, 8) rank axis 0',
      '    canonical (3, 16, 4) x (3, 8, 4), batch axes a (1,) b (1,)',
      "unpaired (AdamW fallback, 'zero' or 'error' in lora_rite):",
      '  enc/layers/kernel (16, 3, 8)',
      '  norm/scale (16,)',
  ]
  assert rite_optax.describe(tree, rite_optax.nnx(batch_axes=(1,)), print_output=False) == text
  assert capsys.readouterr().out == ''


# ---------------------------------------------------------------- canonical views (hypothesis)

@hypothesis.settings(deadline=None, max_examples=30)
@hypothesis.given(
    shape=st.lists(st.integers(1, 4), min_size=2, max_size=5),
    data=st.data())
def test_canonical_view_round_trip(shape, data):
  ndim = len(shape)
  axes = data.draw(st.permutations(range(ndim)))
  n_batch = data.draw(st.integers(0, ndim - 2))
  batch_axes, rank_axis = tuple(axes[:n_batch]), axes[n_batch]
  view = pairing_lib.FactorView('x', 0, tuple(shape), jnp.float64, rank_axis, batch_axes)
  x = np.arange(math.prod(shape), dtype=np.float64).reshape(shape)
  canon = np.asarray(view.to_canonical(jnp.asarray(x)))
  assert canon.shape == view.canonical_shape
  np.testing.assert_array_equal(view.from_canonical(jnp.asarray(canon)), x)
  # Row b, column k of batch i is x at rank index k along rank_axis.
  moved = np.moveaxis(x, [*batch_axes, rank_axis], [*range(n_batch), ndim - 1])
  np.testing.assert_array_equal(canon, moved.reshape(view.canonical_shape))
