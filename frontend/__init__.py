"""mmserve's stateless API tier, and the in-process Python API."""
