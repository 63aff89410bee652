"""kmodguard: find devices whose driver is in a kernel module package that is not installed."""

__version__ = "0.1.0"
