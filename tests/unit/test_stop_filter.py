"""Stop sequences left out of the returned text, whole and streamed."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.openai.stop_filter import StopFilter, cut_at_stop


def _stream(text, stops, size):
    f = StopFilter(stops)
    pieces = [f.feed(text[i:i + size]) for i in range(0, len(text), size)]
    pieces.append(f.finish())
    return pieces, f


def test_the_issues_example():
    assert cut_at_stop("1. 1, 2, 3", ["3"]) == ("1. 1, 2, ", "3")
    pieces, f = _stream("1. 1, 2, 3", ["3"], 1)
    assert "".join(pieces) == "1. 1, 2, " and f.matched == "3"


def test_holds_back_only_a_possible_start():
    f = StopFilter(["</end>"])
    assert f.feed("a < b </e") == "a < b "
    assert f.feed("lse") == "</else"
    assert f.feed("</end> more") == ""
    assert f.stopped and f.feed("x") == "" and f.finish() == ""


def test_no_stop_releases_everything_at_the_end():
    f = StopFilter(["STOP"])
    assert f.feed("xST") == "x"
    assert f.finish() == "ST"


def test_the_stop_that_completes_first_wins():
    # The engine stops as soon as one sequence is complete, as vLLM does.
    assert cut_at_stop("abcx", ["abcd", "bc"]) == ("a", "bc")
    assert cut_at_stop("a\na", ["\n", "a\na"]) == ("a", "\n")
    assert cut_at_stop("xab", ["ab", "xab"]) == ("", "xab")
    pieces, f = _stream("abcx", ["abcd", "bc"], 1)
    assert "".join(pieces) == "a" and f.matched == "bc"


def test_no_stops_passes_through():
    f = StopFilter(["", ""])
    assert f.feed("abc") == "abc" and f.finish() == ""


@given(st.text(alphabet="ab\n", max_size=30),
       st.lists(st.text(alphabet="ab\n", min_size=1, max_size=4), min_size=1, max_size=4),
       st.integers(1, 5))
def test_streamed_equals_whole(text, stops, size):
    pieces, f = _stream(text, stops, size)
    whole, matched = cut_at_stop(text, stops)
    assert "".join(pieces) == whole
    assert (f.matched is None) == (matched is None)


@pytest.mark.parametrize("size", [1, 2, 3])
def test_unicode_stops(size):
    pieces, _ = _stream("température: 20°C. Fin", ["°C"], size)
    assert "".join(pieces) == "température: 20"
