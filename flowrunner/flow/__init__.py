"""Loading, validating and modelling flow files."""
