"""Device telemetry (host sensors, serving figures) and thermal back-off."""
