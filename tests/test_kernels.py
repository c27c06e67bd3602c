"""Property tests of the one-bit kernels (issue 2) against naive references written here.

The references are deliberately plain: Python loops over bits and ranks, NumPy's
unpackbits, and SplitMix64 on Python ints.  Hypothesis runs derandomized (fixed seeds), so
nothing here is flaky; the statistical tests state their bounds (5 standard deviations
plus one count of slack) and, being seeded, either always pass or always fail.
"""
from __future__ import annotations

import math

import numba
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from signcomm import kernels as K
from signcomm.kernels import _cpu, reference, rng

PROPS = settings(derandomize=True, deadline=None, max_examples=25,
                 suppress_health_check=[HealthCheck.too_slow])
FEW = settings(PROPS, max_examples=6)

SIZES = [0, 1, 7, 8, 9, 63, 64, 65, 1_000_003]
NS = [1, 2, 3, 4, 5, 8, 9, 16, 17, 127]
# d values that reach every code path of the numba kernels: empty, sub-byte, one word,
# several vote blocks (512 words = 32768 coordinates each) plus a partial word and byte.
VOTE_SIZES = [0, 1, 7, 8, 9, 63, 64, 65, 127, 200, 4099, 70_001]

# ---------------------------------------------------------------------------------------
# naive references

M64 = (1 << 64) - 1


def naive_splitmix64(z):
    """SplitMix64's finaliser (Steele, Lea, Flood 2014), on Python ints."""
    z &= M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def naive_word(key, pos):
    """rng.py's contract: the word at `pos` is splitmix64(key + (pos + 1) * golden)."""
    return naive_splitmix64(key + (pos + 1) * 0x9E3779B97F4A7C15)


def naive_coin(key, pos):
    """The zero coin of sign(): the top bit of the word at pos."""
    return naive_word(key, pos) >> 63


