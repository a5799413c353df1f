"""VIC's attach, as the port layer drives it: a serial sync handshake, then SSH-2.

`handshake` and `wire` are sans-IO (bytes in, bytes out); `aiobridge` runs asyncio on the
agent's own loop; `server` serves lines and sockets with asyncssh; `client` is the
`tether attach --vic` side. Only `server` and `client` import the SSH library, and only
when they run (docs/attach-protocol.md, "VIC attach").
"""
