"""signcomm: data-parallel training that sends signs instead of floats."""
__version__ = "0.1.0"
