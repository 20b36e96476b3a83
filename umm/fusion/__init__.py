"""Distribution fusion of heterogeneous LLMs into a pivot model (FuseLLM-style, sparse and resumable).

Modules: :mod:`~umm.fusion.data` (instruction-response JSONL, tokenisation), :mod:`~umm.fusion.teacher`
(top-k teacher pass to safetensors shards), :mod:`~umm.fusion.align` (token and vocabulary
alignment), :mod:`~umm.fusion.fuse` (MinCE / AvgCE), :mod:`~umm.fusion.loss` (sparse distillation
loss), :mod:`~umm.fusion.targets` (fused targets), :mod:`~umm.fusion.train` (training the pivot),
:mod:`~umm.fusion.pivot` (pivot choice); a tiny GPT-NeoX to fuse with the Llama experts is
:func:`umm.experts.random_models.make_random_neox`. Import from the submodules; this package imports nothing
heavy.
"""
