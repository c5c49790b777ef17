"""Real services for tests: mosquitto, an HTTP artifact server with fault injection, PKI, GGUF models."""
