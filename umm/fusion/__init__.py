"""Distribution fusion of heterogeneous LLMs into a pivot model (FuseLLM-style, sparse and resumable).

Modules: :mod:`~umm.fusion.data` (instruction-response JSONL, tokenisation), :mod:`~umm.fusion.teacher`
(top-k teacher pass to safetensors shards), :mod:`~umm.fusion.align` (token and vocabulary
alignment), :mod:`~umm.fusion.fuse` (MinCE / AvgCE), :mod:`~umm.fusion.loss` (sparse distillation
loss), :mod:`~umm.fusion.targets` (fused targets), :mod:`~umm.fusion.train` (training the pivot),
:mod:`~umm.fusion.pivot` (pivot choice), :mod:`~umm.fusion.tiny` (a tiny GPT-NeoX with a ``▁``-BPE
tokenizer for tests and demos). Import from the submodules; this package imports nothing
heavy.
"""
