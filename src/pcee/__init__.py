"""pcee: Performance Control Early Exiting, from research to production."""

__version__ = "0.1.0"
