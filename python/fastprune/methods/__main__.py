"""``python -m fastprune.methods``: the registered methods, one line each."""

from fastprune.methods.registry import table

print(table())
