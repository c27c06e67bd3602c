"""The heterogeneous rank inputs of the statistics tests (shared by the test and its
multi-rank worker): rank j of n holds v_j = mean_j + scale_j * b, so the ranks differ in
mean and in scale, and for some coordinates the sign of the ranks' median differs from
the sign of their mean."""
import numpy as np

SEED = 23
M = 16          # heterogeneous coordinates per replica
M_ZERO = 8      # coordinates of the all-zero tensor (R = 0) per replica
SCALE_C = 50.0  # the third tensor is SCALE_C x the first: another R, the same E[o]


def base():
    return np.linspace(-1.0, 1.0, M) + 0.05 * np.sin(np.arange(M))


def rank_values(rank, n):
    """Rank ``rank``'s M values (float32): ranks 0..n-2 lean positive with growing mean
    and scale, the last rank is a negative outlier with a large scale, so the mean and
    the median of the ranks disagree in sign on some coordinates (n >= 3)."""
    if n == 1:
        return (0.15 + 0.4 * base()).astype(np.float32)
    last = rank == n - 1
    mean = -0.35 if last else 0.1 + 0.2 * rank / (n - 1)
    scale = 2.0 if last else 0.3 + 0.4 * rank / (n - 1)
    return (mean + scale * base()).astype(np.float32)
