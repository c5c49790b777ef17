"""The local HTTP API Slips talks to: OpenAI- and Ollama-compatible."""
