"""umm-node: the contributor application (announce an expert, serve it, fetch merged models)."""
