"""Small real models made locally: random Llama checkpoints (tests, benches) and the tiny
trained expert suite (demos, end-to-end tests). No model hub is needed.

The suite (``umm experts prepare``) is trained on the synthetic domains of :mod:`umm.eval.suites`
(math, code, list: the evaluator owns them, so ``umm.eval`` never imports this package), with
``tokenizers`` (byte-level BPE and metaspace BPE: umm's one tiny-tokenizer builder), ``train``
(prompt/target pairs and their loss on :mod:`umm.training`'s deterministic loop), ``recipes`` (sizes, steps, learning rates: ``full`` / ``small``),
``build`` (cached, atomic build and loading: :func:`umm.experts.build.ensure_suite`,
:func:`umm.experts.build.load_suite`), ``instruction_data`` (fusion JSONL from the train split).
"""
