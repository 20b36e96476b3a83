"""The built-in tasks: :mod:`.base` holds the base types; each other module defines its task
class(es) and a ``TASKS`` table (name -> factory) that :mod:`umm.eval.task`, the registry, reads."""
