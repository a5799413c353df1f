"""The VMware backdoor's numbers, and the register set one backdoor call carries.

Layout of a call (open-vm-tools `backdoor_def.h`, `guest_msg_def.h`):
eax = magic, ecx = (subcommand << 16) | command, edx = (channel id << 16) | port,
ebx = the argument; esi/edi carry the channel cookie on the low-bandwidth port.
On the high-bandwidth port (`rep outsb`/`rep insb`) ecx is the byte count, esi or edi
points at the guest buffer, and the cookie moves to ebp and the other of esi/edi.
Status comes back in the high half of ecx (low bandwidth) or of ebx (high bandwidth).
"""

from __future__ import annotations

MAGIC = 0x564D5868
PORT = 0x5658            # low bandwidth: one `inl`, 4 bytes at most per call
HB_PORT = 0x5659         # high bandwidth: `rep outsb` / `rep insb`, whole messages

CMD_GETVERSION = 0x0A
CMD_MESSAGE = 0x1E
HB_CMD_MESSAGE = 0x00

# Message subcommands, in the order a message exchange uses them.
MSG_OPEN = 0
MSG_SENDSIZE = 1
MSG_SENDPAYLOAD = 2
MSG_RECVSIZE = 3
MSG_RECVPAYLOAD = 4
MSG_RECVSTATUS = 5
MSG_CLOSE = 6

# Status bits, in the high 16 bits of ecx (or ebx on the high-bandwidth port).
STATUS_SUCCESS = 0x0001
STATUS_DORECV = 0x0002     # a message is waiting for the guest
STATUS_CPT = 0x0010        # a checkpoint interrupted the operation: retry it whole
STATUS_HB = 0x0080         # the high-bandwidth port may carry this message

PROTO_RPCI = 0x49435052    # 'RPCI': guest -> host requests (info-get, info-set, ...)
PROTO_TCLO = 0x4F4C4354    # 'TCLO': host -> guest commands, polled by the guest
FLAG_COOKIE = 0x80000000   # ask for a cookie on open; older hosts refuse, then retry without

MASK32 = 0xFFFFFFFF


class Regs(tuple):
    """The registers of one backdoor call, each an unsigned 32-bit int: a named tuple,
    written out because typing.NamedTuple (typing, re, enum...) would cost PID 1's boot
    more than the whole probe."""
    __slots__ = ()
    _fields = ("eax", "ebx", "ecx", "edx", "esi", "edi", "ebp")

    def __new__(cls, eax: int = 0, ebx: int = 0, ecx: int = 0, edx: int = 0, esi: int = 0,
                edi: int = 0, ebp: int = 0) -> "Regs":
        return tuple.__new__(cls, (eax, ebx, ecx, edx, esi, edi, ebp))

    def __getnewargs__(self) -> tuple:
        return tuple(self)

    def _replace(self, **changes: int) -> "Regs":
        return Regs(**dict(zip(self._fields, self), **changes))

    def __repr__(self) -> str:
        return "Regs(" + ", ".join(f"{n}={v!r}" for n, v in zip(self._fields, self)) + ")"

    eax = property(lambda self: self[0])
    ebx = property(lambda self: self[1])
    ecx = property(lambda self: self[2])
    edx = property(lambda self: self[3])
    esi = property(lambda self: self[4])
    edi = property(lambda self: self[5])
    ebp = property(lambda self: self[6])


class Ports:
    """The port-I/O layer: what the CPU (or a simulated hypervisor) does with one call;
    an interface, described here (NativePorts, SocketPorts, SimulatedHypervisor have it).

    `backdoor` is `inl` on the port in dx; `hb_out` is `rep outsb` of `data` (ecx and esi
    are set by the layer); `hb_in` is `rep insb` of `size` bytes (ecx and edi likewise).
    """

    def backdoor(self, regs: Regs) -> Regs: ...

    def hb_out(self, regs: Regs, data: bytes) -> Regs: ...

    def hb_in(self, regs: Regs, size: int) -> tuple[Regs, bytes]: ...


def high(word: int) -> int:
    return (word >> 16) & 0xFFFF


def low(word: int) -> int:
    return word & 0xFFFF


def pack(hi: int, lo: int) -> int:
    return ((hi & 0xFFFF) << 16) | (lo & 0xFFFF)
