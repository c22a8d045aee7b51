"""Input pipeline: tfds datasets and image folders, the paper's preprocessing, per-host batches.

  info = data.get_dataset_info(config)
  train_iter = data.get_train_data(config, start_step=step)   # infinite, resumable
  eval_iter = data.get_eval_data(config)                      # padded, `mask` marks real examples

The path of a batch, in reading order: `pipeline.py` (the API and the one skeleton),
`sources.py` (which source a split is), `memory.py` / `stream.py` (its records),
`folder.py` / `tfds_source.py` (reading a split), `preprocess.py` (ops by name),
`batching.py` (decoding into batch slots), `sampling.py` (the training order);
`decode_failures.py` counts the images that fail to decode in `dataset_info.json`.
"""
from vit_jax_ft.data.batching import Batch
from vit_jax_ft.data.examples import Examples
from vit_jax_ft.data.decode_failures import (earlier_decode_failures, record_decode_failures,
                                             write_dataset_info)
from vit_jax_ft.data.pipeline import DatasetInfo, get_dataset_info, get_eval_data, get_train_data
from vit_jax_ft.data.sources import class_counts, load_split, streams

__all__ = ['Batch', 'DatasetInfo', 'Examples', 'class_counts', 'earlier_decode_failures',
           'get_dataset_info', 'get_eval_data', 'get_train_data', 'load_split',
           'record_decode_failures', 'streams', 'write_dataset_info']
