"""Test helpers importable from any test (tests/support is on pytest's `pythonpath`)."""
