"""seqio tasks for LoRA fine-tuning from gin: the user's JSONL/TSV files, or a tiny synthetic task.

Both registrars return the task name, so gin can register a task while it
builds T5X's dataset configs, with no Python written by the user::

  MIXTURE_OR_TASK_NAME = @tasks.register_text_task()
  tasks.register_text_task:
    name = 'my_task'
    split_files = {'train': '/data/train.jsonl', 'validation': '/data/dev.jsonl'}
    vocabulary = %VOCABULARY

Every task reports exact match and ROUGE-L (:mod:`t5x_configs.metrics`) on the decoded,
whitespace-stripped outputs, so T5X's ``t5x.eval`` and fine-tuning's periodic inference
evaluation (``infer_eval``) have metrics to compute. Parsing is plain Python (testable
without seqio); seqio and TensorFlow are imported only when a task is registered.
"""

from __future__ import annotations

import csv
import json
import os
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from t5x_configs import metrics as metrics_lib

FORMATS = ('jsonl', 'tsv')
SYNTHETIC_TASK = 'rite_optax_synthetic_reverse'


def infer_format(path: str) -> str:
  """``'jsonl'`` for ``*.jsonl``/``*.json``, ``'tsv'`` for ``*.tsv``; else a ``ValueError``."""
  ext = os.path.splitext(path)[1].lower()
  if ext in ('.jsonl', '.json'):
    return 'jsonl'
  if ext == '.tsv':
    return 'tsv'
  raise ValueError(f'file_format: cannot infer it from {path!r}; pass one of {FORMATS}.')


def read_examples(
    path: str,
    file_format: str | None = None,
    inputs_key: str = 'inputs',
    targets_key: str = 'targets',
) -> Iterator[dict[str, str]]:
  """Yields ``{'inputs': str, 'targets': str}`` from a JSONL or TSV file.

  JSONL: one object per line with ``inputs_key`` and ``targets_key`` string
  fields (others ignored). TSV: two tab-separated columns, inputs then targets,
  no header. Blank lines are skipped.

  Raises:
    ValueError: naming the file, the line and the problem.
  """
  file_format = file_format or infer_format(path)
  if file_format not in FORMATS:
    raise ValueError(f'file_format must be one of {FORMATS}, got {file_format!r}.')
  with open(path, encoding='utf-8', newline='') as f:
    if file_format == 'jsonl':
      for lineno, line in enumerate(f, 1):
        if not line.strip():
          continue
        try:
          record = json.loads(line)
        except json.JSONDecodeError as e:
          raise ValueError(f'{path}:{lineno}: not valid JSON ({e.msg}).') from e
        if not isinstance(record, dict):
          raise ValueError(f'{path}:{lineno}: expected a JSON object, got {type(record).__name__}.')
        yield {
            'inputs': _text_field(record, inputs_key, 'inputs_key', path, lineno),
            'targets': _text_field(record, targets_key, 'targets_key', path, lineno),
        }
    else:
      for lineno, row in enumerate(csv.reader(f, delimiter='\t', quoting=csv.QUOTE_NONE), 1):
        if not row or row == ['']:
          continue
        if len(row) != 2:
          raise ValueError(
              f'{path}:{lineno}: expected 2 tab-separated columns (inputs, targets), got {len(row)}.')
        yield {'inputs': row[0], 'targets': row[1]}


def _text_field(record: Mapping[str, Any], key: str, option: str, path: str, lineno: int) -> str:
  if key not in record:
    raise ValueError(
        f'{path}:{lineno}: no field {key!r} ({option}); fields are {sorted(record)}.')
  if not isinstance(record[key], str):
    raise ValueError(f'{path}:{lineno}: field {key!r} ({option}) must be a string.')
  return record[key]


def check_split_files(split_files: Mapping[str, Any]) -> dict[str, list[str]]:
  """Normalizes ``{split: path or [paths]}``; errors name ``split_files``.

  Training needs a ``'train'`` split; evaluation and inference only the split they read
  (e.g. ``{'validation': ...}``), so any non-empty mapping is accepted here.
  """
  if not isinstance(split_files, Mapping) or not split_files:
    raise ValueError(
        f'split_files must map split names to files, got {split_files!r}.')
  out = {}
  for split, files in split_files.items():
    files = [files] if isinstance(files, str) else list(files)
    if not files:
      raise ValueError(f'split_files[{split!r}] is empty.')
    missing = [p for p in files if not os.path.exists(p)]
    if missing:
      raise ValueError(f'split_files[{split!r}]: no such file(s) {missing}.')
    out[split] = files
  return out


