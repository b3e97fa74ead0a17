"""Input pipeline (grain): document sources, tokenizers, packed and checkpointable batches.

  tokenizer = load_tokenizer(cfg.data.tokenizer)          # "bytes" or a tokenizer.json
  it = make_iterator(cfg.data, tokenizer, split="train", seq_len=T, batch_size=B_per_process,
                     seed=cfg.data.shuffle_seed, process_index=jax.process_index(),
                     process_count=jax.process_count())
  batch = next(it)   # inputs, targets, segment_ids, positions (int32), loss_mask (float32): [B, T]
  state = it.get_state(); it.set_state(state)             # JSON-serialisable

The built-in corpus (`source: builtin`) is CPython's pydoc topics: nothing is downloaded.
"""

from behemoth_jax.data.errors import DataError
from behemoth_jax.data.pipeline import (
  DataIterator,
  count_usable_documents,
  document_order,
  make_iterator,
  split_indices,
  tokenize_document,
)
from behemoth_jax.data.sources import Corpus, builtin_corpus, open_source
from behemoth_jax.data.tokenizer import (
  BOS,
  EOS,
  PAD,
  ByteTokenizer,
  HFTokenizer,
  Tokenizer,
  load_tokenizer,
)

__all__ = [
  "BOS",
  "EOS",
  "PAD",
  "ByteTokenizer",
  "Corpus",
  "DataError",
  "DataIterator",
  "HFTokenizer",
  "Tokenizer",
  "builtin_corpus",
  "count_usable_documents",
  "document_order",
  "load_tokenizer",
  "make_iterator",
  "open_source",
  "split_indices",
  "tokenize_document",
]
