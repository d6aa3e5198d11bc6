"""The published checkpoint files: loading them into `bagel.network`'s modules, checking a
directory for completeness from the headers alone (`python -m bagel.checkpoints.check_checkpoint`),
and what a checkpoint says about itself (`model_info.json`)."""
