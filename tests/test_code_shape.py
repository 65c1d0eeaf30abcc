"""The package stays readable: no function over 60 lines of code (docstrings excluded),
and no class of the step gains attributes after construction (NamedTuples, frozen
dataclasses)."""

import ast
import dataclasses
import pathlib

import rite_optax
from rite_optax import core, engine, pairing, thin

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
  named_tuples = [core.Hyper, core.Side, core.Grams, core.Seen, core.Scalars,
                  core.SecondMoment, core.Written, engine.Leaves, engine.Group, thin.Thin]
  for cls in named_tuples:
    assert issubclass(cls, tuple) and hasattr(cls, '_fields'), cls
  for cls in (pairing.FactorView, pairing.FactorPair, pairing.FactorRule):
    assert dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen, cls
