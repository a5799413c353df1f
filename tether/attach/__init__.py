"""Attach and control: the msgpack protocol (sans-IO), its server, transports and client."""
