"""Rendering SFT examples into tokens with a loss mask, and the prompt a model completes.

An example is a dict in one of two forms (other keys, such as "answer", are ignored):

  {"prompt": str, "completion": str}
  {"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]}  # >= 1 assistant turn

  template = chat.resolve_template(data_config)               # None = the project template
  tokens_N, mask_N = chat.encode_example(example, tok, template)
  prompt_N = chat.prompt_tokens(example, tok, template)       # greedy-decode from here

`mask_N[i] = 1` when token i is a trained target (predicted from position i - 1); token 0 never is.
`prompt_tokens` is exactly the prefix of `tokens_N` that precedes the last trained part, so a model
generating from it sees what it saw in training.

prompt/completion: `[bos] + encode(prompt)` (not trained) + `encode(completion) + [eos]` (trained);
BOS only when the tokenizer has one.

The project template (messages, template None) — one line per turn, no special tokens but EOS:

  [bos]
  system or user turn:  "{role}: {content}\\n"        not trained
  assistant turn:       "assistant: "                 not trained
                        content + [eos]               trained
  generation prompt:    "assistant: "

  e.g. user "2+2?", assistant "4"  →  "user: 2+2?\\nassistant: " | "4" <eos>

HF chat templates (a jinja2 string such as tokenizer_config.json's `chat_template`) are rendered as
transformers renders them: a sandboxed environment with trim_blocks, lstrip_blocks, the loopcontrols
extension, `raise_exception`, `strftime_now` and a `tojson` filter; variables `messages`, `bos_token`,
`eos_token`, `add_generation_prompt`. The mask comes from prefix renders: for the assistant turn i,
`render(messages[:i], add_generation_prompt=True)` is everything before it (not trained) and
`render(messages[:i + 1])` minus that is the turn (trained); a template that does not render each prefix
as a prefix of the next is a ValueError. Pieces are encoded one by one with special-token text mapped to
its id (`HFTokenizer.encode_with_special_tokens`), and an assistant piece not ending with EOS gets the EOS
id appended. Tokenizers without that method (byte, sentencepiece) get "" for bos_token/eos_token, their
BOS id prepended and EOS appended.
"""

import datetime
import functools
import json
import os

import numpy as np

ROLES = ("system", "user", "assistant")
PROJECT = "project"  # data_config.chat_template value that forces the project template


def check_example(example) -> None:
  """Raises ValueError (without file/line: callers add them) if `example` is not an SFT example."""
  if not isinstance(example, dict):
    raise ValueError(f"must be a JSON object, got {type(example).__name__}")
  has_pc = "prompt" in example or "completion" in example
  if has_pc and "messages" in example:
    raise ValueError('has both "messages" and "prompt"/"completion"; use one form')
  if not has_pc and "messages" not in example:
    raise ValueError('needs "prompt" and "completion", or "messages"')
  if has_pc:
    for key in ("prompt", "completion"):
      if key not in example:
        raise ValueError(f'"{key}" is missing')
      if not isinstance(example[key], str):
        raise ValueError(f'"{key}" must be a string, got {type(example[key]).__name__}')
    return
  messages = example["messages"]
  if not isinstance(messages, list) or not messages:
    raise ValueError('"messages" must be a non-empty list')
  for j, m in enumerate(messages):
    if not isinstance(m, dict):
      raise ValueError(f"messages[{j}] must be an object, got {type(m).__name__}")
    if m.get("role") not in ROLES:
      raise ValueError(f"messages[{j}] has role {m.get('role')!r}; expected one of {ROLES}")
    if not isinstance(m.get("content"), str):
      raise ValueError(f'messages[{j}]: "content" must be a string, got {type(m.get("content")).__name__}')
  if not any(m["role"] == "assistant" for m in messages):
    raise ValueError('"messages" has no assistant turn')


def resolve_template(data_config) -> str | None:
  """The run's chat template: None = the project template, else a jinja2 string.

  data_config.chat_template: "" = the HF tokenizer's own (tokenizer_config.json `chat_template`) when
  the tokenizer is `hf` and has one, else the project template; "project"; a jinja2 string; or the
  path of a file holding one.
  """
  value = data_config.get("chat_template", "") or ""
  if value == PROJECT:
    return None
  if value:
    if "{{" in value or "{%" in value:
      return value
    path = os.path.expanduser(value)
    if not os.path.isfile(path):
      raise ValueError(f"chat_template {value!r} is neither a jinja2 template nor a file.")
    with open(path, encoding="utf-8") as f:
      return f.read()
  if data_config.get("tokenizer", "byte") != "hf":
    return None
  path = data_config.get("tokenizer_path", "")
  config_path = os.path.join(path if os.path.isdir(path) else os.path.dirname(path), "tokenizer_config.json")
  if not os.path.isfile(config_path):
    return None
  with open(config_path, encoding="utf-8") as f:
    template = json.load(f).get("chat_template")
  if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
    template = next((t.get("template") for t in template if t.get("name") == "default"), None)
  return template or None


