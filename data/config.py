"""The data part of a run config: which dataset, where TFDS builds it, which tokenizer."""

import ml_collections


def default_data_config() -> ml_collections.ConfigDict:
  """The embedded corpus (Python's own standard library) with the byte tokenizer: needs no download."""
  c = ml_collections.ConfigDict()
  # python_stdlib (embedded, offline) | text_files | sft_jsonl (your files) | arithmetic[/d3] (generated problems)
  c.dataset = "python_stdlib"
  c.data_dir = ""  # where TFDS builds datasets; "" = ~/.cache/deepseek_jax/tfds
  c.text_files = ""  # glob or directory of .txt/.jsonl files for dataset=text_files
  c.sft_files = ""  # dataset=sft_jsonl: comma-separated glob(s) of prompt/completion or messages JSONL
  c.sft_eval_files = ""  # sft_jsonl validation glob(s); "" = a deterministic ~5 % held out of sft_files
  c.prompt_files = ""  # grpo/distill prompts: comma-separated glob(s) of {"prompt", "answer"} JSONL ("" = arithmetic)
  c.prompt_eval_files = ""  # their held-out glob(s); "" = a deterministic ~5 % of prompt_files
  c.prompt_template = "{prompt}"  # how a prompt is shown to the model (grpo, distill, eval.py's tasks)
  c.chat_template = ""  # "" = the hf tokenizer's own if it has one, else "project"; or jinja2 text/file
  c.tokenizer = "byte"  # byte | sentencepiece | hf
  c.tokenizer_path = ""  # .model file (sentencepiece) or tokenizer.json / its directory (hf)
  c.shuffle = True  # shuffle documents (seeded; a new order every epoch)
  c.worker_count = 0  # grain worker processes; 0 = in the calling process
  return c
