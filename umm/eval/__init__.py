"""Evaluation: tasks (data + prompt + generation settings + answer extraction + scorer),
batched generation, sandboxed code execution and scores with confidence intervals."""
