"""One-bit kernels: pure array functions (NumPy/numba on CPU, CuPy on GPU), no MPI, no
torch.  The bit convention is stated once, in ``bits.py``."""
from .bits import (BITORDER, check_packed, clear_padding, pack_bits, packed_nbytes,
                   unpack_bits, unpack_signs)
from .ops import (TIE_RULES, VARIANTS, NonFiniteError, Vote, aligned_empty, count_field_bits,
                  count_field_words, majority_vote, pack_count_fields, pack_signs,
                  stochastic_sign_pack, unpack_count_fields, vote_counts, vote_from_counts,
                  vote_values, vote_values_from_counts)
from .rules import VoteRule
from .rng import (Purpose, coin_bits, key64, random_words, stream_id, tie_coin_bits,
                  uniform)
from .xp import array_module, cupy_available

__all__ = [
    "BITORDER", "check_packed", "clear_padding", "pack_bits", "packed_nbytes", "unpack_bits",
    "unpack_signs", "TIE_RULES", "VARIANTS", "NonFiniteError", "Vote", "aligned_empty",
    "count_field_bits",
    "count_field_words", "majority_vote", "pack_count_fields", "pack_signs",
    "stochastic_sign_pack", "unpack_count_fields", "vote_counts", "vote_from_counts",
    "vote_values", "vote_values_from_counts", "VoteRule",
    "Purpose", "coin_bits", "key64", "random_words", "stream_id", "tie_coin_bits", "uniform",
    "array_module", "cupy_available",
]
