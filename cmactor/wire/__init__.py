"""What all three processes share: framing, message kinds, request checks, shared-memory figures, a wake-up."""
