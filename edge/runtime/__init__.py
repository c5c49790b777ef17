"""The data plane: llama-cpp-python in supervised worker processes."""