def encode_example(example: dict, tokenizer, template: str | None) -> tuple[np.ndarray, np.ndarray]:
  """(tokens int32 [n], loss_mask int32 [n]) of one example; see the module docstring."""
  pieces = _pieces(example, tokenizer, template)
  tokens = np.concatenate([ids for ids, _ in pieces]).astype(np.int32)
  mask = np.concatenate([np.full(len(ids), int(trained), np.int32) for ids, trained in pieces])
  if len(mask):
    mask[0] = 0  # nothing predicts the first token
  return tokens, mask


def prompt_tokens(example: dict, tokenizer, template: str | None) -> np.ndarray:
  """int32 [n]: the tokens before the example's last trained part (the last completion)."""
  pieces = _pieces(example, tokenizer, template)
  last = max(i for i, (_, trained) in enumerate(pieces) if trained)
  return np.concatenate([np.zeros(0, np.int32)] + [ids for ids, _ in pieces[:last]]).astype(np.int32)


def _ids(values) -> np.ndarray:
  return np.asarray(values, np.int32).reshape(-1)


def _bos(tok) -> list[int]:
  return [] if tok.bos_id is None else [tok.bos_id]


def _pieces(example, tok, template) -> list[tuple[np.ndarray, bool]]:
  """The example as (ids, trained) pieces, in order."""
  check_example(example)
  if "messages" not in example:
    return [(_ids(_bos(tok) + tok.encode(example["prompt"])), False),
            (_ids(tok.encode(example["completion"]) + [tok.eos_id]), True)]
  if template is None:
    return _project_pieces(example["messages"], tok)
  return _jinja_pieces(example["messages"], tok, template)


def _project_pieces(messages, tok) -> list[tuple[np.ndarray, bool]]:
  pieces = [(_ids(_bos(tok)), False)]
  for m in messages:
    if m["role"] == "assistant":
      pieces += [(_ids(tok.encode("assistant: ")), False),
                 (_ids(tok.encode(m["content"]) + [tok.eos_id]), True)]
    else:
      pieces.append((_ids(tok.encode(f"{m['role']}: {m['content']}\n")), False))
  return pieces


def _jinja_pieces(messages, tok, template) -> list[tuple[np.ndarray, bool]]:
  special = hasattr(tok, "encode_with_special_tokens")
  encode = tok.encode_with_special_tokens if special else tok.encode
  names = {"bos_token": "", "eos_token": ""}
  if special:
    for key, i in (("bos_token", tok.bos_id), ("eos_token", tok.eos_id)):
      names[key] = (tok.id_to_token(i) or "") if i is not None else ""
  render = functools.partial(_render, template, **names)

  pieces = [] if special else [(_ids(_bos(tok)), False)]
  done = ""  # text covered by `pieces`

  def take(text, trained):
    nonlocal done
    if not text.startswith(done):
      raise ValueError("the chat template does not render each conversation prefix as a prefix of the "
                       "next, so the loss mask cannot be derived from it")
    ids = encode(text[len(done):])
    if trained and (not ids or ids[-1] != tok.eos_id):
      ids = ids + [tok.eos_id]
    pieces.append((_ids(ids), trained))
    done = text

  for i, m in enumerate(messages):
    if m["role"] == "assistant":
      take(render(messages[:i], add_generation_prompt=True), False)
      take(render(messages[:i + 1], add_generation_prompt=False), True)
  take(render(messages, add_generation_prompt=False), False)
  return pieces


def _render(template: str, messages, **variables) -> str:
  import jinja2  # pylint: disable=g-import-not-at-top
  try:
    return _compile(template).render(messages=messages, **variables)
  except jinja2.TemplateError as e:
    raise ValueError(f"chat template error: {e}") from e


@functools.lru_cache(maxsize=8)
def _compile(template: str):
  """The template compiled as transformers compiles chat templates."""
  import jinja2  # pylint: disable=g-import-not-at-top
  from jinja2 import ext, sandbox  # pylint: disable=g-import-not-at-top

  def raise_exception(message):
    raise jinja2.TemplateError(message)

  def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

  env = sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                              extensions=[ext.loopcontrols])
  env.filters["tojson"] = tojson
  env.globals["raise_exception"] = raise_exception
  env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
  try:
    return env.from_string(template)
  except jinja2.TemplateError as e:
    raise ValueError(f"chat template does not compile: {e}") from e
