"""The top layer: one rank's run (runner, stages), text and image encoding, the decode, outputs, metrics, the
sweep summary and the host settings the entry point applies."""
