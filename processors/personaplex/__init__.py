"""The PersonaPlex client: the session as a sans-I/O state machine (protocol.py), the processor and the
session opening that move its bytes, the wire format, the Opus uplink encoder, Ogg pages both ways,
and the pool that gives each call an engine of its own."""
