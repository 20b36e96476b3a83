"""The built-in tasks: each module defines its task class(es) and a ``register()`` function."""
