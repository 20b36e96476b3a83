"""Former home of the streaming executor; re-exports the names other parts still import here.

The executor is split by concern: :mod:`umm.merge.dtypes` (dtype names),
:mod:`umm.merge.inputs` (opening and checking the models), :mod:`umm.merge.plan` (jobs),
:mod:`umm.merge.schedule` (the memory-budgeted thread pool), :mod:`umm.merge.run` (running the
jobs into a sink; the in-memory merge) and :mod:`umm.merge.disk` (the merge to a folder).
Import from those; this module goes once ``umm.evolve`` and its tests do.
"""

from umm.merge.disk import merge
from umm.merge.inputs import open_inputs
from umm.merge.run import merge_state_dict

__all__ = ["merge", "merge_state_dict", "open_inputs"]
