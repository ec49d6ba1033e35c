"""evaluation.sample's text-prompt path: prompts that cannot start a generation fail with a clear error
before any model runs."""

import numpy as np
from absl.testing import absltest

from data import tokenizers
from evaluation import sample


class EncodePromptsTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.tok = tokenizers.ByteTokenizer()  # no BOS: an empty text is an empty prompt

  def test_right_pads_with_lengths(self):
    ids, lengths = sample.encode_prompts(self.tok, ["ab", "c"], pad_to=3)
    np.testing.assert_array_equal(ids, [[97, 98, 0], [99, 0, 0]])
    np.testing.assert_array_equal(lengths, [2, 1])

  def test_empty_prompt_is_named(self):
    with self.assertRaisesRegex(ValueError, r"^prompt 1 \(''\) encodes to no tokens"):
      sample.encode_prompts(self.tok, ["def f(", ""])
    with self.assertRaisesRegex(ValueError, r"^prompt 0 \('\\x00'\) encodes to no tokens"):
      sample.encode_prompts(self.tok, ["\0"])  # NUL is the byte tokenizer's pad/EOS: dropped

  def test_no_prompts(self):
    with self.assertRaisesRegex(ValueError, "prompts is empty"):
      sample.encode_prompts(self.tok, [])
    with self.assertRaisesRegex(ValueError, "num_samples must be a positive integer, got 0"):
      sample.sample(None, self.tok, "def f(", num_samples=0)  # fails before the model is needed

  def test_a_bare_string_is_not_a_list_of_prompts(self):
    with self.assertRaisesRegex(ValueError, "sequence of strings, got the string 'def f\\('"):
      sample.encode_prompts(self.tok, "def f(")


if __name__ == "__main__":
  absltest.main()
