"""Tokenizers behind one small interface, so the pipeline, training metrics and sampling never care
which one is in use.

  tok = ByteTokenizer()                                   # default: raw UTF-8 bytes, vocab 256
  tok = SentencePieceTokenizer("/path/spm.model")         # e.g. from tools/train_tokenizer.py
  tok = HFTokenizer("/path/to/deepseek-v3/")              # tokenizer.json (+ tokenizer_config.json)
  ids = tok.encode("def f():\n")                          # list[int]; never adds BOS/EOS/pad
  tok.decode(ids)                                         # str; special tokens are dropped
  tok.vocab_size, tok.pad_id, tok.eos_id, tok.bos_id      # bos_id is None when there is none
  tok.token_byte_lengths()                                # int32 [vocab_size]: UTF-8 bytes per id

`token_byte_lengths()[i]` is the number of UTF-8 bytes token i stands for in decoded text (0 for
special/control tokens), so `bits/byte = sum(nll over targets) / (ln 2 * sum(lengths[targets]))`. It is
exact for the byte tokenizer, for SentencePiece models trained without a dummy prefix (as
tools/train_tokenizer.py trains them) and for byte-level BPE (GPT-2 / DeepSeek style) tokenizer.json;
for SentencePiece-style models that add a dummy-prefix space (most published ones) each encoded text
counts one byte more than its decoded text.

Text never encodes to pad/EOS/BOS (documents are packed with segment ids, so a special id inside one
would be a training target like any other token): the byte tokenizer drops NUL, whose byte is its
pad/EOS id 0, and `HFTokenizer` encodes the text of special tokens ("<｜end▁of▁sentence｜>" written in
a document) as ordinary text. SentencePiece never produces control pieces from text.

Everything here is offline: files are read from local paths; no hub, no `trust_remote_code`. A file
that is not a tokenizer of the expected kind is a ValueError naming it.
Tokenizers pickle by value (model bytes, not paths) so grain worker processes can use them.
"""

import abc
from collections.abc import Sequence
import json
import os
import re

import numpy as np


class Tokenizer(abc.ABC):
  """The interface. Subclasses set `pad_id`, `eos_id` and `bos_id` (None if the model has no BOS)."""

  pad_id: int
  eos_id: int
  bos_id: int | None = None

  @property
  @abc.abstractmethod
  def vocab_size(self) -> int:
    """Number of token ids (all ids are in [0, vocab_size)); a model's vocab may be padded larger."""

  @abc.abstractmethod
  def encode(self, text: str) -> list[int]:
    """Token ids of `text`, never pad/EOS/BOS."""

  @abc.abstractmethod
  def decode(self, ids: Sequence[int]) -> str:
    """Text of `ids`; pad/EOS/BOS and other special tokens, and ids outside the vocab, are dropped."""

  @abc.abstractmethod
  def token_byte_lengths(self) -> np.ndarray:
    """int32 [vocab_size]: UTF-8 bytes each id stands for (0 for special tokens)."""

  def encode_array(self, text: str | bytes) -> np.ndarray:
    """`encode` as an int32 array; accepts UTF-8 bytes (what TFDS Text features decode to)."""
    if isinstance(text, bytes):
      text = text.decode("utf-8")
    return np.asarray(self.encode(text), dtype=np.int32)

  def _valid(self, ids: Sequence[int]) -> list[int]:
    return [int(i) for i in np.asarray(ids).reshape(-1) if 0 <= int(i) < self.vocab_size]


class ByteTokenizer(Tokenizer):
  """UTF-8 bytes as token ids (vocab 256). Id 0 (the NUL byte) is pad and EOS.

  So NUL characters are dropped when encoding: in a document, id 0 would teach the model to end the
  document there (and `decode` drops id 0 anyway).
  """

  pad_id = 0
  eos_id = 0
  bos_id = None

  @property
  def vocab_size(self) -> int:
    return 256

  def encode(self, text: str) -> list[int]:
    return self.encode_array(text).tolist()

  def encode_array(self, text: str | bytes) -> np.ndarray:
    data = text if isinstance(text, bytes) else text.encode("utf-8")
    ids = np.frombuffer(data, dtype=np.uint8).astype(np.int32)
    return ids[ids != 0]  # NUL: id 0 is pad and EOS

  def decode(self, ids: Sequence[int]) -> str:
    ids = np.asarray(ids).reshape(-1)
    return ids[(ids > 0) & (ids < 256)].astype(np.uint8).tobytes().decode("utf-8", errors="replace")

  def token_byte_lengths(self) -> np.ndarray:
    lengths = np.ones(256, np.int32)
    lengths[0] = 0
    return lengths


