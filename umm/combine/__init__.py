"""``umm combine``: the two-stage merge of experts of several families, offline.

- :mod:`umm.combine.config`: the ``umm combine`` config (and the settings a coordinator carries).
- :mod:`umm.combine.plan`: which models are fused pairwise into the pivot, which are merged (pure).
- :mod:`umm.combine.decision`: publish only a merged model that beats the best source and the
  previous one (paired bootstrap on the test items).
- :mod:`umm.combine.run`: the pipeline (check, pivot, fusion stage, evolve stage, comparison,
  decision, model card), each stage resumable.
"""
