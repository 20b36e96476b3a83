"""Errors of the network layer; all are :class:`umm.errors.UmmError` (clean CLI message)."""

from __future__ import annotations

from umm.errors import UmmError


class NetError(UmmError):
    """Something on the network side failed."""


class KeyFileError(NetError):
    """A key file is missing, unreadable or not an RSA key."""


class RecordError(NetError):
    """A DHT record could not be built or parsed (wrong shape, wrong schema version)."""


class StoreError(NetError):
    """The model store cannot do what was asked (bad hash, incomplete folder, missing model)."""


class ModelNotFoundError(StoreError):
    """The store holds no model with this manifest hash."""


class TransferError(NetError):
    """A model could not be downloaded; the message names the providers and files that failed."""


class SizeLimitError(TransferError):
    """A model is larger than the size limit of the download."""


class ManifestHashError(TransferError):
    """A provider sent a manifest whose bytes do not hash to the requested manifest hash."""


class AddressError(NetError):
    """A peer address is malformed, not host:port over TCP, or in a range that may not be dialled."""


class DHTUnavailableError(NetError):
    """The DHT process did not answer a call within its time limit, or is not running."""
