"""Text-to-text evaluation metrics for seqio tasks: exact match and ROUGE-L (plain Python).

The LoRA-RITE paper reports exact match and ROUGE-L on Super-NaturalInstructions. These
follow ``t5.evaluation.metrics`` (scores in percent, ``(targets, predictions) -> dict``, the
signature seqio's ``Task(metric_fns=...)`` expects) without pulling in the ``t5`` package:

* :func:`exact_match`: percent of predictions equal to their target after
  :func:`normalize_answer` (lowercase, no punctuation, articles or extra spaces),
  the SQuAD/SNI normalization.
* :func:`rouge_l`: mean ROUGE-L F-measure of the longest common subsequence of
  :func:`rouge_tokens`. Tokens are Unicode word characters, lowercased, so mT5's
  non-English outputs are scored too (``rouge_score``'s default tokenizer keeps only
  ``[a-z0-9]`` and scores them 0); on ASCII text both give the same F-measure.

A target may also be a list of acceptable references: the best-scoring one counts.
"""

from __future__ import annotations

import re
import string
import unicodedata
from collections.abc import Sequence

_ARTICLES = re.compile(r'\b(a|an|the)\b')
_WORDS = re.compile(r'\w+', re.UNICODE)


def _as_text(value) -> str:
  return value.decode('utf-8') if isinstance(value, bytes) else str(value)


def _references(target) -> list[str]:
  if isinstance(target, (str, bytes)):
    return [_as_text(target)]
  refs = [_as_text(t) for t in target]
  if not refs:
    raise ValueError('a target must be a string or a non-empty list of strings.')
  return refs


def _check_lengths(targets: Sequence, predictions: Sequence) -> None:
  if len(targets) != len(predictions):
    raise ValueError(
        f'targets and predictions differ in length: {len(targets)} vs {len(predictions)}.')


def normalize_answer(text: str) -> str:
  """Lowercases, drops punctuation and English articles, collapses whitespace."""
  text = _as_text(text).lower()
  text = ''.join(c for c in text
                 if c not in string.punctuation and not unicodedata.category(c).startswith('P'))
  return ' '.join(_ARTICLES.sub(' ', text).split())


def rouge_tokens(text: str) -> list[str]:
  """Lowercased runs of Unicode word characters (letters, digits, underscore)."""
  return _WORDS.findall(_as_text(text).lower())


def _lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
  """Length of the longest common subsequence (O(len(a)·len(b)) time, O(len(b)) memory)."""
  if not a or not b:
    return 0
  prev = [0] * (len(b) + 1)
  for x in a:
    cur = [0]
    for j, y in enumerate(b):
      cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
    prev = cur
  return prev[-1]


def rouge_l_fmeasure(target: str, prediction: str) -> float:
  """ROUGE-L F1 in [0, 1]: ``2·P·R / (P + R)`` with ``P = LCS/len(pred)``, ``R = LCS/len(target)``."""
  ref, pred = rouge_tokens(target), rouge_tokens(prediction)
  lcs = _lcs_length(ref, pred)
  if lcs == 0:
    return 0.0
  precision, recall = lcs / len(pred), lcs / len(ref)
  return 2 * precision * recall / (precision + recall)


def exact_match(targets: Sequence, predictions: Sequence) -> dict[str, float]:
  """``{'exact_match': percent}`` of predictions equal to a target after :func:`normalize_answer`."""
  _check_lengths(targets, predictions)
  if not targets:
    return {'exact_match': 0.0}
  hits = sum(
      max(normalize_answer(r) == normalize_answer(p) for r in _references(t))
      for t, p in zip(targets, predictions, strict=True))
  return {'exact_match': 100.0 * hits / len(targets)}


def rouge_l(targets: Sequence, predictions: Sequence) -> dict[str, float]:
  """``{'rougeL': percent}``, the mean ROUGE-L F-measure (best reference per example)."""
  _check_lengths(targets, predictions)
  if not targets:
    return {'rougeL': 0.0}
  total = sum(
      max(rouge_l_fmeasure(r, p) for r in _references(t))
      for t, p in zip(targets, predictions, strict=True))
  return {'rougeL': 100.0 * total / len(targets)}


DEFAULT_METRICS = (exact_match, rouge_l)
"""The metrics every task registered by :mod:`t5x_configs.tasks` reports by default."""


def strip_text(text, example=None, is_target: bool = False) -> str:
  """seqio postprocessor: decoded text with surrounding whitespace removed.

  seqio calls it on each model output and (``is_target=True``) on each target; both
  arrive as ``str`` (``bytes`` are decoded), so metrics compare plain strings.
  """
  del example, is_target
  return _as_text(text).strip()
