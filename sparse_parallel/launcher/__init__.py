"""Command line and job submission."""
