/* The rANS model of spec §4.2, shared by sqz._lookup (the decoder) and sqz._trellis (the rans-trellis coder), which
 * must build the same table from the same counts. */
#ifndef SQZ_RANS_MODEL_H
#define SQZ_RANS_MODEL_H

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

#endif
