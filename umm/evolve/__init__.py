"""Layer-wise evolutionary merging: CMA-ES (or random search) over the merge genome.

- :mod:`umm.evolve.config`: the ``umm evolve`` config (frozen; unknown keys are errors).
- :mod:`umm.evolve.transform`: bounded genome values <-> the unbounded search space.
- :mod:`umm.evolve.apply`: candidates applied in place to a live model (no disk, no reload).
- :mod:`umm.evolve.search`: the ask/tell loop, budget accounting, replay for resume.
- :mod:`umm.evolve.state`: the per-generation JSON state (never pickle).
- :mod:`umm.evolve.report`: history, plots and the final test-split table.
- :mod:`umm.evolve.run`: the pipeline behind ``umm evolve``.
"""
