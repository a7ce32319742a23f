"""rapidin-index: token-wise influential training data retrieval (RapidIn) as a vector index."""

__version__ = "0.1.0"
