"""The PersonaPlex client: the processor, its session opening and wire format, the Opus uplink
encoder, Ogg pages both ways, and the pool that gives each call an engine of its own."""