class SentencePieceTokenizer(Tokenizer):
  """A SentencePiece `.model` file. pad falls back to EOS when the model defines no pad piece."""

  def __init__(self, model_path: str | None = None, *, model_proto: bytes | None = None):
    import sentencepiece as spm  # pylint: disable=g-import-not-at-top
    if model_proto is None:
      if not model_path or not os.path.isfile(model_path):
        raise ValueError(f"SentencePiece model file not found: {model_path!r}")
      with open(model_path, "rb") as f:
        model_proto = f.read()
    self._proto = model_proto
    where = repr(model_path) if model_path else "(model_proto)"
    try:
      self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
    except RuntimeError as e:  # the protobuf parse fails: not a .model file
      raise ValueError(f"{where} is not a SentencePiece model file ({e}).") from e
    if self._sp.get_piece_size() == 0:  # an empty file parses as an empty model
      raise ValueError(f"{where} is not a SentencePiece model file (no pieces).")
    if self._sp.eos_id() < 0:
      raise ValueError(f"SentencePiece model {where} defines no EOS piece.")
    self.eos_id = self._sp.eos_id()
    self.pad_id = self._sp.pad_id() if self._sp.pad_id() >= 0 else self.eos_id
    self.bos_id = self._sp.bos_id() if self._sp.bos_id() >= 0 else None

  def __getstate__(self):
    return {"proto": self._proto}

  def __setstate__(self, state):
    self.__init__(model_proto=state["proto"])

  @property
  def vocab_size(self) -> int:
    return self._sp.get_piece_size()

  def encode(self, text: str) -> list[int]:
    return self._sp.encode(text, out_type=int)

  def decode(self, ids: Sequence[int]) -> str:
    return self._sp.decode(self._valid(ids))

  def token_byte_lengths(self) -> np.ndarray:
    sp = self._sp
    lengths = np.zeros(self.vocab_size, np.int32)
    for i in range(self.vocab_size):
      if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
        continue
      lengths[i] = 1 if sp.is_byte(i) else len(sp.id_to_piece(i).replace("\u2581", " ").encode("utf-8"))
    return lengths


# Special-token names tried, in order, when no tokenizer_config.json says which is which.
_EOS_CANDIDATES = ("<｜end▁of▁sentence｜>", "</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>",
                   "<|eos|>")
_BOS_CANDIDATES = ("<｜begin▁of▁sentence｜>", "<s>", "<|begin_of_text|>", "<bos>", "<|bos|>")
_PAD_CANDIDATES = ("<｜▁pad▁｜>", "<pad>", "<|pad|>", "[PAD]")
_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def _byte_level_alphabet() -> dict[str, int]:
  """The printable-character alias of each byte used by byte-level BPE (GPT-2, DeepSeek): char → byte."""
  printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
               *range(ord("®"), ord("ÿ") + 1)}
  alias, extra = {}, 0
  for b in range(256):
    if b in printable:
      alias[chr(b)] = b
    else:
      alias[chr(256 + extra)] = b
      extra += 1
  return alias


def _uses_byte_level(node) -> bool:
  """Whether a tokenizer.json component (possibly a Sequence) contains a ByteLevel step."""
  if isinstance(node, dict):
    if node.get("type") == "ByteLevel":
      return True
    return any(_uses_byte_level(v) for v in node.values() if isinstance(v, (dict, list)))
  if isinstance(node, list):
    return any(_uses_byte_level(v) for v in node)
  return False


