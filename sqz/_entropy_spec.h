/* What sqz._lookup (the decoder) and sqz._trellis (the rans-trellis coder and its Viterbi search) must agree on, from
 * spec §4.2: the rANS model built from counts, and rans-trellis's trellis. */
#ifndef SQZ_ENTROPY_SPEC_H
#define SQZ_ENTROPY_SPEC_H

#include <float.h>
#include <stddef.h>
#include <stdint.h>

#define RANS_PRECISION 24

/* The model of the k counts counts[0], counts[stride], ..., counts[(k - 1) * stride]: cdf[i] = floor(c_i * ((2^24 -
 * k) / total)) + i in float64, c_i the sum of the counts before symbol i, cdf[k] = 2^24 (constriction's fast leaky
 * quantization). A stride of 2 takes one trellis class's counts out of a group's (rans-trellis). 0 if there is none. */
static int rans_model_strided(const uint64_t *counts, ptrdiff_t stride, ptrdiff_t k, uint32_t *cdf)
{
    double total = 0;
    for (ptrdiff_t i = 0; i < k; i++)
        total += (double)counts[i * stride];
    if (k < 2 || !(total >= DBL_MIN && total <= DBL_MAX))
        return 0;
    const double scale = (double)((1u << RANS_PRECISION) - (uint32_t)k) / total;
    double cumulative = 0;
    for (ptrdiff_t i = 0; i < k; i++) {
        cdf[i] = (uint32_t)(cumulative * scale) + (uint32_t)i;
        cumulative += (double)counts[i * stride];
    }
    cdf[k] = 1u << RANS_PRECISION;
    for (ptrdiff_t i = 0; i < k; i++)
        if (cdf[i + 1] <= cdf[i])
            return 0;
    return 1;
}

/* rans-trellis's 8-state trellis: state s allows the indices of class (s >> 1) & 1 (CLASS = 0, 0, 1, 1, 0, 0, 1, 1),
 * and index i = 2m + c moves it to NEXT[s][m & 1] (= NEXT[s][(i & 3) >> 1]), NEXT = {0, 4}, {4, 0}, {1, 5}, {5, 1},
 * {6, 2}, {2, 6}, {7, 3}, {3, 7}: nibble 2s + b of TRELLIS_NEXT_NIBBLES. Shifts and masks, where table loads would sit
 * on the decoder's critical path (tests hold both extensions to the spec's tables through the reference decoder). */
#define TRELLIS_STATES 8
#define TRELLIS_CLASS(s) (((s) >> 1) & 1)
#define TRELLIS_NEXT_NIBBLES 0x7337622615510440ull
#define TRELLIS_NEXT(s, b) ((int)(TRELLIS_NEXT_NIBBLES >> (4 * (2 * (s) + (b)))) & 7)

#endif