def naive_tie_coin(key, pos):
    """The tie coin of the vote: bit pos % 64 of the word at pos // 64."""
    return (naive_word(key, pos // 64) >> (pos % 64)) & 1


def naive_pack(bits):
    """Bit i -> byte i // 8, bit i % 8 (DESIGN.md), by a loop."""
    out = np.zeros((len(bits) + 7) // 8, np.uint8)
    for i, b in enumerate(bits):
        if b:
            out[i // 8] |= 1 << (i % 8)
    return out


def bits_of(packed, d):
    """The d coordinate bits of a packed vector and, separately, its padding bits."""
    u = np.unpackbits(np.asarray(packed, np.uint8), bitorder="little")
    return u[:d].astype(bool), u[d:]


def naive_counts(gathered, d):
    n = gathered.shape[0]
    c = np.zeros(d, np.int64)
    for r in range(n):
        c += bits_of(gathered[r], d)[0]
    return c


def random_gathered(gen, n, d, p=0.5):
    """n packed rows of random bits (P(bit) = p), padding bits 0."""
    return np.packbits(gen.random((n, d)) < p, axis=1, bitorder="little").reshape(
        n, K.packed_nbytes(d))


def keys(seed=7, step=3):
    return {p: rng.key64(seed, rng.stream_id(p), step) for p in rng.Purpose}


def floats_with_specials(gen, d, dtype=np.float32, zero_frac=0.1):
    """Normal values plus exact zeros (+0 and -0), tiny and huge finite values."""
    x = gen.standard_normal(d).astype(dtype)
    if d:
        m = gen.random(d)
        x[m < zero_frac] = 0
        x[(m >= zero_frac) & (m < 1.5 * zero_frac)] = -0.0
        x[(m >= 0.96) & (m < 0.98)] = np.finfo(dtype).tiny
        x[m >= 0.98] = -np.finfo(dtype).max
    return x


# ---------------------------------------------------------------------------------------
# the bit convention and pack/unpack round trips


def test_bit_convention_by_hand():
    # coordinates 0 and 8 positive, 3 positive: byte 0 = 0b00001001, byte 1 = 0b00000001
    x = np.array([1, -1, -1, 2, -1, -1, -1, -1, 3], np.float32)
    np.testing.assert_array_equal(K.pack_signs(x), naive_pack(x > 0))
    assert K.pack_signs(x).tolist() == [0b00001001, 0b00000001]
    assert K.BITORDER == "little"


@pytest.mark.parametrize("d", SIZES)
@given(seed=st.integers(0, 2**32 - 1))
@settings(PROPS, max_examples=3)
def test_pack_unpack_round_trip(d, seed):
    gen = np.random.default_rng(seed)
    x = floats_with_specials(gen, d)
    packed = K.pack_signs(x)
    assert packed.dtype == np.uint8 and packed.shape == ((d + 7) // 8,)
    bits, pad = bits_of(packed, d)
    np.testing.assert_array_equal(bits, x > 0)
    assert not pad.any(), "padding bits must be 0"
    if d <= 10_000:
        np.testing.assert_array_equal(packed, naive_pack(x > 0))
    signs = K.unpack_signs(packed, d)
    assert signs.shape == (d,) and signs.dtype == np.float32
    np.testing.assert_array_equal(signs, np.where(x > 0, 1.0, -1.0))
    np.testing.assert_array_equal(K.pack_bits(K.unpack_bits(packed, d)), packed)
    np.testing.assert_array_equal(K.pack_signs(signs), packed)
    # a longer buffer unpacks the same d coordinates
    longer = np.concatenate([packed, np.full(3, 0xFF, np.uint8)])
    np.testing.assert_array_equal(K.unpack_signs(longer, d), signs)


@pytest.mark.parametrize("d", SIZES)
def test_padding_never_leaks_from_any_kernel(d):
    gen = np.random.default_rng(d)
    k = keys()
    x = floats_with_specials(gen, d, zero_frac=0.3)
    outs = {"sign": K.pack_signs(x, zero_key=k[rng.Purpose.ZERO_COIN]),
            "sr": K.stochastic_sign_pack(x, 0.5, k[rng.Purpose.STOCHASTIC_SIGN])[0]}
    if d < 100_000:
        # padding bits set to 1 in every row must not leak into a result
        g = random_gathered(gen, 4, d)
        if d % 8:
            g[:, -1] |= np.uint8(0xFF ^ ((1 << (d % 8)) - 1))
        c = K.vote_counts(g, d)
        np.testing.assert_array_equal(c, naive_counts(g, d))
        for tie in ("coin", "zero"):
            v = K.majority_vote(g, d, tie=tie, key=k[rng.Purpose.TIE_COIN])
            outs["vote " + tie] = v.bits
            if v.nonzero is not None:
                outs["nonzero"] = v.nonzero
        outs["v2"] = K.majority_vote(g, d, variant="v2", key=k[rng.Purpose.S1]).bits
        outs["from counts"] = K.vote_from_counts(c, 4, tie="zero").nonzero
    for name, packed in outs.items():
        assert packed.shape == ((d + 7) // 8,), name
        assert not bits_of(packed, d)[1].any(), f"{name}: padding bits set"


# ---------------------------------------------------------------------------------------
# sign with the zero rule


@given(seed=st.integers(0, 2**32 - 1), d=st.integers(0, 300), offset=st.integers(0, 2**40))
@PROPS
def test_sign_zero_rule_is_a_coin_of_the_ranks_stream(seed, d, offset):
    gen = np.random.default_rng(seed)
    x = floats_with_specials(gen, d, zero_frac=0.4)
    key = rng.key64(seed, rng.stream_id(rng.Purpose.ZERO_COIN, 3), 11)
    got = bits_of(K.pack_signs(x, zero_key=key, offset=offset), d)[0]
    want = [xi > 0 or (xi == 0 and naive_coin(key, offset + i) == 1) for i, xi in enumerate(x)]
    np.testing.assert_array_equal(got, want)
    # without a key an exact zero packs as -1
    np.testing.assert_array_equal(bits_of(K.pack_signs(x), d)[0], x > 0)


def test_sign_zero_coin_is_fair():
    d = 200_000
    key = rng.key64(1, rng.stream_id(rng.Purpose.ZERO_COIN, 0), 0)
    f = bits_of(K.pack_signs(np.zeros(d, np.float32), zero_key=key), d)[0].mean()
    assert abs(f - 0.5) <= 5 * math.sqrt(0.25 / d), f


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_sign_float_dtypes(dtype):
    gen = np.random.default_rng(5)
    x = floats_with_specials(gen, 1001, dtype)
    key = keys()[rng.Purpose.ZERO_COIN]
    want = reference.sign_pack(x, key, 0)[0]
    np.testing.assert_array_equal(K.pack_signs(x, zero_key=key), want)
    np.testing.assert_array_equal(bits_of(K.pack_signs(x), 1001)[0], x > 0)


# ---------------------------------------------------------------------------------------
# S_R (eq. 8)


def naive_sr_bit(v, r, key, pos):
    """Coordinate bit of S_R: u < 0.5 + v * (0.5 / R), u = (word >> 11) * 2**-53."""
    u = (naive_word(key, pos) >> 11) * 2.0 ** -53
    return u < 0.5 + float(v) * (0.5 / r)


@given(seed=st.integers(0, 2**32 - 1), d=st.integers(0, 200), offset=st.integers(0, 2**40),
       nseg=st.integers(1, 4))
@PROPS
def test_stochastic_sign_bits_follow_the_formula(seed, d, offset, nseg):
    gen = np.random.default_rng(seed)
    v = (gen.standard_normal(d) * 2).astype(np.float32)
    cuts = np.sort(gen.integers(0, d + 1, nseg - 1))
    seg = np.diff(np.concatenate([[0], cuts, [d]])).astype(np.int64)
    r = gen.uniform(0.1, 3.0, nseg)
    key = rng.key64(seed, rng.stream_id(rng.Purpose.STOCHASTIC_SIGN, 0), 1)
    packed, clamped = K.stochastic_sign_pack(v, r, key, seg_sizes=seg, offset=offset)
    r_each = np.repeat(r, seg)
    want = [naive_sr_bit(v[i], r_each[i], key, offset + i) for i in range(d)]
    np.testing.assert_array_equal(bits_of(packed, d)[0], want)
    assert clamped == int(sum(abs(float(v[i])) > r_each[i] for i in range(d)))


def test_stochastic_sign_mean_is_v_over_r_per_segment():
    """E[S_R(v)] = v / R (Definition 1): for each of K values repeated m times, in three
    segments with different R, the mean of the +-1 outputs is within 5 sd of v / R
    (sd = sqrt((1 - (v/R)^2) / m)) plus 1/m."""
    m = 20_000
    rs = [0.5, 2.0, 10.0]
    fracs = np.array([-1.0, -0.75, -0.3, -0.01, 0.0, 0.2, 0.5, 0.9, 1.0])
    v = np.concatenate([np.repeat((fracs * r).astype(np.float32), m) for r in rs])
    seg = [len(fracs) * m] * len(rs)
    key = rng.key64(42, rng.stream_id(rng.Purpose.STOCHASTIC_SIGN, 5), 9)
    packed, clamped = K.stochastic_sign_pack(v, rs, key, seg_sizes=seg, offset=1000)
    assert clamped == 0
    out = K.unpack_signs(packed, v.shape[0], np.float64).reshape(len(rs), len(fracs), m)
    for si, r in enumerate(rs):
        for fi in range(len(fracs)):
            want = float(np.float32(fracs[fi] * r)) / r
            bound = 5 * math.sqrt(max(1 - want * want, 0) / m) + 1 / m
            got = out[si, fi].mean()
            assert abs(got - want) <= bound, (r, fracs[fi], got, want, bound)
    # |v| = R is deterministic: probability exactly 1 or 0
    assert (out[:, 0] == -1).all() and (out[:, -1] == 1).all()


def test_stochastic_sign_clamps_and_counts_with_fixed_r():
    gen = np.random.default_rng(3)
    r = 1.0
    v = (gen.standard_normal(100_000) * 1.5).astype(np.float32)
    key = rng.key64(0, rng.stream_id(rng.Purpose.STOCHASTIC_SIGN, 0), 0)
    packed, clamped = K.stochastic_sign_pack(v, r, key)
    assert clamped == int((np.abs(v) > r).sum()) > 0
    bits = bits_of(packed, v.shape[0])[0]
    assert bits[v > r].all() and not bits[v < -r].any()
    inside = np.abs(v) < 0.25
    s = np.where(bits[inside], 1.0, -1.0)
    var = (1 - (v[inside].astype(np.float64) / r) ** 2).sum()
    assert abs((s - v[inside] / r).sum()) <= 5 * math.sqrt(var) + 1


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_stochastic_sign_float_dtypes(dtype):
    v = np.random.default_rng(8).standard_normal(3001).astype(dtype)
    key = keys()[rng.Purpose.STOCHASTIC_SIGN]
    packed, clamped = K.stochastic_sign_pack(v, 1.5, key, offset=7)
    want, _, want_clamped = reference.stochastic_sign_pack(v, [3001], [1.5], key, 7)
    np.testing.assert_array_equal(packed, want)
    assert clamped == want_clamped


# ---------------------------------------------------------------------------------------
# the vote (eq. 10 and 11) and counts


def naive_v1(gathered, n, d, tie, key, offset):
    """Count-and-compare per coordinate: (bits, nonzero) as bool lists."""
    c = naive_counts(gathered, d)
    bits, nonzero = [], []
    for i in range(d):
        if 2 * c[i] > n:
            bits.append(True), nonzero.append(True)
        elif 2 * c[i] < n:
            bits.append(False), nonzero.append(True)
        elif tie == "coin":
            bits.append(naive_tie_coin(key, offset + i) == 1), nonzero.append(True)
        else:
            bits.append(False), nonzero.append(False)
    return np.array(bits, bool), np.array(nonzero, bool)


@pytest.mark.parametrize("n", NS)
@given(seed=st.integers(0, 2**32 - 1), d=st.sampled_from(VOTE_SIZES) | st.integers(0, 300),
       offset=st.integers(0, 2**40), p=st.sampled_from([0.5, 0.1, 0.9]))
@settings(PROPS, max_examples=8)
def test_v1_vote_equals_naive_count_and_compare(n, seed, d, offset, p):
    gen = np.random.default_rng(seed)
    g = random_gathered(gen, n, d, p)
    key = rng.key64(seed, rng.stream_id(rng.Purpose.TIE_COIN), 2)
    for tie in ("coin", "zero"):
        want_bits, want_nz = naive_v1(g, n, d, tie, key, offset)
        v = K.majority_vote(g, d, tie=tie, key=key, offset=offset)
        np.testing.assert_array_equal(bits_of(v.bits, d)[0], want_bits, err_msg=tie)
        if tie == "zero" and n % 2 == 0:
            np.testing.assert_array_equal(bits_of(v.nonzero, d)[0], want_nz)
        else:
            assert v.nonzero is None and want_nz.all()
        values = v.values(d)
        np.testing.assert_array_equal(values, np.where(want_nz, np.where(want_bits, 1, -1), 0))


@pytest.mark.parametrize("n", NS + [255, 256, 300])
@given(seed=st.integers(0, 2**32 - 1), d=st.sampled_from(VOTE_SIZES) | st.integers(0, 300))
@settings(PROPS, max_examples=5)
def test_vote_counts_equal_naive_count(n, seed, d):
    gen = np.random.default_rng(seed)
    g = random_gathered(gen, n, d, gen.uniform(0.05, 0.95))
    c = K.vote_counts(g, d)
    assert c.shape == (d,) and np.iinfo(c.dtype).max >= n
    np.testing.assert_array_equal(c.astype(np.int64), naive_counts(g, d))


def test_vote_reads_only_the_first_bytes_of_wider_or_strided_rows():
    gen = np.random.default_rng(11)
    n, d = 6, 5000
    g = random_gathered(gen, n, d)
    wide = np.concatenate([g, gen.integers(0, 256, (n, 13), dtype=np.uint8)], axis=1)
    key = keys()[rng.Purpose.TIE_COIN]
    want = K.majority_vote(g, d, key=key).bits
    for a in (wide, wide[:, : g.shape[1] + 1], np.asfortranarray(g)):
        np.testing.assert_array_equal(K.majority_vote(a, d, key=key).bits, want)
        np.testing.assert_array_equal(K.vote_counts(a, d), K.vote_counts(g, d))
        np.testing.assert_array_equal(K.majority_vote(a, d, variant="v2", key=key).bits,
                                      K.majority_vote(g, d, variant="v2", key=key).bits)


def test_tie_coin_is_fair_and_shared_stream():
    n, d = 2, 100_000
    nb = K.packed_nbytes(d)
    g = np.stack([np.full(nb, 0xFF, np.uint8), np.zeros(nb, np.uint8)])
    key = rng.key64(5, rng.stream_id(rng.Purpose.TIE_COIN), 17)
    v = K.majority_vote(g, d, tie="coin", key=key)
    bits = bits_of(v.bits, d)[0]
    assert abs(bits.mean() - 0.5) <= 5 * math.sqrt(0.25 / d)
    # neighbours (mostly bits of one random word) agree half of the time
    assert abs((bits[1:] == bits[:-1]).mean() - 0.5) <= 5 * math.sqrt(0.25 / d)
    np.testing.assert_array_equal(bits, rng.tie_coin_bits(key, np.arange(d, dtype=np.uint64)))
    z = K.majority_vote(g, d, tie="zero")
    assert not z.values(d).any()


def test_tie_coins_of_pieces_at_their_offsets_equal_the_whole_vote():
    """A schedule votes shards and buckets at offset = their global start, which need not
    be a multiple of 64 (the coins share one word per 64 positions): the pieces' coins
    must be the whole vector's.  n = 2 with opposite rows ties everywhere."""
    n, d, offset = 2, 5000, 77
    nb = K.packed_nbytes(d)
    g = np.stack([np.full(nb, 0xFF, np.uint8), np.zeros(nb, np.uint8)])
    key = rng.key64(5, rng.stream_id(rng.Purpose.TIE_COIN), 3)
    whole = bits_of(K.majority_vote(g, d, key=key, offset=offset).bits, d)[0]
    cuts = [0, 8, 72, 136, 1000, 4096, d]  # pieces of the packed rows: multiples of 8
    pieces = [bits_of(K.majority_vote(np.ascontiguousarray(g[:, a // 8:]), b - a, key=key,
                                      offset=offset + a).bits, b - a)[0]
              for a, b in zip(cuts[:-1], cuts[1:])]
    np.testing.assert_array_equal(np.concatenate(pieces), whole)
    cuts = [0, 3, 65, 130, 4999, d]  # counts can be cut anywhere
    for a, b in zip(cuts[:-1], cuts[1:]):
        v = K.vote_from_counts(np.ones(b - a, np.int64), n, key=key, offset=offset + a)
        np.testing.assert_array_equal(bits_of(v.bits, b - a)[0], whole[a:b])


def naive_s1_bit(c, n, key, pos):
    """S_1 (eq. 11): +1 with probability c / n, as u32 * n < c * 2**32 (exact)."""
    return (naive_word(key, pos) >> 32) * n < c << 32


@pytest.mark.parametrize("n", NS)
@given(seed=st.integers(0, 2**32 - 1), d=st.sampled_from(VOTE_SIZES[:-1]) | st.integers(0, 200),
       offset=st.integers(0, 2**40))
@settings(PROPS, max_examples=5)
def test_v2_bits_follow_the_formula(n, seed, d, offset):
    gen = np.random.default_rng(seed)
    g = random_gathered(gen, n, d, gen.uniform(0.1, 0.9))
    key = rng.key64(seed, rng.stream_id(rng.Purpose.S1), 4)
    c = naive_counts(g, d)
    want = [naive_s1_bit(int(c[i]), n, key, offset + i) for i in range(d)]
    got = K.majority_vote(g, d, variant="v2", key=key, offset=offset)
    assert got.nonzero is None
    np.testing.assert_array_equal(bits_of(got.bits, d)[0], want)
    from_counts = K.vote_from_counts(c, n, variant="v2", key=key, offset=offset)
    np.testing.assert_array_equal(from_counts.bits, got.bits)


@pytest.mark.parametrize("n", [1, 2, 3, 8, 9, 127])
def test_v2_frequency_of_plus_one_is_c_over_n(n):
    """For every count c in 0..n, over m coordinates with that count, the fraction of +1
    is c/n within 5 binomial standard deviations (sqrt(p (1 - p) / m)) plus 1/m; c = 0
    and c = n are exact."""
    m = 4096 if n > 9 else 20_000
    c = np.repeat(np.arange(n + 1), m)
    key = rng.key64(n, rng.stream_id(rng.Purpose.S1), 0)
    bits = bits_of(K.vote_from_counts(c.astype(np.uint8 if n < 256 else np.int64), n,
                                      variant="v2", key=key).bits, c.shape[0])[0]
    freq = bits.reshape(n + 1, m).mean(axis=1)
    for ci in range(n + 1):
        p = ci / n
        assert abs(freq[ci] - p) <= 5 * math.sqrt(p * (1 - p) / m) + 1 / m, (ci, freq[ci], p)
    assert freq[0] == 0 and freq[n] == 1
    # the same through the fused vote: rows 0..c-1 have +1 at coordinate block c
    g = np.stack([K.pack_bits(c > r) for r in range(n)])
    np.testing.assert_array_equal(K.majority_vote(g, c.shape[0], variant="v2", key=key).bits,
                                  K.pack_bits(bits))


# ---------------------------------------------------------------------------------------
# randomness: keys and streams


@given(pos=st.lists(st.integers(0, 2**63), min_size=1, max_size=50), key=st.integers(0, M64))
@PROPS
def test_random_words_are_splitmix64_of_the_position(pos, key):
    got = rng.random_words(key, np.array(pos, np.uint64))
    assert [int(w) for w in got] == [naive_word(key, p) for p in pos]
    assert rng.splitmix64(key) == naive_splitmix64(key)
    u = rng.uniform(key, np.array(pos, np.uint64))
    assert ((u >= 0) & (u < 1)).all()
    tie = rng.tie_coin_bits(key, np.array(pos, np.uint64))
    assert [int(b) for b in tie] == [naive_tie_coin(key, p) for p in pos]


def test_same_key_same_bits_and_streams_differ():
    d = 100_000
    v = np.random.default_rng(0).standard_normal(d).astype(np.float32)
    seed, step = 123, 45

    def sr(rank, step=step, seed=seed):
        key = rng.key64(seed, rng.stream_id(rng.Purpose.STOCHASTIC_SIGN, rank), step)
        return bits_of(K.stochastic_sign_pack(v, 10.0, key)[0], d)[0]

    np.testing.assert_array_equal(sr(0), sr(0))  # reproducible: a pure function of the key
    bound = 0.5 - 5 * math.sqrt(0.25 / d)
    for a, b in [(sr(0), sr(1)), (sr(0), sr(2**31)), (sr(0), sr(0, step=step + 1)),
                 (sr(0), sr(0, seed=seed + 1))]:
        # |v| << R: each bit is nearly a fair coin, so independent streams disagree about
        # half the time
        assert (a != b).mean() >= bound - 0.01
    ids = {rng.stream_id(p, r) for p in rng.Purpose for r in (0, 1, 2, 2**32 - 2)}
    shared = {rng.stream_id(p) for p in rng.Purpose}
    assert len(ids) == 4 * len(rng.Purpose) and len(shared) == len(rng.Purpose)
    assert not ids & shared


def test_shared_stream_is_rank_independent():
    """Every rank derives the shared key from (seed, purpose, step) alone, so ranks that
    vote on the same gathered bits get the same result, while rank streams differ."""
    n, d = 4, 20_000
    g = random_gathered(np.random.default_rng(2), n, d)
    results = []
    for rank in range(n):
        shared = rng.key64(99, rng.stream_id(rng.Purpose.TIE_COIN, None), 7)
        own = rng.key64(99, rng.stream_id(rng.Purpose.TIE_COIN, rank), 7)
        assert shared != own
        results.append(K.majority_vote(g, d, tie="coin", key=shared).bits)
    for r in results[1:]:
        np.testing.assert_array_equal(r, results[0])
    assert rng.stream_id(rng.Purpose.S1) == rng.stream_id(rng.Purpose.S1, None)


# ---------------------------------------------------------------------------------------
# numba path == reference.py (the portable/GPU algorithm), bit for bit


def test_wide_vectors_sets_the_llvm_attribute():
    """``_cpu._wide_vectors()`` must reach LLVM as the function attribute (it fails
    silently otherwise, and only the speed would show it)."""
    import numba
    from llvmlite import ir

    if not isinstance(ir.values.FunctionAttributes(), set):  # pragma: no cover
        pytest.skip("this llvmlite's function attributes are not a set: the kernels run "
                    "with LLVM's default vector width (speed only)")

    @numba.njit(cache=False)
    def f(x):
        _cpu._wide_vectors()
        t = 0
        for v in x:
            t += v
        return t

    assert f(np.arange(16)) == 120
    ir = next(iter(f.inspect_llvm().values()))
    assert '"prefer-vector-width"="512"' in ir


@given(seed=st.integers(0, 2**32 - 1), d=st.sampled_from(VOTE_SIZES) | st.integers(0, 300),
       offset=st.integers(0, 2**40))
@FEW
def test_numba_equals_reference_sign_and_sr(seed, d, offset):
    gen = np.random.default_rng(seed)
    x = floats_with_specials(gen, d, zero_frac=0.2)
    zk = rng.key64(seed, rng.stream_id(rng.Purpose.ZERO_COIN, 1), 1)
    np.testing.assert_array_equal(K.pack_signs(x, zero_key=zk, offset=offset),
                                  reference.sign_pack(x, zk, offset)[0])
    np.testing.assert_array_equal(K.pack_signs(x), reference.sign_pack(x)[0])
    seg = np.array([d // 4, 0, d // 2, d - d // 4 - d // 2])
    r = np.array([0.3, 1.0, 2.0, 0.05])
    key = rng.key64(seed, rng.stream_id(rng.Purpose.STOCHASTIC_SIGN, 1), 1)
    xs = np.where(np.abs(x) > 1e30, 0, x).astype(np.float32)
    got, clamped = K.stochastic_sign_pack(xs, r, key, seg_sizes=seg, offset=offset)
    want, nbad, want_clamped = reference.stochastic_sign_pack(xs, seg, r, key, offset)
    np.testing.assert_array_equal(got, want)
    assert clamped == want_clamped and nbad == 0


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("seg", [[0], [1], [8192], [8192, 8192, 1], [3, 0, 20_000, 0, 8189, 7],
                                 [50_000, 0]])
def test_sr_max_abs_is_local_max_abs(seg, dtype):
    """stochastic_sign_pack's fused per-segment max |v| (segments across and on the
    parallel chunks' boundaries, empty ones) == local_max_abs and the reference's; the
    bits and clamp count do not change with max_abs."""
    from signcomm.contribution import local_max_abs
    seg = np.array(seg, np.int64)
    d = int(seg.sum())
    gen = np.random.default_rng(d)
    v = (gen.standard_normal(d) * gen.choice([1e-3, 1.0, 30.0], d)).astype(dtype)
    r = np.linspace(0.5, 2.0, seg.shape[0])
    key = rng.key64(7, rng.stream_id(rng.Purpose.STOCHASTIC_SIGN, 2), 2)
    packed, clamped, seg_max = K.stochastic_sign_pack(v, r, key, seg_sizes=seg, offset=5,
                                                      max_abs=True)
    want, want_clamped = K.stochastic_sign_pack(v, r, key, seg_sizes=seg, offset=5)
    np.testing.assert_array_equal(packed, want)
    assert clamped == want_clamped
    np.testing.assert_array_equal(seg_max, local_max_abs(v, seg))
    ref = reference.stochastic_sign_pack(v, seg, r, key, 5, with_max=True)
    np.testing.assert_array_equal(ref[0], want)
    np.testing.assert_array_equal(ref[3], seg_max)
    for bad in (np.inf, np.nan) if d else ():   # NaN/Inf as local_max_abs gives them
        v[d // 2] = bad
        _, _, seg_max = K.stochastic_sign_pack(v, r, key, seg_sizes=seg, check_finite=False,
                                               max_abs=True)
        np.testing.assert_array_equal(seg_max, local_max_abs(v, seg))
        assert np.isnan(seg_max).any() == np.isnan(bad)
        np.testing.assert_array_equal(
            reference.stochastic_sign_pack(v, seg, r, key, 0, with_max=True)[3], seg_max)


@pytest.mark.parametrize("n", NS + [256])
@given(seed=st.integers(0, 2**32 - 1), d=st.sampled_from(VOTE_SIZES) | st.integers(0, 300),
       offset=st.integers(0, 2**40))
@settings(FEW, max_examples=3)
def test_numba_equals_reference_vote_counts_decide(n, seed, d, offset):
    gen = np.random.default_rng(seed)
    g = random_gathered(gen, n, d, gen.uniform(0.2, 0.8))
    key = rng.key64(seed, rng.stream_id(rng.Purpose.TIE_COIN), 1)
    rc = reference.counts(g, d)
    np.testing.assert_array_equal(K.vote_counts(g, d).astype(np.int64), rc)
    for mode, variant, tie in [(0, "v1", "coin"), (1, "v1", "zero"), (2, "v2", "coin")]:
        want_bits, want_nz = reference.decide_from_counts(rc, n, mode, key, offset)
        for v in (K.majority_vote(g, d, variant=variant, tie=tie, key=key, offset=offset),
                  K.vote_from_counts(rc, n, variant=variant, tie=tie, key=key, offset=offset)):
            np.testing.assert_array_equal(v.bits, want_bits, err_msg=f"{variant} {tie}")
            if mode == 1 and n % 2 == 0:
                np.testing.assert_array_equal(v.nonzero, want_nz)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 8, 127, 256])
@pytest.mark.parametrize("d", [0, 7, 64, 70_001, _cpu.STREAM_MIN + 13])
def test_vote_values_from_counts_equals_vote_then_values(n, d):
    """The fused vote + values (streamed stores from STREAM_MIN on an aligned out, plain
    ones on an unaligned out) give the bits of vote_from_counts(...).values()."""
    gen = np.random.default_rng([n, d])
    c = gen.integers(0, n + 1, d).astype(np.uint8 if n < 256 else np.uint16)
    key = rng.key64(n, rng.stream_id(rng.Purpose.TIE_COIN), d)
    for rule in (K.VoteRule("v1", "coin"), K.VoteRule("v1", "zero"), K.VoteRule("v2")):
        want = K.vote_from_counts(c, n, rule=rule, key=key, offset=5).values(d)
        unaligned = np.empty(d + 1, np.float32)[1:]
        for out in (None, K.aligned_empty(d), unaligned):
            got = K.vote_values_from_counts(c, n, rule=rule, key=key, offset=5, out=out)
            assert got.dtype == np.float32 and (out is None or got is out)
            np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32),
                                          err_msg=f"{rule}")


@pytest.mark.parametrize("n", [2, 8])
@pytest.mark.parametrize("radix", [False, True])
def test_decode_reports_the_largest_rounding_distance_and_nan(n, radix):
    """The float64 decode's first return is the largest |scaled word - its integer| over
    the words, inf if a word is NaN (then that word is also bad), in the serial and the
    parallel kernels (the max is taken on the distances' bit patterns)."""
    from signcomm.kernels import fields
    lay = fields.layout(n, "float64", radix)
    for d in (1001, (fields.PARALLEL_WORDS + 3) * lay.f + 5):
        g = random_gathered(np.random.default_rng([n, d]), n, d, 0.5)
        words = sum(fields.encode_layout(g[r], d, lay)[0] for r in range(n))
        counts = np.empty(d, np.uint8)
        gen = np.random.default_rng(d)
        nudged = words + gen.uniform(-0.2, 0.2, words.shape)
        far = gen.integers(words.shape[0])
        nudged[far] = words[far] + 0.3125          # the largest distance, exact in float64
        want = np.abs(nudged - np.rint(nudged)).max()
        assert want == 0.3125
        for threads in sorted({1, numba.config.NUMBA_NUM_THREADS}):
            numba.set_num_threads(threads)
            try:
                got = fields.decode_layout(nudged, d, lay, n, counts)
                assert (got.max_dev, got.bad, got.mix) == (want, 0, None)
                np.testing.assert_array_equal(counts, naive_counts(g, d))
                broken = nudged.copy()
                broken[gen.integers(words.shape[0])] = np.nan
                got = fields.decode_layout(broken, d, lay, n, counts)
                assert got.max_dev == np.inf and got.bad >= 1
            finally:
                numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)


@pytest.mark.parametrize("n", [2, 3, 4, 8])
@pytest.mark.parametrize("radix", [False, True])
def test_decode_takes_the_counts_total_and_hash(n, radix):
    """decode_layout's mix_base: the counts' mix_sum of whole words, keyed from that word,
    taken in the decode (serial and parallel), equals mix_sum over the decoded counts."""
    from signcomm.kernels import _fields, fields
    lay = fields.layout(n, "float64", radix)
    for d in (0, 5, 8, 1001, (fields.PARALLEL_WORDS + 3) * lay.f + 5):
        gen = np.random.default_rng([n, d])
        g = random_gathered(gen, n, d, 0.5)
        words = sum(fields.encode_layout(g[r], d, lay)[0] for r in range(n))
        counts = np.empty(d, np.uint8)
        for base in (0, 3):
            dev, tot, bad, mix = fields.decode_layout(words, d, lay, n, counts, mix_base=base)
            np.testing.assert_array_equal(counts, naive_counts(g, d))
            assert (dev, tot, bad) == (0.0, int(counts.sum()), 0)
            whole = counts[:d // 8 * 8].copy().view(np.uint64)
            assert mix == int(_fields.mix_sum(whole, base))


@pytest.mark.parametrize("n", [1, 2, 3, 7, 8, 127, 1000])
@given(seed=st.integers(0, 2**32 - 1), d=st.sampled_from(VOTE_SIZES) | st.integers(0, 300))
@settings(FEW, max_examples=4)
def test_count_fields_sum_over_ranks_gives_exact_counts(n, seed, d):
    d = min(d, 100_000 // n)  # keep n * d (the naive count's work) small
    gen = np.random.default_rng(seed)
    g = random_gathered(gen, n, d, gen.uniform(0.0, 1.0))
    b = K.count_field_bits(n)
    assert 2 ** b > n >= 2 ** (b - 1)
    words = [K.pack_count_fields(g[r], d, b) for r in range(n)]
    for r in range(min(n, 3)):  # numba == reference for each rank's words
        np.testing.assert_array_equal(words[r], reference.pack_count_fields(g[r], d, b))
    assert words[0].shape == (K.count_field_words(d, b),) and words[0].dtype == np.int64
    total = np.sum(words, axis=0, dtype=np.int64)  # what an integer allreduce computes
    got = K.unpack_count_fields(total, d, b)
    np.testing.assert_array_equal(got, naive_counts(g, d))
    np.testing.assert_array_equal(got, reference.unpack_count_fields(total, d, b))


# ---------------------------------------------------------------------------------------
# bad input


def test_bad_input_types_and_shapes():
    key = 1
    with pytest.raises(TypeError, match="float"):
        K.pack_signs(np.arange(5))
    with pytest.raises(TypeError, match="float"):
        K.stochastic_sign_pack(np.arange(5), 1.0, key)
    with pytest.raises(TypeError, match="float"):
        K.stochastic_sign_pack(np.ones(5, bool), 1.0, key)
    with pytest.raises(ValueError, match="1-D"):
        K.pack_signs(np.ones((2, 3), np.float32))
    with pytest.raises(TypeError, match="uint8"):
        K.unpack_signs(np.zeros(2, np.int16), 9)


@pytest.mark.parametrize("d", [0, 1, 7, 8, 1000, 3 * (1 << 13) + 5])
def test_one_r_gives_what_the_segmented_path_gives(d):
    """One R (no seg_sizes; the fast path) against the general path with an empty second
    segment: the same bits, clamped count and max |v|, for R as a float, a NumPy scalar
    and a 0-d array."""
    v = (np.random.default_rng(d).standard_normal(d) * 3).astype(np.float32)
    key = rng.key64(3, rng.stream_id(rng.Purpose.STOCHASTIC_SIGN, 0), d)
    want = K.stochastic_sign_pack(v, [2.5, 1.0], key, seg_sizes=[d, 0], max_abs=True)
    for r in (2.5, np.float64(2.5), np.array(2.5)):
        got = K.stochastic_sign_pack(v, r, key, max_abs=True)
        np.testing.assert_array_equal(got[0], want[0])
        assert got[1] == want[1] and (d < 100 or got[1] > 0)   # (some |v| > R)
        np.testing.assert_array_equal(got[2], want[2][:1])


@pytest.mark.parametrize("r", [0.0, -1.0, float("nan"), float("inf"), -float("inf")])
def test_bad_r(r):
    v = np.ones(10, np.float32)
    with pytest.raises(ValueError, match="R must be positive and finite"):
        K.stochastic_sign_pack(v, r, 1)
    with pytest.raises(ValueError, match="segment 1"):
        K.stochastic_sign_pack(v, [1.0, r], 1, seg_sizes=[5, 5])


def test_bad_segments():
    v = np.ones(10, np.float32)
    with pytest.raises(ValueError, match="without seg_sizes"):
        K.stochastic_sign_pack(v, [1.0, 2.0], 1)
    with pytest.raises(ValueError, match="2 values but there are 3 segments"):
        K.stochastic_sign_pack(v, [1.0, 2.0], 1, seg_sizes=[3, 3, 4])
    with pytest.raises(ValueError, match="sum to d=10"):
        K.stochastic_sign_pack(v, [1.0, 2.0], 1, seg_sizes=[3, 3])
    with pytest.raises(ValueError, match=">= 0"):
        K.stochastic_sign_pack(v, [1.0, 2.0], 1, seg_sizes=[12, -2])


def test_packed_buffer_too_short():
    with pytest.raises(ValueError, match="too short for d=17"):
        K.unpack_signs(np.zeros(2, np.uint8), 17)
    with pytest.raises(ValueError, match="too short for d=17"):
        K.majority_vote(np.zeros((3, 2), np.uint8), 17, key=1)
    with pytest.raises(ValueError, match="too short for d=17"):
        K.vote_counts(np.zeros((3, 2), np.uint8), 17)
    with pytest.raises(ValueError, match="too short for d=17"):
        K.pack_count_fields(np.zeros(2, np.uint8), 17, 3)
    with pytest.raises(ValueError, match="at least"):
        K.unpack_count_fields(np.zeros(1, np.int64), 100, 3)


def test_n_below_one():
    with pytest.raises(ValueError, match="n >= 1"):
        K.majority_vote(np.zeros((0, 4), np.uint8), 32, key=1)
    with pytest.raises(ValueError, match="n >= 1"):
        K.vote_counts(np.zeros((0, 4), np.uint8), 32)
    with pytest.raises(ValueError, match="n must be >= 1"):
        K.vote_from_counts(np.zeros(4, np.int64), 0, key=1)
    with pytest.raises(ValueError, match="n must be >= 1"):
        K.count_field_bits(0)


def test_unknown_rule_or_missing_key():
    g = np.zeros((2, 4), np.uint8)
    with pytest.raises(ValueError, match="tie must be one of"):
        K.majority_vote(g, 32, tie="up", key=1)
    with pytest.raises(ValueError, match="variant must be one of"):
        K.majority_vote(g, 32, variant="v3", key=1)
    with pytest.raises(ValueError, match="variant must be one of"):
        K.vote_from_counts(np.zeros(4, np.int64), 2, variant="v3", key=1)
    with pytest.raises(ValueError, match="pass key"):
        K.majority_vote(g, 32, tie="coin")
    with pytest.raises(ValueError, match="pass key"):
        K.majority_vote(g, 32, variant="v2", tie="zero")
    with pytest.raises(ValueError, match="bits_per_field"):
        K.pack_count_fields(np.zeros(4, np.uint8), 32, 64)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("where", [0, 8, 65_535, 65_536, 70_000])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_nonfinite_input_raises_unless_opted_out(bad, where, dtype):
    d = 70_001
    v = np.random.default_rng(where).standard_normal(d).astype(dtype)
    v[where] = bad
    key = rng.key64(0, rng.stream_id(rng.Purpose.STOCHASTIC_SIGN, 0), 0)
    with pytest.raises(K.NonFiniteError, match="1 NaN/Inf"):
        K.pack_signs(v)
    with pytest.raises(K.NonFiniteError, match="1 NaN/Inf"):
        K.stochastic_sign_pack(v, 1.0, key)
    assert issubclass(K.NonFiniteError, ValueError)
    v[[3, 40_000, 69_999][where % 3]] = bad   # a second one, maybe in another task
    v[65_530] = -np.inf
    many = f"{int(np.count_nonzero(~np.isfinite(v)))} NaN/Inf"
    for kernel in (lambda: K.pack_signs(v), lambda: K.stochastic_sign_pack(v, 1.0, key)):
        with pytest.raises(K.NonFiniteError, match=many):
            kernel()
    v[[3, 40_000, 69_999, 65_530]] = 0.5
    p = K.pack_signs(v, check_finite=False)
    np.testing.assert_array_equal(p, reference.sign_pack(v)[0])
    assert bits_of(p, d)[0][where] == (bad == np.inf)  # NaN and -inf pack as -1
    p, clamped = K.stochastic_sign_pack(v, 1.0, key, check_finite=False)
    want, nbad, want_clamped = reference.stochastic_sign_pack(v, [d], [1.0], key, 0)
    np.testing.assert_array_equal(p, want)
    assert nbad == 1 and clamped == want_clamped
    assert bits_of(p, d)[0][where] == (bad == np.inf)


# ---------------------------------------------------------------------------------------
# the CuPy path (reference.py on the GPU) equals the CPU path


@pytest.mark.gpu
class TestCupyMatchesCpu:
    @pytest.fixture(autouse=True)
    def _need_gpu(self):
        if not K.cupy_available():
            pytest.skip("CuPy with a CUDA device is not available (pip install -e .[gpu] "
                        "on a machine with an NVIDIA GPU)")

    @pytest.mark.parametrize("d", [0, 1, 9, 65, 70_001])
    def test_sign_and_sr(self, d):
        import cupy as cp
        x = floats_with_specials(np.random.default_rng(d), d, zero_frac=0.2)
        k = keys()
        zk, sk = k[rng.Purpose.ZERO_COIN], k[rng.Purpose.STOCHASTIC_SIGN]
        got = K.pack_signs(cp.asarray(x), zero_key=zk, offset=5)
        np.testing.assert_array_equal(cp.asnumpy(got), K.pack_signs(x, zero_key=zk, offset=5))
        xs = np.where(np.abs(x) > 1e30, 0, x).astype(np.float32)
        seg = [d // 2, d - d // 2]
        got, gc = K.stochastic_sign_pack(cp.asarray(xs), [0.5, 2.0], sk, seg_sizes=seg, offset=3)
        want, wc = K.stochastic_sign_pack(xs, [0.5, 2.0], sk, seg_sizes=seg, offset=3)
        np.testing.assert_array_equal(cp.asnumpy(got), want)
        assert gc == wc
        xn = xs.copy()
        if d:
            xn[d // 2] = np.nan
            with pytest.raises(K.NonFiniteError):
                K.pack_signs(cp.asarray(xn))

    @pytest.mark.parametrize("n", [1, 2, 3, 8, 17])
    @pytest.mark.parametrize("d", [0, 1, 9, 65, 70_001])
    def test_vote_counts_fields(self, n, d):
        import cupy as cp
        g = random_gathered(np.random.default_rng(n * d + 1), n, d)
        gg = cp.asarray(g)
        key = keys()[rng.Purpose.TIE_COIN]
        np.testing.assert_array_equal(cp.asnumpy(K.vote_counts(gg, d)),
                                      K.vote_counts(g, d).astype(np.int64))
        for variant, tie in [("v1", "coin"), ("v1", "zero"), ("v2", "coin")]:
            a = K.majority_vote(gg, d, variant=variant, tie=tie, key=key, offset=9)
            b = K.majority_vote(g, d, variant=variant, tie=tie, key=key, offset=9)
            np.testing.assert_array_equal(cp.asnumpy(a.bits), b.bits)
            assert (a.nonzero is None) == (b.nonzero is None)
            if b.nonzero is not None:
                np.testing.assert_array_equal(cp.asnumpy(a.nonzero), b.nonzero)
        bpf = K.count_field_bits(n)
        w = K.pack_count_fields(gg[0], d, bpf)
        np.testing.assert_array_equal(cp.asnumpy(w), K.pack_count_fields(g[0], d, bpf))
        np.testing.assert_array_equal(cp.asnumpy(K.unpack_count_fields(w, d, bpf)),
                                      K.unpack_count_fields(cp.asnumpy(w), d, bpf))


def test_serial_and_parallel_kernels_agree_and_the_size_picks_one(monkeypatch):
    """The serial variant of each chunked kernel (small inputs run it: no thread-pool
    wake-up) gives the parallel one's result bit for bit, over several chunks, segments,
    clamps, zeros, NaN and every vote mode; ``ops`` picks it below PARALLEL_MIN
    coordinates or with one numba thread."""
    from signcomm.kernels import ops
    gen = np.random.default_rng(7)
    d = 3 * max(_cpu.SR_CHUNK, _cpu.DECIDE_CHUNK) + 13
    x = (gen.standard_normal(d) * 2).astype(np.float32)
    x[::97] = 0.0
    x[5] = np.nan
    ut, mask, inf_bits = ops.float_bit_view(x.dtype)
    outs = []
    for kernel in (_cpu.sign_pack, _cpu.sign_pack_serial):
        out = np.empty(K.packed_nbytes(d), np.uint8)
        outs.append((kernel(x, x.view(ut), mask, inf_bits, out, np.uint64(99), True, 3), out))
    assert outs[0][0] == outs[1][0] == 1
    np.testing.assert_array_equal(outs[0][1], outs[1][1])
    seg_ends = np.array([1000, _cpu.SR_CHUNK + 7, d, np.iinfo(np.int64).max], np.int64)
    r = np.array([0.5, 3.0, 1.5, 1.0])
    outs = []
    for kernel in (_cpu.stochastic_sign_pack, _cpu.stochastic_sign_pack_serial):
        out = np.empty(K.packed_nbytes(d), np.uint8)
        seg_max = np.zeros(4, ut)
        counts = kernel(x, x.view(ut), mask, inf_bits, seg_ends, 0.5 / r, r, out, seg_max,
                        np.uint64(1234), 17)
        outs.append((counts, out, seg_max))
    assert outs[0][0] == outs[1][0] and outs[0][0][1] > 0
    for a, b in zip(outs[0][1:], outs[1][1:]):
        np.testing.assert_array_equal(a, b)
    for n in (4, 5):
        c = gen.integers(0, n + 1, d).astype(np.uint8)
        for mode in (0, 1, 2):
            got = []
            for kernel in (_cpu.decide_from_counts, _cpu.decide_from_counts_serial):
                bits = np.empty(K.packed_nbytes(d), np.uint8)
                nz = np.empty(K.packed_nbytes(d) if mode == 1 else 0, np.uint8)
                kernel(c, n, mode, np.uint64(55), 9, bits, nz)
                got.append((bits, nz))
            for stream in (False, True):
                for kernel in (_cpu.decide_values, _cpu.decide_values_serial):
                    out = ops.aligned_empty(d)
                    kernel(c, n, mode, np.uint64(55), 9, out, stream)
                    got.append((out,))
            for g in got[1:2]:
                for a, b in zip(got[0], g):
                    np.testing.assert_array_equal(a, b)
            for g in got[3:]:
                np.testing.assert_array_equal(got[2][0], g[0])
    assert ops._kernel("par", "ser", ops.PARALLEL_MIN - 1) == "ser"
    monkeypatch.setattr(numba, "get_num_threads", lambda: 2)
    assert ops._kernel("par", "ser", ops.PARALLEL_MIN) == "par"
    monkeypatch.setattr(numba, "get_num_threads", lambda: 1)
    assert ops._kernel("par", "ser", ops.PARALLEL_MIN) == "ser"
