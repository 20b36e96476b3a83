"""umm: unconstrained model merging.

The library: checkpoints (read, fingerprint, hash, write Hugging Face model folders), merge
(pure tensor methods, layer-wise parameters, streaming executor), evolve (CMA-ES search), fusion
(distribution fusion of heterogeneous models), eval (tasks, generation, sandboxed code
execution), experts (tiny trainable experts for tests and demos) and net (DHT records and gRPC
transfer shared by ``node/`` and ``coordinator/``). It never imports those two applications.
"""

__version__ = "0.1.0"
