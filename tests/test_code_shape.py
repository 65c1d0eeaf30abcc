"""The package stays readable: no function over 60 lines of code (docstrings excluded),
no class of the step gains attributes after construction (NamedTuples, frozen
dataclasses), and the compiler steering lives in one module that the math does not import."""

import ast
import dataclasses
import pathlib

import rite_optax
from rite_optax import core, engine, pairing, steering, thin

PACKAGE = pathlib.Path(rite_optax.__file__).parent


def code_lines(node) -> int:
  body = node.body
  first = body[0]
  has_doc = isinstance(first, ast.Expr) and isinstance(getattr(first, 'value', None), ast.Constant)
  start = body[1].lineno if has_doc and len(body) > 1 else first.lineno
  return node.end_lineno - start + 1


def test_no_function_is_longer_than_60_lines():
  long = []
  for path in sorted(PACKAGE.glob('*.py')):
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and code_lines(node) > 60:
        long.append(f'{path.name}:{node.name} ({code_lines(node)} lines)')
  assert not long, long


def test_step_objects_are_immutable():
  named_tuples = [core.Eigh, core.SecondMomentEighs, core.Hyper, core.Side, core.Grams,
                  core.Seen, core.Scalars, core.SecondMoments, core.Written, engine.Leaves,
                  engine.Pair, engine.Group, engine.Moved, thin.Thin]
  for cls in named_tuples:
    assert issubclass(cls, tuple) and hasattr(cls, '_fields'), cls
  for cls in (pairing.FactorView, pairing.FactorPair, pairing.FactorRule):
    assert dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen, cls


STEERING = ('optimization_barrier', 'lax.cond', 'platform_dependent', 'after(')


def test_compiler_steering_lives_in_one_module_and_the_math_does_not_import_it():
  """Ordering links, branches and the eigh loop are in steering.py only;
  core.py (the math) imports neither it nor the executor."""
  found = {(path.name, word) for path in PACKAGE.glob('*.py') for word in STEERING
           if word in path.read_text()}
  assert {name for name, _ in found} == {'steering.py'}, found
  core_imports = {alias.name for node in ast.walk(ast.parse((PACKAGE / 'core.py').read_text()))
                  if isinstance(node, ast.ImportFrom) for alias in node.names}
  assert not core_imports & {'steering', 'engine'}, core_imports
  assert steering.__name__ not in (PACKAGE / 'core.py').read_text()
