"""Cadence: rules-driven touch cadences for sales teams."""

__version__ = "0.1.0"
