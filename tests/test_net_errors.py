"""Transfer errors are typed: the coordinator classifies a failed fetch by the error's class, never its text."""

from __future__ import annotations

import pytest

from coordinator.round import classify_transfer_error
from umm.net import errors

REJECTED = [errors.SizeLimitError, errors.ManifestHashError, errors.InvalidManifest, errors.HashMismatch]
RETRIED = [errors.TransferError, errors.NoProvider, errors.ManifestUnavailable, errors.ProvidersExhausted,
           errors.AllProvidersDropped, errors.TransferCancelled]
# what the old text search keyed on, and plain rewordings
MESSAGES = [
    "download of model x failed: file a: every provider was dropped\n  provider p: a: bytes do not match the manifest sha256",
    "model x has an invalid manifest: not in canonical form",
    "model x is 2 MB, over the limit",
    "something else entirely\n  provider p: UNAVAILABLE",
    "",
]


def test_every_transfer_error_is_classified():
    def leaves(cls):
        subs = cls.__subclasses__()
        return {cls} | {c for s in subs for c in leaves(s)}

    assert leaves(errors.TransferError) == set(REJECTED) | set(RETRIED)


@pytest.mark.parametrize("cls", REJECTED)
def test_errors_of_the_model_itself_reject_it(cls):
    assert cls.permanent
    status, reason = classify_transfer_error(cls("download of model x failed\n  provider p: why\n  provider q: why"))
    assert status == "rejected" and reason == f"{cls.what}: download of model x failed | provider p: why | provider q: why"


@pytest.mark.parametrize("cls", RETRIED)
def test_errors_of_the_providers_are_retried(cls):
    assert not cls.permanent
    assert classify_transfer_error(cls("download of model x failed\n  provider p: UNAVAILABLE")) == \
        ("failed", "download of model x failed | provider p: UNAVAILABLE")


@pytest.mark.parametrize("cls", REJECTED + RETRIED)
@pytest.mark.parametrize("message", MESSAGES)
def test_rewording_a_message_does_not_change_the_classification(cls, message):
    expected = "rejected" if cls.permanent else "failed"
    assert classify_transfer_error(cls(message))[0] == expected


@pytest.mark.parametrize("message", MESSAGES)
def test_errors_that_are_not_transfer_errors_are_retried(message):
    assert classify_transfer_error(OSError(message))[0] == "failed"
    assert classify_transfer_error(errors.StoreError(message))[0] == "failed"
