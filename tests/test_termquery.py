"""Terminal queries taken out of replayed output (tether/attach/termquery.py)."""
from __future__ import annotations

import pytest

from tether.attach.termquery import QueryFilter

# What vim.tiny writes at start and quit with TERM=xterm (queries among the drawing),
# and sequences that look alike but are no queries.
VIM = (b"\x1b[?1049h\x1b[22;0;0t\x1b[1;24r\x1b[?12h\x1b[?12l\x1b[22;2t\x1b[22;1t"
       b"\x1b[27m\x1b[23m\x1b[29m\x1b[m\x1b[H\x1b[2J\x1b[6n\x1bPzz\x1b\\\x1b[?25l"
       b"\x1b[1;1H~\r\n~\r\n\x1b[>c\x1b]10;?\x07\x1b]11;?\x07\x1b[?25h")
KEPT = (b"\x1b[?1049h\x1b[22;0;0t\x1b[1;24r\x1b[?12h\x1b[?12l\x1b[22;2t\x1b[22;1t"
        b"\x1b[27m\x1b[23m\x1b[29m\x1b[m\x1b[H\x1b[2J\x1bPzz\x1b\\\x1b[?25l"
        b"\x1b[1;1H~\r\n~\r\n\x1b[?25h")


def test_vim_queries_removed_drawing_kept():
    f = QueryFilter()
    assert f.feed(VIM) + f.flush() == KEPT
    assert f.removed == 4


@pytest.mark.parametrize("query", [
    b"\x05", b"\x1bZ", b"\x1b[c", b"\x1b[0c", b"\x1b[>c", b"\x1b[>0c", b"\x1b[=c",
    b"\x1b[5n", b"\x1b[6n", b"\x1b[?6n", b"\x1b[?996n", b"\x1b[?2026$p", b"\x1b[4$p",
    b"\x1b[x", b"\x1b[1x", b"\x1b[>q", b"\x1b[>0q", b"\x1b[?u", b"\x1b[?4m", b"\x1b[?1;1S",
    b"\x1b[14t", b"\x1b[18t", b"\x1b[21t", b"\x1b[1$w", b"\x1b[1$u", b"\x1b[1;1;1;1;1;1*y",
    b"\x1b]4;1;?\x07", b"\x1b]11;?\x1b\\", b"\x1b]52;c;?\x07", b"\x1bP$qm\x1b\\",
    b"\x1bP+q544e\x1b\\",
])
def test_queries_are_removed(query):
    f = QueryFilter()
    assert f.feed(b"a" + query + b"b") + f.flush() == b"ab"


@pytest.mark.parametrize("kept", [
    b"\x1b[?1;2c",                 # the Linux console's cursor shape, not a query
    b"\x1b[>4;2m", b"\x1b[>1n",    # xterm modifyOtherKeys settings
    b"\x1b[8;24;80t",              # resize, not a report
    b"\x1b]0;title\x07", b"\x1b]8;;http://x?y=1\x1b\\",   # titles and links with a ?
    b"\x1bPq#0;2;0;0;0#0!10~\x1b\\",                     # sixel graphics
    b"\x1b(B", b"\x1b7\x1b8", b"\x1b[31mred\x1b[0m", "é€".encode(),
])
def test_look_alikes_are_kept(kept):
    f = QueryFilter()
    assert f.feed(kept) + f.flush() == kept


def test_a_query_cut_between_chunks_is_still_removed():
    for cut in range(len(VIM) + 1):
        f = QueryFilter()
        assert f.feed(VIM[:cut]) + f.feed(VIM[cut:]) + f.flush() == KEPT, cut


def test_an_unterminated_string_is_let_through_past_the_bound():
    f = QueryFilter()
    long = b"\x1b]0;" + b"x" * 10000
    assert f.feed(long) == long
