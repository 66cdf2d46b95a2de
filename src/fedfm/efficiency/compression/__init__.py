"""Update compression: lossy per-tensor codecs that chain (``CompressionChain``), error
feedback, and the client / server wrappers that put them around any delta-based algorithm."""

from fedfm.efficiency.compression import qsgd, quantize, sparsify  # noqa: F401
from fedfm.efficiency.compression.base import CompressionChain, Compressor, build_chain
from fedfm.efficiency.compression.transform import (
    CompressedClient,
    CompressedServer,
    compress_algorithm,
    decode_state,
    encode_state,
    encoded_spec,
)

__all__ = ["CompressedClient", "CompressedServer", "CompressionChain", "Compressor",
           "build_chain", "compress_algorithm", "decode_state", "encode_state", "encoded_spec"]
