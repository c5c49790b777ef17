"""Off-device pipeline: Slips data -> fine-tune -> GGUF export -> evaluation -> signed publish."""
