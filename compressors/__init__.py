"""Drop-in Horovod compressors that allreduce one bit per coordinate as count fields:

    import compressors
    opt = hvd.DistributedOptimizer(opt, named_parameters=model.named_parameters(),
                                   compression=compressors.Compression.sign)

``Compression.sign`` (signSGD-MV), ``Compression.sr`` (S_R of the raw gradient, sign of
the mean: Sto-signSGD's aggregation) and ``Compression.s1`` (S_R, S_1 of the mean: the
aggregation MVSM-v2 applies to momenta, here to raw gradients); S_R uses one R per tensor
common to all ranks (from the previous step's headers).  The classes ``SignCompressor``,
``SRCompressor``, ``S1Compressor`` and ``MajorityVoteCompressor`` take the options (R
policy, seed, tie rule, process set, wire).  Ranks with different settings raise
``RankMismatchError`` on every rank; a NaN batch raises ``NonFiniteGradientError`` from the
optimizer's ``step()`` on every rank and can be skipped.  See docs/compressors.md.
"""
from .core import (MAX_MESSAGE_WORDS, Compression, MajorityVoteCompressor, S1Compressor,
                   SignCompressor, SRCompressor, rank_key, shared_key)
from .wire import (WIRES, NonFiniteGradientError, WireError, bits_per_coordinate,
                   fields_per_word, message_words)
from signcomm.comm.base import RankMismatchError

__all__ = ["Compression", "MajorityVoteCompressor", "SignCompressor", "SRCompressor",
           "S1Compressor", "MAX_MESSAGE_WORDS", "rank_key", "shared_key",
           "NonFiniteGradientError", "RankMismatchError", "WireError",
           "bits_per_coordinate", "fields_per_word", "message_words", "WIRES"]
