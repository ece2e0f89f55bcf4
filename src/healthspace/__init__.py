"""healthspace: a trusted health data space."""

__version__ = "0.1.0"
