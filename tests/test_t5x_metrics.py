"""t5x_configs.metrics without T5X: exact match and ROUGE-L on hand-checked cases, and
agreement with the ``rouge_score`` package where it is installed."""

import pytest

from t5x_configs import metrics


def test_normalize_answer():
  assert metrics.normalize_answer('  The Cat, sat!  ') == 'cat sat'
  assert metrics.normalize_answer(b'An apple') == 'apple'
  assert metrics.normalize_answer('¿Qué tal?') == 'qué tal'


def test_exact_match_percent_and_multiple_references():
  got = metrics.exact_match(['cba', 'The answer.', 'x', ['no', 'yes']],
                            ['cba', 'answer', 'y', 'Yes'])
  assert got == {'exact_match': 75.0}
  assert metrics.exact_match([], []) == {'exact_match': 0.0}
  with pytest.raises(ValueError, match='differ in length'):
    metrics.exact_match(['a'], [])


def test_rouge_l_by_hand():
  # target: a b c d e (5), prediction: a c e f (4); LCS = a c e (3).
  p, r = 3 / 4, 3 / 5
  assert metrics.rouge_l_fmeasure('a b c d e', 'a c e f') == pytest.approx(2 * p * r / (p + r))
  assert metrics.rouge_l_fmeasure('same words', 'Same, words!') == 1.0
  assert metrics.rouge_l_fmeasure('abc', '') == 0.0
  assert metrics.rouge_l_fmeasure('日本 語', '日本') == pytest.approx(2 / 3)  # not ASCII-only
  got = metrics.rouge_l(['a b', 'c d', ['x', 'e f']], ['a b', 'q', 'e f'])
  assert got == {'rougeL': pytest.approx(100 * 2 / 3)}


def test_lcs_is_a_subsequence_not_a_substring():
  assert metrics._lcs_length(list('axbycz'), list('abc')) == 3  # pylint: disable=protected-access
  assert metrics._lcs_length(list('abc'), list('cba')) == 1  # pylint: disable=protected-access


def test_rouge_l_agrees_with_rouge_score_on_ascii():
  rouge_scorer = pytest.importorskip('rouge_score.rouge_scorer')
  scorer = rouge_scorer.RougeScorer(['rougeL'])
  pairs = [('the cat sat on the mat', 'a cat sat on mat'),
           ('reverse the string abc', 'the reverse of abc'),
           ('one two three four', 'four three two one'), ('x y', 'z')]
  for target, prediction in pairs:
    expected = scorer.score(target, prediction)['rougeL'].fmeasure
    assert metrics.rouge_l_fmeasure(target, prediction) == pytest.approx(expected)


def test_strip_text_is_a_seqio_postprocessor():
  assert metrics.strip_text(b' cba \n', example={}, is_target=True) == 'cba'
  assert metrics.strip_text('  x ') == 'x'
