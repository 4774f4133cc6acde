"""Test helpers shipped with the package (importable from spawned ranks)."""
