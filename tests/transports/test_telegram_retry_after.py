"""Telegram's flood-control wait is read through PTB's public attribute, in both of its forms."""
# PTB's own RetryAfter constructor reads the attribute and warns about its migration; only our read is checked.

from __future__ import annotations

import warnings
from datetime import timedelta

import pytest
from telegram.error import RetryAfter

from bot.transports.telegram_chat import retry_after_seconds


@pytest.mark.filterwarnings("ignore::telegram.warnings.PTBDeprecationWarning")
def test_the_wait_is_read_from_the_public_attribute_as_int_or_timedelta() -> None:
    as_int, as_delta = RetryAfter(3), RetryAfter(timedelta(seconds=2.5))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # reading it must not warn (PTB's int -> timedelta migration)
        assert retry_after_seconds(as_int) == 3.0
        assert retry_after_seconds(as_delta) == 2.5


@pytest.mark.filterwarnings("ignore::telegram.warnings.PTBDeprecationWarning")
def test_a_zero_wait_still_pauses_a_moment() -> None:
    assert retry_after_seconds(RetryAfter(0)) == 1.0
