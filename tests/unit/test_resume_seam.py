"""A stop sequence split by a resume seam (services/router/resume.py)."""

from __future__ import annotations

from services.router.resume import SeamStop


def test_a_stop_begun_before_the_seam_ends_the_chunk_where_it_ends():
    watch = SeamStop("Thought: look it up\nObs", ["\nObservation:"])
    assert watch.feed("erv") is None  # not yet whole
    assert watch.feed("ation: 42 degrees") == len("ation:")
    assert watch.done


def test_a_stop_that_lies_after_the_seam_is_the_engine_s_to_find():
    watch = SeamStop("The answer", ["STOP"])
    assert watch.feed(" is STOP") is None
    assert watch.done  # past the reach of any stop begun before the seam


def test_no_stop_or_text_that_does_not_continue_it():
    assert SeamStop("abc", []).feed("anything") is None
    watch = SeamStop("ends with Obs", ["Observation:"])
    assert watch.feed("cure") is None
    assert watch.feed("rvation:") is None  # "Obscure...": the stop never formed


def test_the_earliest_ending_stop_wins_and_one_chunk_can_finish_it():
    watch = SeamStop("x END", ["END OF", "END O"])
    assert watch.feed(" OF it") == len(" O")


def test_single_characters_cannot_span_a_seam():
    watch = SeamStop("abc", ["c"])
    assert watch.done and watch.feed("c") is None
