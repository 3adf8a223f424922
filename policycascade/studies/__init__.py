"""Runnable studies that measure the project's methods on trained runs."""
