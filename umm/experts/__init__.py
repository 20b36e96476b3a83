"""Small real models made locally: random Llama checkpoints (tests, benches) and the tiny
trained expert suite (demos, end-to-end tests). No model hub is needed.

The suite (``umm experts prepare``): ``suites`` (synthetic domains: math, code, list; the
contract with ``umm.eval``), ``tokenizers`` (byte-level BPE and metaspace BPE), ``train`` (the
deterministic training loop), ``recipes`` (sizes, steps, learning rates: ``full`` / ``small``),
``build`` (cached, atomic build and loading: :func:`umm.experts.build.ensure_suite`,
:func:`umm.experts.build.load_suite`), ``instruction_data`` (fusion JSONL from the train split).
"""
