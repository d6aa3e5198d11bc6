"""Generated stubs for protobuf package `bagel.v1`; regenerate with `python protos/generate.py`."""
