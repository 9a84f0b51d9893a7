"""alambic: distil a large language model into a smaller, faster one."""

__version__ = "0.1.0"
