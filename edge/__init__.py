"""The Raspberry Pi daemon: model delivery, verification, hot swap and inference serving."""
