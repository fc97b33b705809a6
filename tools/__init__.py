"""Workstation tools (never deployed): the operator CLI and the preflight command line."""
