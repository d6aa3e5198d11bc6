"""Generated stubs for the `bagel.*` protobuf packages (not the `bagel` model package)."""
