"""The control plane: trust, deployments, operator commands and what the device reports."""
