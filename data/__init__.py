"""Data: TFDS builders (the embedded Python-stdlib corpus, your own text files), tokenizers, and the
grain input pipeline that tokenizes, packs and batches documents for training and evaluation.

Importing this package is cheap; the heavy modules (TFDS, grain, tokenizer libraries) load on use:

  from data import pipeline, config
  it = pipeline.make_iterator(config.default_data_config(), split="train", seq_len=256,
                              global_batch_size=16)
"""
