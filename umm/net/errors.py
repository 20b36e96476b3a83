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
    """A model could not be downloaded; the message names the providers and files that failed.

    ``permanent``: the model itself is at fault (trying again cannot help: the coordinator rejects
    it); otherwise the providers were unreachable, slow or interrupted and a later try may work.
    ``what``: a few words saying what went wrong, for a verdict's reason. Callers classify by
    these class attributes (or ``isinstance``), never by the message text.
    """

    permanent: bool = False
    what: str = "download failed"


class NoProvider(TransferError):
    """Nobody announces the model: there is no address to download it from."""

    what = "no provider"


class ManifestUnavailable(TransferError):
    """No provider answered with the manifest (unreachable, not serving it, or every one dropped)."""

    what = "manifest unavailable"


class ProvidersExhausted(TransferError):
    """A file failed on every usable provider as often as allowed (broken streams, stalls, slowness)."""

    what = "providers failed"


class AllProvidersDropped(TransferError):
    """Every provider was dropped for misbehaving (too slow, malformed chunks, ...) before a file arrived."""

    what = "every provider was dropped"


class TransferCancelled(TransferError):
    """The caller cancelled the download; its partial files are kept."""

    what = "cancelled"


class SizeLimitError(TransferError):
    """A model is larger than the size limit of the download."""

    permanent = True
    what = "too large"


class ManifestHashError(TransferError):
    """A provider sent a manifest whose bytes do not hash to the requested manifest hash."""

    permanent = True
    what = "manifest does not match its hash"


class InvalidManifest(TransferError):
    """The manifest hashes to the requested name but is not a valid manifest in canonical form."""

    permanent = True
    what = "invalid manifest"


class HashMismatch(AllProvidersDropped):
    """Every provider was dropped and at least one served bytes that do not match the manifest sha256."""

    permanent = True
    what = "served bytes do not match the manifest"


class AddressError(NetError):
    """A peer address is malformed, not host:port over TCP, or in a range that may not be dialled."""


class DHTUnavailableError(NetError):
    """The DHT process did not answer a call within its time limit, or is not running."""
