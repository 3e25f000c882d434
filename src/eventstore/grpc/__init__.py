"""The gRPC layer: purerpc transport, request decoding, and the domain → status seam."""
