"""What a node and the coordinator share on the network.

- :mod:`umm.net.keys`: RSA key pair = libp2p identity (peer id) and record-signing key.
- :mod:`umm.net.records`: DHT keys, record schemas, validators, announce/read, :class:`Refresher`.
- :mod:`umm.net.dht`: start a hivemind DHT with those validators.
- :mod:`umm.net.store`: content-addressed model store (``models/<manifest hash>/``).
- :mod:`umm.net.server`: gRPC checkpoint service serving models from a store or folders.
- :mod:`umm.net.transfer`: resumable, hash-checked, multi-provider download into a store.
- :mod:`umm.net.wire`: the hand-written ``FileChunk`` codec (saves a copy of every byte sent/received).
- :mod:`umm.net.proto`: generated protobuf code (``python -m umm.net.protogen``).
- :mod:`umm.net.status`: the one client of a coordinator's status service.
- :mod:`umm.net.ready`: the ready-file a started node or coordinator writes for its launcher.
- :mod:`umm.net.local`: ``umm net local``, a whole network of node and coordinator processes on 127.0.0.1.

Submodules are imported explicitly; importing ``umm.net`` itself loads neither hivemind nor grpc.
"""
