"""Reading VMX text takes no regular expression (the agent reads its config before re is
loaded); the hand-written reader must read every line as the patterns it replaced."""
from __future__ import annotations

import re

from hypothesis import given, settings
from hypothesis import strategies as st

from extraconfig.transport import (_KEY_ESCAPED, _split_line, format_vmx, parse_vmx,
                                   vmx_unescape, vmx_unescape_key)

# The patterns extraconfig/transport.py used before.
LINE = re.compile(r'[ \t]*([^ \t="]+)[ \t]*=[ \t]*"(.*)"[ \t]*\Z', re.DOTALL)
UNESCAPE_BYTES = re.compile(rb"\|([0-9A-Fa-f]{2})")

# Lines made mostly of the characters that matter to the pattern.
line_text = st.text(alphabet=st.sampled_from(list(' \t\x0b\x0c="|#ab7C\r\x00\u2603')),
                    max_size=24)


@settings(max_examples=3000, deadline=None)
@given(line_text)
def test_a_line_splits_as_the_pattern_split_it(line):
    m = LINE.match(line)
    assert _split_line(line) == (m.groups() if m else None)


@settings(max_examples=3000, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("|0123456789aAfFgG\u2603x")), max_size=20))
def test_escapes_are_undone_as_the_pattern_undid_them(text):
    raw = text.encode("utf-8", errors="surrogateescape")
    value = UNESCAPE_BYTES.sub(lambda m: bytes([int(m.group(1), 16)]), raw)
    key = UNESCAPE_BYTES.sub(
        lambda m: bytes([int(m.group(1), 16)]) if int(m.group(1), 16) in _KEY_ESCAPED
        else m.group(), raw)
    assert vmx_unescape(text) == value.decode("utf-8", errors="surrogateescape")
    assert vmx_unescape_key(text) == key.decode("utf-8", errors="surrogateescape")


@settings(max_examples=500, deadline=None)
@given(st.dictionaries(st.text(min_size=1, max_size=12), st.text(max_size=12), max_size=5))
def test_what_is_written_reads_back(entries):
    assert parse_vmx(format_vmx(entries)) == entries


def test_lines_of_a_file():
    text = ('# a comment\n\n  guestinfo.vice./common/id = "abc"  \r\n'
            'guestinfo.vice./sessions|x/cmd/Args~ = "a|7Cb|22c"\n')
    assert parse_vmx(text) == {"guestinfo.vice./common/id": "abc",
                               "guestinfo.vice./sessions|x/cmd/Args~": 'a|b"c'}
