"""Worked examples built on the product packages; run from the repository root as modules."""
