"""tether: the in-guest agent (PID 1) of a container VM."""
