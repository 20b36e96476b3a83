"""umm-coordinator: discovers experts, verifies and ranks them, merges and publishes."""
