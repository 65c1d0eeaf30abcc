"""Two fine-tuning tasks built from text that ships with CPython (no downloads).

- ``pydoc``: Python's own reference documentation (``pydoc_data.topics``, the text behind
  ``help('assert')``), as rows of BOS + 63 tokens, loss on every next token; one topic in
  five is held out. Scored by held-out loss (nats/token, full vocabulary).
- ``names``: a standard-library function's docstring summary → its name, as
  ``# <summary>\\ndef <name>(...)\\n``, loss on the name and the ``(``; one name in five is held
  out (by a hash of the name). Scored by exact match, teacher-forced: every target token is
  the model's argmax, so no decoding is needed.

Each row starts with BOS (without it Gemma's loss starts near 6 nats instead of 3.8).
"""

from __future__ import annotations

import importlib
import inspect
import zlib
from typing import NamedTuple

import numpy as np

SEQ = 64
HELD_OUT_ROWS = 16

# Pure-Python standard-library modules whose public functions and methods have docstrings.
MODULES = (
    'argparse', 'ast', 'base64', 'bisect', 'calendar', 'cmd', 'codecs', 'collections',
    'colorsys', 'configparser', 'contextlib', 'copy', 'csv', 'dataclasses', 'datetime',
    'decimal', 'difflib', 'dis', 'email.utils', 'enum', 'filecmp', 'fileinput', 'fnmatch',
    'fractions', 'ftplib', 'functools', 'getopt', 'gettext', 'glob', 'gzip', 'heapq',
    'hmac', 'html', 'http.client', 'http.cookies', 'imaplib', 'inspect', 'ipaddress', 'json',
    'keyword', 'linecache', 'locale', 'logging', 'mailbox', 'mimetypes', 'netrc', 'ntpath',
    'numbers', 'operator', 'optparse', 'os', 'pathlib', 'pickle', 'pkgutil', 'platform',
    'plistlib', 'poplib', 'posixpath', 'pprint', 'queue', 'quopri', 'random', 're', 'reprlib',
    'sched', 'secrets', 'selectors', 'shlex', 'shutil', 'smtplib', 'socket', 'socketserver',
    'statistics', 'string', 'subprocess', 'tabnanny', 'tarfile', 'tempfile', 'textwrap',
    'threading', 'timeit', 'tokenize', 'trace', 'traceback', 'types', 'typing',
    'urllib.parse', 'urllib.request', 'uuid', 'warnings', 'wave', 'weakref', 'zipfile',
    'zipimport',
)


class Rows(NamedTuple):
  """Token rows (BOS first, PAD after the end) and the 0/1 mask of predicted tokens.

  ``mask[:, t]`` marks ``tokens[:, t]`` as a target, predicted from ``tokens[:, :t]``.
  """
  tokens: np.ndarray
  mask: np.ndarray


class Task(NamedTuple):
  name: str
  train: Rows
  held_out: Rows
  metric: str  # 'loss' (lower is better) or 'exact_match' (higher is better)


def _held_out(key: str) -> bool:
  return zlib.crc32(key.encode()) % 5 == 0


def _rows(pieces: list[tuple[list[int], list[int], list[int]]], bos: int, pad: int) -> Rows:
  """Packs (context, target, tail) token lists into rows of SEQ tokens, each starting with
  BOS; only the targets are predicted."""
  tokens, mask, row, row_mask = [], [], [bos], [0]
  for context, target, tail in pieces:
    if len(row) + len(context) + len(target) + len(tail) > SEQ:
      tokens.append(row + [pad] * (SEQ - len(row)))
      mask.append(row_mask + [0] * (SEQ - len(row_mask)))
      row, row_mask = [bos], [0]
    row += context + target + tail
    row_mask += [0] * len(context) + [1] * len(target) + [0] * len(tail)
  tokens.append(row + [pad] * (SEQ - len(row)))
  mask.append(row_mask + [0] * (SEQ - len(row_mask)))
  return Rows(np.asarray(tokens, np.int32), np.asarray(mask, np.int32))


def pydoc_task(tokenizer, bos: int, pad: int) -> Task:
  """Reference documentation as language modelling; one topic in five held out."""
  from pydoc_data.topics import topics

  split = {True: [], False: []}
  for key in sorted(topics):
    ids = tokenizer.encode(topics[key])
    windows = [ids[i:i + SEQ - 1] for i in range(0, len(ids) - SEQ + 2, SEQ - 1)]
    split[_held_out(key)] += [([], w, []) for w in windows]
  held = _rows(split[True], bos, pad)
  order = np.random.default_rng(0).permutation(len(held.tokens))[:HELD_OUT_ROWS]
  return Task('pydoc', _rows(split[False], bos, pad),
              Rows(held.tokens[order], held.mask[order]), 'loss')


def docstring_pairs() -> list[tuple[str, str]]:
  """(summary, name) for public functions and methods of MODULES, one per name, sorted."""
  found = {}
  for module_name in MODULES:
    module = importlib.import_module(module_name)
    owners = [module] + [c for c in vars(module).values()
                         if inspect.isclass(c) and c.__module__ == module.__name__]
    for owner in owners:
      for name, obj in vars(owner).items():
        if name.startswith('_') or not inspect.isfunction(obj) or name in found:
          continue
        summary = (inspect.getdoc(obj) or '').strip().split('\n')[0].strip()
        if 8 <= len(summary) <= 100 and name.lower() not in summary.lower():
          found[name] = summary
  return sorted((summary, name) for name, summary in found.items())


def names_task(tokenizer, bos: int, pad: int) -> Task:
  """Docstring summary → function name, packed a few examples to a row."""
  split, tail = {True: [], False: []}, tokenizer.encode('...)\n')
  for summary, name in docstring_pairs():
    context = tokenizer.encode(f'# {summary}\ndef')
    split[_held_out(name)].append((context, tokenizer.encode(f' {name}('), tail))
  order = np.random.default_rng(0).permutation(len(split[False]))
  return Task('names', _rows([split[False][i] for i in order], bos, pad),
              _rows(split[True], bos, pad), 'exact_match')


def build(name: str, tokenizer, bos: int, pad: int) -> Task:
  return {'pydoc': pydoc_task, 'names': names_task}[name](tokenizer, bos, pad)


def exact_matches(predicted: np.ndarray, rows: Rows) -> tuple[int, int]:
  """(examples whose every target token is predicted, examples): teacher-forced.

  ``predicted[:, t]`` is the argmax prediction for ``tokens[:, t + 1]``. An example is a
  maximal run of consecutive target positions in a row.
  """
  hit = predicted[:, :-1] == rows.tokens[:, 1:]
  mask = rows.mask[:, 1:].astype(bool)
  right = total = 0
  for row_hit, row_mask in zip(hit, mask, strict=True):
    edges = np.flatnonzero(np.diff(np.concatenate([[0], row_mask.astype(int), [0]])))
    for start, stop in zip(edges[::2], edges[1::2], strict=True):
      total += 1
      right += bool(row_hit[start:stop].all())
  return right, total
