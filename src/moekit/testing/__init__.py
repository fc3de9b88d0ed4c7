"""Helpers for moekit's tests and for anyone testing a new implementation against the oracle."""

from moekit.testing.numerics import ROUNDED_ONCE_TOLERANCE, TOLERANCE, assert_close_to_reference, relative_error

__all__ = ["ROUNDED_ONCE_TOLERANCE", "TOLERANCE", "assert_close_to_reference", "relative_error"]