def synthetic_examples(num_examples: int, seed: int = 0, max_len: int = 8) -> list[dict[str, str]]:
  """A string-reversal task: ``'reverse: abc'`` → ``'cba'``; learnable in a few steps."""
  rng = random.Random(seed)
  letters = 'abcdefgh'
  out = []
  for _ in range(num_examples):
    word = ''.join(rng.choice(letters) for _ in range(rng.randint(2, max_len)))
    out.append({'inputs': f'reverse: {word}', 'targets': word[::-1]})
  return out


def check_metric_fns(metric_fns: Sequence[Callable[..., Mapping[str, float]]]) -> tuple:
  """A tuple of callables ``(targets, predictions) -> {name: value}``; errors name ``metric_fns``."""
  if isinstance(metric_fns, (str, bytes)) or not isinstance(metric_fns, Sequence):
    raise ValueError(f'metric_fns must be a sequence of functions, got {metric_fns!r}.')
  for fn in metric_fns:
    if not callable(fn):
      raise ValueError(f'metric_fns: {fn!r} is not callable.')
  return tuple(metric_fns)


def _register(
    name: str,
    examples_by_split: Mapping[str, Any],
    vocabulary: Any,
    metric_fns: Sequence[Callable[..., Mapping[str, float]]],
) -> str:
  """Registers (or replaces) a seqio task over in-memory or lazily read examples.

  Outputs and targets go through :func:`metrics.strip_text` before ``metric_fns``.
  """
  import seqio  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  def dataset_fn(split: str, shuffle_files: bool, seed: int | None = None):
    del shuffle_files, seed
    return tf.data.Dataset.from_generator(
        lambda: iter(examples_by_split[split]()),
        output_signature={
            'inputs': tf.TensorSpec((), tf.string),
            'targets': tf.TensorSpec((), tf.string),
        })

  if vocabulary is None:
    vocabulary = seqio.ByteVocabulary()
  features = {
      'inputs': seqio.Feature(vocabulary=vocabulary, add_eos=True),
      'targets': seqio.Feature(vocabulary=vocabulary, add_eos=True),
  }
  # T5X evaluates the registrar once per dataset config: replace, don't duplicate.
  seqio.TaskRegistry.remove(name)
  seqio.TaskRegistry.add(
      name,
      source=seqio.FunctionDataSource(dataset_fn, splits=tuple(examples_by_split)),
      preprocessors=[seqio.preprocessors.tokenize, seqio.preprocessors.append_eos_after_trim],
      output_features=features,
      postprocess_fn=metrics_lib.strip_text,
      metric_fns=list(metric_fns),
  )
  return name


def register_text_task(
    name: str,
    split_files: Mapping[str, Any],
    vocabulary: Any = None,
    file_format: str | None = None,
    inputs_key: str = 'inputs',
    targets_key: str = 'targets',
    metric_fns: Sequence[Callable[..., Mapping[str, float]]] = metrics_lib.DEFAULT_METRICS,
) -> str:
  """Registers a seqio text-to-text task over your JSONL/TSV files; returns ``name``.

  Args:
    name: the seqio task name.
    split_files: ``{'train': path or [paths], 'validation': ...}``.
    vocabulary: a ``seqio.Vocabulary`` (gin: ``%VOCABULARY``, mT5's
      SentencePiece); ``None`` uses ``seqio.ByteVocabulary()``.
    file_format: ``'jsonl'`` or ``'tsv'``; inferred from the extension if ``None``.
    inputs_key, targets_key: JSONL field names.
    metric_fns: seqio metric functions ``(targets, predictions) -> {name: value}`` on
      stripped text; default exact match and ROUGE-L.
  """
  if not isinstance(name, str) or not name:
    raise ValueError(f'name must be a non-empty string, got {name!r}.')
  files = check_split_files(split_files)
  metric_fns = check_metric_fns(metric_fns)
  if file_format is not None and file_format not in FORMATS:
    raise ValueError(f'file_format must be one of {FORMATS}, got {file_format!r}.')

  def reader(paths):
    return lambda: (ex for p in paths
                    for ex in read_examples(p, file_format, inputs_key, targets_key))

  return _register(
      name, {split: reader(paths) for split, paths in files.items()}, vocabulary, metric_fns)


def register_synthetic_task(
    name: str = SYNTHETIC_TASK,
    num_train: int = 512,
    num_validation: int = 64,
    metric_fns: Sequence[Callable[..., Mapping[str, float]]] = metrics_lib.DEFAULT_METRICS,
) -> str:
  """Registers the embedded string-reversal task (byte vocabulary); returns ``name``.

  Its ``'validation'`` split (other seed than ``'train'``) is what eval and infer read.
  """
  for option, value in (('num_train', num_train), ('num_validation', num_validation)):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ValueError(f'{option} must be an int >= 1, got {value!r}.')
  data = {'train': synthetic_examples(num_train, seed=0),
          'validation': synthetic_examples(num_validation, seed=1)}
  return _register(name, {split: (lambda ex=ex: ex) for split, ex in data.items()}, None,
                   check_metric_fns(metric_fns))