class HFTokenizer(Tokenizer):
  """A Hugging Face `tokenizer.json` read with the `tokenizers` library (no transformers, no network).

  `path` is the tokenizer.json file or a directory holding it. EOS/BOS/pad come from the arguments,
  else from a `tokenizer_config.json` beside it (as in every HF checkpoint; a null entry means none),
  else from well-known special-token names; pad falls back to EOS.
  """

  def __init__(self, path: str, *, eos_token: str | None = None, bos_token: str | None = None,
               pad_token: str | None = None):
    if path and os.path.isdir(path):
      path = os.path.join(path, "tokenizer.json")
    if not path or not os.path.isfile(path):
      raise ValueError(f"tokenizer.json not found: {path!r}")
    try:
      with open(path, encoding="utf-8") as f:
        spec_json = f.read()
    except UnicodeDecodeError as e:
      raise ValueError(f"{path!r} is not a tokenizer.json (not UTF-8: {e}).") from e
    try:
      self._load(spec_json)
    except Exception as e:  # pylint: disable=broad-except  (the tokenizers library raises plain Exception)
      raise ValueError(f"{path!r} is not a valid tokenizer.json ({e}).") from e
    config = {}
    config_path = os.path.join(os.path.dirname(path), "tokenizer_config.json")
    if os.path.isfile(config_path):
      try:
        with open(config_path, encoding="utf-8") as f:
          config = json.load(f)
      except ValueError as e:  # bad JSON or not UTF-8
        raise ValueError(f"{config_path!r} is not a JSON file ({e}).") from e
      if not isinstance(config, dict):
        raise ValueError(f"{config_path!r} must hold a JSON object, got {type(config).__name__}.")
    vocab = self._tok.get_vocab(with_added_tokens=True)

    def resolve(explicit, config_key, candidates):
      if explicit is not None:
        name = explicit
      elif config_key in config:  # the checkpoint says; null means "none"
        name = _token_content(config[config_key])
      else:
        name = next((c for c in candidates if c in vocab), None)
      if name is not None and name not in vocab:
        raise ValueError(f"{config_key} {name!r} is not in the vocabulary of {path!r}")
      return None if name is None else vocab[name]

    eos = resolve(eos_token, "eos_token", _EOS_CANDIDATES)
    if eos is None:
      raise ValueError(f"Cannot tell the EOS token of {path!r}: pass eos_token=...")
    pad = resolve(pad_token, "pad_token", _PAD_CANDIDATES)
    self.eos_id, self.bos_id = eos, resolve(bos_token, "bos_token", _BOS_CANDIDATES)
    self.pad_id = eos if pad is None else pad

  def _load(self, spec_json: str):
    import tokenizers  # pylint: disable=g-import-not-at-top
    self._json = spec_json
    self._tok = tokenizers.Tokenizer.from_str(spec_json)
    self._tok.encode_special_tokens = True  # "<eos>" in a text is text, not the EOS id
    self._special = None  # built by encode_with_special_tokens on first use

  def __getstate__(self):
    return dict(json=self._json, ids=(self.eos_id, self.bos_id, self.pad_id))

  def __setstate__(self, state):
    self._load(state["json"])
    self.eos_id, self.bos_id, self.pad_id = state["ids"]

  @property
  def vocab_size(self) -> int:
    return self._tok.get_vocab_size(with_added_tokens=True)

  def encode(self, text: str) -> list[int]:
    return self._tok.encode(text, add_special_tokens=False).ids

  def encode_with_special_tokens(self, text: str) -> list[int]:
    """Like `encode`, but special-token text ("<eos>") becomes its id: for rendered chat templates."""
    if self._special is None:  # a second instance: `encode` keeps treating specials as text
      import tokenizers  # pylint: disable=g-import-not-at-top
      self._special = tokenizers.Tokenizer.from_str(self._json)
    return self._special.encode(text, add_special_tokens=False).ids

  def id_to_token(self, i: int) -> str | None:
    """The vocabulary string of id `i` ("<eos>" for EOS), or None if there is none."""
    return self._tok.id_to_token(i)

  def decode(self, ids: Sequence[int]) -> str:
    return self._tok.decode(self._valid(ids), skip_special_tokens=True)

  def token_byte_lengths(self) -> np.ndarray:
    lengths = np.zeros(self.vocab_size, np.int32)
    added = self._tok.get_added_tokens_decoder()
    spec = json.loads(self._json)
    byte_level = _uses_byte_level(spec.get("decoder")) or _uses_byte_level(spec.get("pre_tokenizer"))
    alphabet = _byte_level_alphabet() if byte_level else {}
    for token, i in self._tok.get_vocab(with_added_tokens=True).items():
      if i >= len(lengths):
        continue
      if i in added:
        lengths[i] = 0 if added[i].special else len(added[i].content.encode("utf-8"))
      elif byte_level:
        lengths[i] = sum(1 if ch in alphabet else len(ch.encode("utf-8")) for ch in token)
      elif _BYTE_PIECE.fullmatch(token):
        lengths[i] = 1
      else:
        lengths[i] = len(token.replace("\u2581", " ").encode("utf-8"))
    return lengths


def _token_content(value) -> str | None:
  """A tokenizer_config.json special-token entry: a string or an AddedToken dict."""
  if isinstance(value, dict):
    return value.get("content")
  return value if isinstance(value, str) else None


TOKENIZERS = ("byte", "sentencepiece", "hf")


def from_name(name: str, path: str = "") -> Tokenizer:
  """`byte` | `sentencepiece` (path: .model) | `hf` (path: tokenizer.json or its directory)."""
  if name == "byte":
    return ByteTokenizer()
  if name == "sentencepiece":
    return SentencePieceTokenizer(path)
  if name == "hf":
    return HFTokenizer(path)
  raise ValueError(f"Unknown tokenizer {name!r}; expected one of {TOKENIZERS}.")
