"""Generated protobuf/gRPC modules (do not edit): regenerate with ``python -m umm.net.protogen``."""
