"""What a node and the coordinator share on the network.

- :mod:`umm.net.keys`: RSA key pair = libp2p identity (peer id) and record-signing key.
- :mod:`umm.net.records`: DHT keys, record schemas, validators, announce/read, :class:`Refresher`.
- :mod:`umm.net.dht`: start a hivemind DHT with those validators.
- :mod:`umm.net.store`: content-addressed model store (``models/<manifest hash>/``).
- :mod:`umm.net.server`: gRPC checkpoint service serving models from a store or folders.
- :mod:`umm.net.transfer`: resumable, hash-checked, multi-provider download into a store.
- :mod:`umm.net.wire`: the hand-written ``FileChunk`` codec (saves a copy of every byte sent/received).
- :mod:`umm.net.proto`: generated protobuf code (``python -m umm.net.protogen``).

Submodules are imported explicitly; importing ``umm.net`` itself loads neither hivemind nor grpc.
"""
