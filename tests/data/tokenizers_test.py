"""Tokenizers: round trips, byte accounting, specials, pickling; SentencePiece and HF built in-test."""

import json
import os
import pickle
import re
import tempfile

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np

import datatest_util
from data import config as config_lib
from data import pipeline
from data import tokenizers

TEXTS = datatest_util.TEXTS
class TokenizersTest(parameterized.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.tmp = tempfile.mkdtemp(prefix="tok_test_")
    cls.toks = {
        "byte": tokenizers.ByteTokenizer(),
        "sentencepiece": tokenizers.SentencePieceTokenizer(datatest_util.sentencepiece_model(cls.tmp)),
        "hf": tokenizers.HFTokenizer(datatest_util.hf_tokenizer_dir(cls.tmp, with_config=False)),
    }

  @parameterized.parameters("byte", "sentencepiece", "hf")
  def test_round_trip_and_byte_lengths(self, name):
    tok = self.toks[name]
    lengths = tok.token_byte_lengths()
    self.assertEqual(lengths.shape, (tok.vocab_size,))
    self.assertEqual(lengths.dtype, np.int32)
    for text in TEXTS:
      ids = tok.encode(text)
      self.assertIsInstance(ids, list)
      self.assertTrue(all(0 <= i < tok.vocab_size for i in ids))
      self.assertEqual(tok.decode(ids), text)
      self.assertEqual(int(lengths[ids].sum()), len(tok.decode(ids).encode("utf-8")), text)
      np.testing.assert_array_equal(tok.encode_array(text.encode("utf-8")), ids)

  @parameterized.parameters("byte", "sentencepiece", "hf")
  def test_specials(self, name):
    tok = self.toks[name]
    for i in (tok.pad_id, tok.eos_id):
      self.assertBetween(i, 0, tok.vocab_size - 1)
      self.assertEqual(tok.token_byte_lengths()[i], 0)
    # Decoding drops specials, so a document's packed stream decodes back to the document.
    self.assertEqual(tok.decode(pipeline.document_tokens(tok, TEXTS[1]).tolist()), TEXTS[1])

  @parameterized.parameters("byte", "sentencepiece", "hf")
  def test_pickles_by_value(self, name):
    tok = pickle.loads(pickle.dumps(self.toks[name]))
    self.assertEqual(tok.encode(TEXTS[2]), self.toks[name].encode(TEXTS[2]))
    self.assertEqual((tok.pad_id, tok.eos_id, tok.bos_id),
                     (self.toks[name].pad_id, self.toks[name].eos_id, self.toks[name].bos_id))

  @parameterized.parameters("byte", "sentencepiece", "hf")
  def test_text_never_encodes_to_special_ids(self, name):
    """Packed documents are masked by segment, not by id: a special id inside text would be a target."""
    tok = self.toks[name]
    text = "a\0b <pad> <eos> <bos> </s> <s> <｜end▁of▁sentence｜>\0"
    specials = {tok.pad_id, tok.eos_id, tok.bos_id} - {None}
    for ids in (tok.encode(text), tok.encode_array(text.encode("utf-8")).tolist()):
      self.assertEmpty(specials & set(ids), ids)
    self.assertIn("<pad> <eos> <bos> </s> <s>", tok.decode(tok.encode(text)))  # kept as text

  def test_byte_tokenizer_drops_nul(self):
    tok = self.toks["byte"]
    self.assertEqual(tok.encode("a\0b"), [97, 98])
    np.testing.assert_array_equal(tok.encode_array(b"\0a\0\0b\0"), [97, 98])

  def test_files_that_are_no_tokenizer_name_the_path(self):
    tmp = self.enter_context(tempfile.TemporaryDirectory())
    def write(name, data):
      path = os.path.join(tmp, name)
      os.makedirs(os.path.dirname(path), exist_ok=True)
      with open(path, "wb") as f:
        f.write(data)
      return path
    for data in (b"not a protobuf \xff\xfe", b""):
      path = write("garbage.model", data)
      with self.subTest(data=data), self.assertRaisesRegex(
          ValueError, re.escape(repr(path)) + " is not a SentencePiece model file"):
        tokenizers.SentencePieceTokenizer(path)
    for data in (b"{not json", b"[1, 2]", b'{"version": "1.0"}', b"\xff\xfe{}"):
      path = write("bad/tokenizer.json", data)
      with self.subTest(data=data), self.assertRaisesRegex(
          ValueError, re.escape(repr(path)) + " is not a (valid )?tokenizer.json"):
        tokenizers.HFTokenizer(os.path.dirname(path))
    with open(os.path.join(self.tmp, "hf", "tokenizer.json"), "rb") as f:
      write("bad_config/tokenizer.json", f.read())
    for data, message in ((b"{bad", "is not a JSON file"), (b"[]", "must hold a JSON object, got list")):
      path = write("bad_config/tokenizer_config.json", data)
      with self.subTest(data=data), self.assertRaisesRegex(ValueError, re.escape(repr(path)) + " " + message):
        tokenizers.HFTokenizer(os.path.dirname(path))

  def test_byte_tokenizer_ids(self):
    tok = self.toks["byte"]
    self.assertEqual((tok.vocab_size, tok.pad_id, tok.eos_id, tok.bos_id), (256, 0, 0, None))
    self.assertEqual(tok.encode("é"), [0xC3, 0xA9])

  def test_hf_special_tokens_from_names_and_config(self):
    auto = self.toks["hf"]
    with open(os.path.join(self.tmp, "hf", "tokenizer.json"), encoding="utf-8") as f:
      vocab = json.load(f)["model"]["vocab"]
    self.assertEqual((auto.pad_id, auto.eos_id, auto.bos_id),
                     (vocab["<pad>"], vocab["<eos>"], vocab["<bos>"]))
    configured = tokenizers.HFTokenizer(
        datatest_util.hf_tokenizer_dir(tempfile.mkdtemp(), with_config=True))
    self.assertEqual(configured.pad_id, configured.eos_id)  # config says no pad: pad falls back to EOS
    explicit = tokenizers.HFTokenizer(os.path.join(self.tmp, "hf", "tokenizer.json"), eos_token="<pad>")
    self.assertEqual(explicit.eos_id, vocab["<pad>"])

  def test_make_tokenizer_and_errors(self):
    c = config_lib.default_data_config()
    self.assertIsInstance(pipeline.make_tokenizer(c), tokenizers.ByteTokenizer)
    c.tokenizer, c.tokenizer_path = "sentencepiece", os.path.join(self.tmp, "spm.model")
    self.assertEqual(pipeline.make_tokenizer(c).vocab_size, self.toks["sentencepiece"].vocab_size)
    c.tokenizer, c.tokenizer_path = "hf", os.path.join(self.tmp, "hf")
    self.assertEqual(pipeline.make_tokenizer(c).vocab_size, self.toks["hf"].vocab_size)
    with self.assertRaisesRegex(ValueError, "Unknown tokenizer"):
      tokenizers.from_name("wordpiece")
    with self.assertRaisesRegex(ValueError, "not found"):
      tokenizers.from_name("sentencepiece", "/nonexistent.model")
    with self.assertRaisesRegex(ValueError, "not found"):
      tokenizers.from_name("hf", "")


if __name__ == "__main__":
  absltest.main()
