"""credless: node-local credential injection agent."""

__version__ = "0.1.0"
