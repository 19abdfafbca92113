/* sqz._lookup: the decoder's hot loop in C (optional; bitpack.py does the same in numpy).
 *
 * lookup_many(jobs, threads) takes jobs (stream, count, bits, table, out, frame[, counts]) and writes, for
 * each, table[index] of every one of the `count` b-bit indices of the packed stream (spec "Bit packing":
 * index i is bits [i*b, i*b + b) of a little-endian bit stream) into `out`. Table entries are 1, 2, 4
 * or 8 bytes: indices themselves, or the element bit patterns of F16/BF16, F32 and F64. The stream of a
 * framed job is first decoded by the worker thread into its own scratch, still in cache when the lookup
 * reads it: a zstd frame of the packed stream (entropy stages zstd and zstd-aligned), or a rANS stream of
 * indices under the model of `counts` (rans and rans-compact, see run_rans; up to RANS_MAX_SYMBOLS entries, the
 * wide codebooks of format 2.3), or (rans-grouped, 2.4) a job (..., frame, None, params, axis): the stream codes the
 * matrix's rows (axis 0) or columns (axis 1) in turn, each group under the discrete Gaussian of its 3 bytes of
 * params, or (rans-trellis, 2.5) a job (..., frame, None, params, axis, 1): the same groups, each index coded under
 * its group's model restricted to its trellis state's class (see rans_steps). It returns (job, problem) for each job
 * that failed; that job's `out` is then garbage.
 *
 * All buffers are taken with the GIL held; the work runs without it, in chunks over `threads` threads
 * (the caller's thread is one of them), so one call decodes a batch of tensors on every core with a
 * single GIL hand-off. The threads are those of the OpenMP runtime torch loaded, when there is one
 * (see openmp_parallel), else sqz's own. libzstd is found at import with dlopen, so the extension builds
 * without its headers; HAS_ZSTD says whether zstd frames are available.
 *
 * Every 8 indices fill exactly b bytes, so a chunk goes through in groups of 8 indices, each group
 * read as one little-endian word. Two loops:
 *   codes:  when the table has 2^m entries, each word is cut into codes of a few whole indices
 *           (8 to 12 bits) and each code is copied from a table of all codes: one load and one store
 *           per 2 to 8 values. A lane >= 2^m has a high bit set, found by one AND per group.
 *   lanes:  otherwise (or for small chunks, where building the code table would cost more) each lane
 *           is compared with the entry count and looked up on its own.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <dlfcn.h>
#include <float.h>
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "_entropy_spec.h"

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "sqz._lookup assumes a little-endian host; bitpack.py's numpy path serves the others"
#endif

#define CHUNK_GROUPS (1 << 15)   /* work item: 2^18 indices, so one large tensor still spreads over threads */
#define MAX_CODE_BYTES (64 << 10) /* largest code table: 4096 codes x 4 lanes x 4 bytes */
#define MAX_THREADS 64

enum { FRAME_PACKED, FRAME_ZSTD, FRAME_RANS }; /* what a job's stream is; bitpack.py mirrors these */

typedef struct {
    Py_buffer stream, table, out;
    Py_ssize_t count;
    int bits;
    uint64_t entries;
    uint64_t padded[256]; /* packed jobs: the table, zero past its entries: any lane reads inside it */
    int frame;            /* FRAME_ZSTD, FRAME_RANS: the worker decodes the stream to indices first */
    uint32_t *cdf;        /* FRAME_RANS: the model's cumulative frequencies, cdf[entries] = 2^RANS_PRECISION: */
    uint32_t cdf_inline[257]; /* here for up to 256 entries, else on the heap (not used by a grouped job) */
    Py_buffer params;     /* a grouped job's parameters, 3 bytes a group (spec §4.2 rans-grouped), else none */
    Py_ssize_t groups;    /* of the stream, each count / groups indices under one model: 1 unless grouped */
    int transposed;       /* grouped by columns: the stream holds the matrix's columns, one after the other */
    int trellis;          /* rans-trellis: a grouped job whose indices walk the trellis */
    int status;           /* a JOB_* code */
} Job;

enum { JOB_OK, JOB_INDEX, JOB_FRAME, JOB_SIZE, JOB_PADDING, JOB_MEMORY, JOB_RANS, JOB_RANS_LEFT };
static const char *const JOB_PROBLEMS[] = {"", "index", "frame", "size", "padding", "memory", "rans", "rans-left"};

typedef struct {
    Job *job;
    Py_ssize_t first, groups; /* groups of 8 indices; the job's last item also takes the tail */
} Item;

typedef struct {
    Item *items;       /* the rANS jobs' items first (n_rans of them), then the rest */
    Py_ssize_t n_items, n_rans;
    Py_ssize_t next, next_rans; /* taken with an atomic add */
} Work;

static inline uint64_t load_group(const uint8_t *src, Py_ssize_t g, int b, Py_ssize_t stream_len)
{
    uint64_t word = 0; /* bits past the group's own 8b are the next group's, and are ignored */
    const Py_ssize_t at = g * b;
    if (at + 8 <= stream_len)
        memcpy(&word, src + at, 8);
    else
        memcpy(&word, src + at, stream_len - at < b ? (size_t)(stream_len - at) : (size_t)b);
    return word;
}

/* lanes and code widths: 8 / (indices per code) codes per group, each code <= 12 bits */
static inline int lanes_per_code(int b) { return b == 1 ? 8 : b <= 3 ? 4 : b <= 6 ? 2 : 1; }

#define DEFINE_KERNELS(T)                                                                          \
    static inline __attribute__((always_inline)) uint64_t lanes_##T##_at(                          \
        const uint8_t *restrict src, Py_ssize_t len, Py_ssize_t first, Py_ssize_t count,           \
        const T *restrict table, uint64_t entries, T *restrict out, const int b)                   \
    {                                                                                              \
        const uint64_t mask = (1u << b) - 1;                                                       \
        uint64_t bad = 0;                                                                          \
        for (Py_ssize_t i = first; i < first + count; i += 8) {                                    \
            const uint64_t word = load_group(src, i / 8, b, len);                                  \
            const int n = first + count - i < 8 ? (int)(first + count - i) : 8;                    \
            for (int j = 0; j < n; j++) {                                                          \
                const uint64_t index = (word >> (j * b)) & mask;                                   \
                bad |= index >= entries;                                                           \
                out[i + j] = table[index];                                                         \
            }                                                                                      \
        }                                                                                          \
        return bad;                                                                                \
    }                                                                                              \
    static inline __attribute__((always_inline)) uint64_t codes_##T##_at(                          \
        const uint8_t *restrict src, Py_ssize_t len, Py_ssize_t g0, Py_ssize_t groups,             \
        const T *restrict codes, uint64_t high, T *restrict out, const int b)                      \
    {                                                                                              \
        const int lanes = lanes_per_code(b), code_bits = lanes * b;                                \
        const uint64_t code_mask = (1u << code_bits) - 1;                                          \
        uint64_t bad = 0;                                                                          \
        for (Py_ssize_t g = g0; g < g0 + groups; g++) {                                            \
            const uint64_t word = load_group(src, g, b, len);                                      \
            bad |= word & high;                                                                    \
            _Pragma("GCC unroll 8") for (int j = 0; j < 8 / lanes; j++)                            \
                memcpy(out + 8 * g + j * lanes, codes + ((word >> (j * code_bits)) & code_mask) * lanes, \
                       lanes * sizeof(T));                                                         \
        }                                                                                          \
        return bad;                                                                                \
    }                                                                                              \
    static uint64_t run_##T(const Job *job, const uint8_t *src, Py_ssize_t len, Py_ssize_t g0,     \
                            Py_ssize_t groups, Py_ssize_t tail, T *scratch)                        \
    {                                                                                              \
        const int b = job->bits, lanes = lanes_per_code(b), code_bits = lanes * b;                 \
        const T *table = (const T *)job->padded;                                                   \
        T *out = job->out.buf;                                                                     \
        const uint64_t e = job->entries;                                                           \
        uint64_t bad = 0;                                                                          \
        const int power_of_two = (e & (e - 1)) == 0;                                               \
        Py_ssize_t first = 8 * (g0 + groups), n = tail; /* what the lanes loop does */            \
        if (power_of_two && lanes > 1 &&                                                           \
            ((Py_ssize_t)lanes * (Py_ssize_t)sizeof(T) << code_bits) <= MAX_CODE_BYTES &&          \
            groups * 8 >= 4 << code_bits) {                                                        \
            uint64_t high = 0; /* the bits of every lane that an index < e never sets */           \
            for (int j = 0; j < 8; j++)                                                            \
                high |= (((1u << b) - 1) & ~(e - 1)) << (j * b);                                   \
            for (uint64_t c = 0; c < (1u << code_bits); c++)                                       \
                for (int l = 0; l < lanes; l++)                                                    \
                    scratch[c * lanes + l] = table[(c >> (l * b)) & ((1u << b) - 1)];              \
            switch (b) {                                                                           \
            case 1: bad = codes_##T##_at(src, len, g0, groups, scratch, high, out, 1); break;      \
            case 2: bad = codes_##T##_at(src, len, g0, groups, scratch, high, out, 2); break;      \
            case 3: bad = codes_##T##_at(src, len, g0, groups, scratch, high, out, 3); break;      \
            case 4: bad = codes_##T##_at(src, len, g0, groups, scratch, high, out, 4); break;      \
            case 5: bad = codes_##T##_at(src, len, g0, groups, scratch, high, out, 5); break;      \
            default: bad = codes_##T##_at(src, len, g0, groups, scratch, high, out, 6); break;     \
            }                                                                                      \
        } else {                                                                                   \
            first = 8 * g0;                                                                        \
            n = 8 * groups + tail;                                                                 \
        }                                                                                          \
        if (n) {                                                                                   \
            switch (b) {                                                                           \
            case 1: bad |= lanes_##T##_at(src, len, first, n, table, e, out, 1); break;            \
            case 2: bad |= lanes_##T##_at(src, len, first, n, table, e, out, 2); break;            \
            case 3: bad |= lanes_##T##_at(src, len, first, n, table, e, out, 3); break;            \
            case 4: bad |= lanes_##T##_at(src, len, first, n, table, e, out, 4); break;            \
            case 5: bad |= lanes_##T##_at(src, len, first, n, table, e, out, 5); break;            \
            case 6: bad |= lanes_##T##_at(src, len, first, n, table, e, out, 6); break;            \
            case 7: bad |= lanes_##T##_at(src, len, first, n, table, e, out, 7); break;            \
            default: bad |= lanes_##T##_at(src, len, first, n, table, e, out, 8); break;           \
            }                                                                                      \
        }                                                                                          \
        return bad;                                                                                \
    }

DEFINE_KERNELS(uint8_t)
DEFINE_KERNELS(uint16_t)
DEFINE_KERNELS(uint32_t)
DEFINE_KERNELS(uint64_t)

/* libzstd, looked up at import (dlopen) so that the extension builds without its headers: a frame is
 * then decompressed by the worker thread that maps it, into that thread's scratch, while it is hot. */
typedef struct ZSTD_DCtx_s ZSTD_DCtx;
static struct {
    ZSTD_DCtx *(*create)(void);
    size_t (*free)(ZSTD_DCtx *);
    size_t (*decompress)(ZSTD_DCtx *, void *, size_t, const void *, size_t);
    unsigned long long (*content_size)(const void *, size_t);
    size_t (*frame_size)(const void *, size_t);
    unsigned (*is_error)(size_t);
} zstd;

typedef struct {
    void *codes;          /* MAX_CODE_BYTES for the code tables */
    uint8_t *stream;      /* a decompressed frame */
    size_t stream_size;
    ZSTD_DCtx *dctx;
} Scratch;

static int reserve(uint8_t **buffer, size_t *capacity, Py_ssize_t size)
{
    if ((size_t)size > *capacity) {
        uint8_t *grown = realloc(*buffer, size);
        if (!grown)
            return 0;
        *buffer = grown;
        *capacity = size;
    }
    return 1;
}

static const uint8_t *unframe(Job *job, Scratch *scratch, Py_ssize_t packed)
{
    if (zstd.content_size(job->stream.buf, job->stream.len) != (unsigned long long)packed) {
        job->status = JOB_SIZE;
        return NULL;
    }
    if (zstd.frame_size(job->stream.buf, job->stream.len) != (size_t)job->stream.len) {
        job->status = JOB_FRAME; /* not exactly one frame */
        return NULL;
    }
    if (!reserve(&scratch->stream, &scratch->stream_size, packed)) {
        job->status = JOB_MEMORY;
        return NULL;
    }
    if (!scratch->dctx && !(scratch->dctx = zstd.create())) {
        job->status = JOB_MEMORY;
        return NULL;
    }
    const size_t got = zstd.decompress(scratch->dctx, scratch->stream, packed, job->stream.buf, job->stream.len);
    if (zstd.is_error(got) || got != (size_t)packed) {
        job->status = JOB_FRAME;
        return NULL;
    }
    const int spare = (int)((8 - (job->count * job->bits) % 8) % 8);
    if (spare && packed && scratch->stream[packed - 1] >> (8 - spare)) {
        job->status = JOB_PADDING;
        return NULL;
    }
    return scratch->stream;
}

/* rANS (spec §4.2, entropy stages rans and rans-compact): constriction's AnsCoder<u32 words, u64 state> under
 * its ContiguousCategorical model with 24-bit probabilities, decoded here so that a rANS tensor costs ~5 ns an
 * index in a batch (~7.5 alone) on the batch's threads instead of ~30 through constriction (entropy.py keeps
 * constriction's decoder as the reference; tests hold the two equal on any bytes). The stream is a stack of
 * little-endian words read from its end; a short last word is zero-padded (rans-compact). Symbols are decoded
 * to 16-bit indices (codebooks of up to 4,096 entries, format 2.3), then mapped through the table. */
#define RANS_MAX_SYMBOLS 4096
#define RANS_SYMBOL_SHIFT 24 /* a symbol's word: start | symbol << 24 | frequency << 36 (12 + 25 bits) */
#define RANS_SYMBOL_MASK (RANS_MAX_SYMBOLS - 1)
#define RANS_FREQUENCY_SHIFT 36
#define RANS_SLOT_BITS 10 /* 1,024 quantile buckets, 8 KB a lane: with four lanes faster than 2,048 (16 KB) */

/* The model of `counts` (spec §4.2, _entropy_spec.h). 0 if there is none. */
static int rans_model(const uint64_t *counts, int k, uint32_t *cdf) { return rans_model_strided(counts, 1, k, cdf); }

static inline uint64_t rans_word(const uint8_t *bytes, Py_ssize_t len, Py_ssize_t w)
{
    uint32_t word = 0;
    memcpy(&word, bytes + 4 * w, len - 4 * w < 4 ? (size_t)(len - 4 * w) : 4);
    return word;
}

/* One rANS stream being decoded. Each symbol is one word, its start | symbol << 24 | frequency << 32, and each
 * quantile bucket holds the word of the symbol its first quantile falls in: one load finds the symbol, its start
 * and its frequency, unless the bucket holds a symbol boundary (k of the buckets at most), where the next
 * symbols are tried. A grouped job's model changes from one run of groups to the next (rans_next_run); a trellis
 * job's two class models share the buckets, half each (512 a class, indexed by class << 9 | quantile >> 15). */
typedef struct {
    Job *job;
    const uint8_t *words;  /* the stream, or a zero word if it is shorter than a word (then none is read) */
    Py_ssize_t left, done; /* words not yet read (the top of the stack is the last); indices decoded */
    Py_ssize_t end;        /* where the run of indices under the current model ends */
    uint64_t state;
    uint8_t *out;          /* the lane's own buffer of the job's indices, 16 bits each */
    size_t out_size;
    uint64_t symbol[RANS_MAX_SYMBOLS];
    uint64_t first[1 << RANS_SLOT_BITS];
    uint64_t counts[RANS_MAX_SYMBOLS]; /* a grouped job's model of the current run */
    uint32_t cdf[RANS_MAX_SYMBOLS + 2]; /* a trellis job's: class 0's model, then class 1's */
    uint64_t symbol1[RANS_MAX_SYMBOLS / 2 + 1]; /* a trellis job's class-1 symbols (class 0's are in symbol) */
    int trellis_state;
} Lane;

#define RANS_LANES 4
/* Streams one thread decodes at once, a symbol of each in turn. A stream is one chain of dependent steps (each
 * state comes from the last: ~15 cycles a symbol), and interleaved chains overlap: measured over batches of
 * LLaMA-shaped tensors on one core, 4.9-6.2 ns an index against 7.2-7.7 one stream at a time. Each tensor's
 * stream is its own, so this needs no change of format; a batch of one tensor still decodes at ~7.5 ns. */

/* E[i] = 2^30 * 2^(-i/256) (spec §4.2 rans-grouped), made at import by the spec's integer recurrence. */
#define GAUSS_RATIO 1070838486u
static uint64_t exp2_table[256];

static void make_exp2_table(void)
{
    exp2_table[0] = 1u << 30;
    for (int i = 1; i < 256; i++)
        exp2_table[i] = (exp2_table[i - 1] * GAUSS_RATIO + (1u << 29)) >> 30;
}

/* A group's model counts (spec §4.2 rans-grouped): centre M (u16, sixteenths of an index) and width code S (u8). */
static void gauss_counts(const uint8_t *param, int k, uint64_t *counts)
{
    const int64_t centre = param[0] | param[1] << 8;
    const uint64_t lambda = exp2_table[32 * (param[2] % 8)];
    const int shift = 23 + param[2] / 8;
    for (int j = 0; j < k; j++) {
        const int64_t d = 16 * (int64_t)j - centre; /* |d| < 2^16 and lambda <= 2^30: d^2 * lambda < 2^62 */
        const uint64_t x = ((uint64_t)(d * d) * lambda) >> shift, octaves = x >> 8;
        counts[j] = (octaves < 64 ? exp2_table[x & 255] >> octaves : 0) + 1;
    }
}

/* A model's symbol words and its 2^slot_bits buckets from cumulative frequencies. */
static void model_tables(uint64_t *symbol, uint64_t *first, const uint32_t *cdf, int k, int slot_bits)
{
    for (int s = 0; s < k; s++)
        symbol[s] = cdf[s] | (uint64_t)s << RANS_SYMBOL_SHIFT | (uint64_t)(cdf[s + 1] - cdf[s]) << RANS_FREQUENCY_SHIFT;
    const int shift = RANS_PRECISION - slot_bits; /* bucket j starts at quantile j << shift */
    for (int s = 0; s < k; s++) { /* the buckets that start inside symbol s's range */
        const uint32_t lo = (cdf[s] + (1u << shift) - 1) >> shift, hi = (cdf[s + 1] + (1u << shift) - 1) >> shift;
        for (uint32_t j = lo; j < hi; j++)
            first[j] = symbol[s];
    }
}

static void rans_tables(Lane *lane, const uint32_t *cdf, int k)
{
    model_tables(lane->symbol, lane->first, cdf, k, RANS_SLOT_BITS);
}

#define TRELLIS_SLOT_SHIFT (RANS_PRECISION - RANS_SLOT_BITS + 1) /* a class's 512 buckets */

/* A grouped job's next run: the run of groups with the same parameters that starts at the lane's next index, where
 * it ends, and its model (a trellis job's: the model of each class, spec §4.2 rans-trellis, its discrete Gaussian's
 * counts of the indices 0, 2, ... and of 1, 3, ..., each by the `rans` formula). 0 if the parameters make no model
 * (they always do: every count is at least 1). */
static int rans_next_run(Lane *lane)
{
    const Job *job = lane->job;
    const Py_ssize_t length = job->count / job->groups;
    const uint8_t *params = job->params.buf;
    const Py_ssize_t g = lane->done / length;
    Py_ssize_t last = g;
    while (last + 1 < job->groups && !memcmp(params + 3 * (last + 1), params + 3 * g, 3))
        last++;
    lane->end = (last + 1) * length;
    const int k = (int)job->entries;
    gauss_counts(params + 3 * g, k, lane->counts);
    if (!job->trellis) {
        if (!rans_model(lane->counts, k, lane->cdf))
            return 0;
        rans_tables(lane, lane->cdf, k);
        return 1;
    }
    const int k0 = (k + 1) / 2, k1 = k / 2;
    uint64_t own[RANS_MAX_SYMBOLS / 2];
    for (int c = 0; c < 2; c++) {
        for (int m = 0; m < (c ? k1 : k0); m++)
            own[m] = lane->counts[2 * m + c];
        if (!rans_model(own, c ? k1 : k0, lane->cdf + (c ? k0 + 1 : 0)))
            return 0;
    }
    /* each class's buckets in one half of the lane's: a lane's tables stay 8 KB (two of 8 KB each measured slower) */
    model_tables(lane->symbol, lane->first, lane->cdf, k0, RANS_SLOT_BITS - 1);
    model_tables(lane->symbol1, lane->first + (1 << (RANS_SLOT_BITS - 1)), lane->cdf + k0 + 1, k1, RANS_SLOT_BITS - 1);
    return 1;
}

static int rans_start(Lane *lane, Job *job)
{
    if (!reserve(&lane->out, &lane->out_size, 2 * job->count)) {
        job->status = JOB_MEMORY;
        return 0;
    }
    const uint8_t *bytes = job->stream.buf;
    const Py_ssize_t len = job->stream.len;
    Py_ssize_t left = (len + 3) / 4;
    uint64_t state = 0;
    if (left) { /* the first word is never zero, so two words fill the state */
        state = rans_word(bytes, len, --left);
        if (!state) {
            job->status = JOB_RANS;
            return 0;
        }
        if (left)
            state = state << 32 | rans_word(bytes, len, --left);
    }
    static const uint32_t zero_word = 0;
    lane->job = job;
    lane->words = len >= 4 ? bytes : (const uint8_t *)&zero_word;
    lane->left = left;
    lane->done = 0;
    lane->state = state;
    lane->end = job->count;
    lane->trellis_state = 0;
    if (!job->params.obj) {
        rans_tables(lane, job->cdf, (int)job->entries);
    } else if (job->count && !rans_next_run(lane)) {
        job->status = JOB_RANS;
        return 0;
    }
    return 1;
}

/* `n` more symbols of each of the N lanes, in turn (N a constant at each call). What a step reads is held in
 * locals (the indices are stored as bytes, which may alias anything: fields would be read again after every
 * store). Unless `guarded`, every lane has at least n words left, so a refill needs no check: the caller
 * runs guarded steps only at a stream's end. The refill is a select (cmov), not a branch: which way it goes
 * depends on the data, so a branch would mispredict. With `trellis` (every lane a rans-trellis job), each symbol m
 * is decoded under the model of the lane's trellis state's class c, the index is 2m + c, and it moves the state on. */
static inline __attribute__((always_inline)) void rans_steps(Lane *const *lanes, Py_ssize_t n, const int N,
                                                             const int guarded, const int trellis)
{
    const uint64_t mask = (1u << RANS_PRECISION) - 1;
    uint64_t state[RANS_LANES];
    const uint8_t *top[RANS_LANES]; /* just past the next word down */
    uint16_t *out[RANS_LANES];
    const uint64_t *first[RANS_LANES], *symbol[RANS_LANES][2]; /* a lane's model, or each class's (trellis) */
    int at_state[RANS_LANES];
    for (int l = 0; l < N; l++) {
        state[l] = lanes[l]->state;
        top[l] = lanes[l]->words + 4 * lanes[l]->left;
        out[l] = (uint16_t *)lanes[l]->out + lanes[l]->done;
        first[l] = lanes[l]->first;
        symbol[l][0] = lanes[l]->symbol, symbol[l][1] = lanes[l]->symbol1;
        at_state[l] = lanes[l]->trellis_state;
    }
    for (Py_ssize_t i = 0; i < n; i++)
        _Pragma("GCC unroll 4") for (int l = 0; l < N; l++) {
            const int c = trellis ? TRELLIS_CLASS(at_state[l]) : 0;
            const uint64_t quantile = state[l] & mask;
            const uint64_t bucket = trellis ? (uint64_t)c << (RANS_SLOT_BITS - 1) | quantile >> TRELLIS_SLOT_SHIFT
                                            : quantile >> (RANS_PRECISION - RANS_SLOT_BITS);
            uint64_t at = first[l][bucket];
            while (quantile - (at & mask) >= at >> RANS_FREQUENCY_SHIFT)
                at = symbol[l][c][((at >> RANS_SYMBOL_SHIFT) & RANS_SYMBOL_MASK) + 1];
            const int m = (int)((at >> RANS_SYMBOL_SHIFT) & RANS_SYMBOL_MASK);
            if (trellis) {
                const int index = 2 * m + c;
                out[l][i] = (uint16_t)index;
                at_state[l] = TRELLIS_NEXT(at_state[l], m & 1);
            } else {
                out[l][i] = (uint16_t)m;
            }
            const uint64_t next =
                (state[l] >> RANS_PRECISION) * (at >> RANS_FREQUENCY_SHIFT) + (quantile - (at & mask));
            uint64_t refill = !(next >> 32);
            uint32_t word;
            if (guarded) { /* none left: word 0 read again (the stream, or a zero word), and unused */
                refill &= top[l] > lanes[l]->words;
                memcpy(&word, top[l] - 4 * (top[l] > lanes[l]->words), 4);
            } else {
                memcpy(&word, top[l] - 4, 4);
            }
            state[l] = refill ? next << 32 | word : next;
            top[l] -= 4 * refill;
        }
    for (int l = 0; l < N; l++) {
        lanes[l]->state = state[l];
        lanes[l]->left = (top[l] - lanes[l]->words) / 4;
        lanes[l]->done += n;
        lanes[l]->trellis_state = at_state[l];
    }
}

/* n more symbols of each active lane (all trellis jobs, or none): unguarded while every lane has words for every
 * step, then guarded. */
static void rans_round(Lane *const *lanes, Py_ssize_t n, int N, int trellis)
{
    while (n > 0) {
        Py_ssize_t m = n;
        for (int l = 0; l < N; l++)
            m = lanes[l]->left < m ? lanes[l]->left : m;
        const int guarded = m == 0;
        m = guarded ? n : m;
        switch ((N * 2 + guarded) * 2 + trellis) {
        case 4: rans_steps(lanes, m, 1, 0, 0); break;
        case 5: rans_steps(lanes, m, 1, 0, 1); break;
        case 6: rans_steps(lanes, m, 1, 1, 0); break;
        case 7: rans_steps(lanes, m, 1, 1, 1); break;
        case 8: rans_steps(lanes, m, 2, 0, 0); break;
        case 9: rans_steps(lanes, m, 2, 0, 1); break;
        case 10: rans_steps(lanes, m, 2, 1, 0); break;
        case 11: rans_steps(lanes, m, 2, 1, 1); break;
        case 12: rans_steps(lanes, m, 3, 0, 0); break;
        case 13: rans_steps(lanes, m, 3, 0, 1); break;
        case 14: rans_steps(lanes, m, 3, 1, 0); break;
        case 15: rans_steps(lanes, m, 3, 1, 1); break;
        case 16: rans_steps(lanes, m, 4, 0, 0); break;
        case 17: rans_steps(lanes, m, 4, 0, 1); break;
        case 18: rans_steps(lanes, m, 4, 1, 0); break;
        default: rans_steps(lanes, m, 4, 1, 1); break;
        }
        n -= m;
    }
}

#define DEFINE_GATHER(T)                                                                           \
    static void gather_##T(const Job *job, const uint16_t *restrict index)                          \
    {                                                                                              \
        const T *restrict table = job->table.buf;                                                  \
        T *restrict out = job->out.buf;                                                            \
        for (Py_ssize_t i = 0; i < job->count; i++)                                                \
            out[i] = table[index[i]];                                                              \
    }
DEFINE_GATHER(uint8_t)
DEFINE_GATHER(uint16_t)
DEFINE_GATHER(uint32_t)
DEFINE_GATHER(uint64_t)

/* The same from a stream of the matrix's columns (grouped by columns): column x's rows are a run of the stream. */
#define DEFINE_GATHER_COLUMNS(T)                                                                   \
    static void gather_columns_##T(const Job *job, const uint16_t *restrict index)                  \
    {                                                                                              \
        const T *restrict table = job->table.buf;                                                  \
        T *restrict out = job->out.buf;                                                            \
        const Py_ssize_t columns = job->groups, rows = job->count / columns;                       \
        for (Py_ssize_t y = 0; y < rows; y++)                                                      \
            for (Py_ssize_t x = 0; x < columns; x++)                                               \
                out[y * columns + x] = table[index[x * rows + y]];                                 \
    }
DEFINE_GATHER_COLUMNS(uint8_t)
DEFINE_GATHER_COLUMNS(uint16_t)
DEFINE_GATHER_COLUMNS(uint32_t)
DEFINE_GATHER_COLUMNS(uint64_t)

/* out[i] = table[index i] of a decoded rANS stream. No check: every index is a symbol of the model, < entries (the
 * buckets of rans_start cover every quantile below 2^24 = cdf[entries], so the search never passes the last). */
static void gather(const Job *job, const uint16_t *index)
{
    if (job->transposed) {
        switch (job->table.itemsize) {
        case 1: gather_columns_uint8_t(job, index); break;
        case 2: gather_columns_uint16_t(job, index); break;
        case 4: gather_columns_uint32_t(job, index); break;
        default: gather_columns_uint64_t(job, index); break;
        }
        return;
    }
    switch (job->table.itemsize) {
    case 1: gather_uint8_t(job, index); break;
    case 2: gather_uint16_t(job, index); break;
    case 4: gather_uint32_t(job, index); break;
    default: gather_uint64_t(job, index); break;
    }
}

/* Every rANS job of the batch, RANS_LANES at a time on this thread: a lane whose stream ends maps its indices
 * to values (while they are in cache) and takes the next job. Trellis jobs and the others step in rounds of their
 * own (a round's lanes are all of one kind). */
static void run_rans(Work *work, Lane *lanes)
{
    Lane *active[2][RANS_LANES], *idle[RANS_LANES]; /* active[1]: trellis jobs' lanes */
    int n_active[2] = {0, 0}, n_idle = RANS_LANES;
    for (int l = 0; l < RANS_LANES; l++)
        idle[l] = &lanes[l];
    for (;;) {
        while (n_idle) {
            const Py_ssize_t i = __atomic_fetch_add(&work->next_rans, 1, __ATOMIC_RELAXED);
            if (i >= work->n_rans)
                break;
            Job *job = work->items[i].job;
            if (__atomic_load_n(&job->status, __ATOMIC_RELAXED) == JOB_OK && rans_start(idle[n_idle - 1], job)) {
                const int kind = job->trellis != 0;
                active[kind][n_active[kind]++] = idle[--n_idle];
            }
        }
        if (!n_active[0] && !n_active[1])
            return;
        for (int kind = 0; kind < 2; kind++) {
            Lane **these = active[kind];
            Py_ssize_t n = PY_SSIZE_T_MAX;
            for (int a = 0; a < n_active[kind]; a++)
                if (these[a]->end - these[a]->done < n)
                    n = these[a]->end - these[a]->done;
            if (n_active[kind])
                rans_round(these, n, n_active[kind], kind);
            for (int a = n_active[kind] - 1; a >= 0; a--) {
                Lane *lane = these[a];
                if (lane->done < lane->job->count) {
                    if (lane->done < lane->end || rans_next_run(lane))
                        continue;
                    lane->job->status = JOB_RANS;
                } else if (lane->state || lane->left)
                    lane->job->status = JOB_RANS_LEFT;
                else
                    gather(lane->job, (const uint16_t *)lane->out);
                idle[n_idle++] = lane;
                these[a] = these[--n_active[kind]];
            }
        }
    }
}

/* Table lookup of groups [g0, g0 + groups) of a job's packed indices `src` (and the tail after the job's last group). */
static void map_indices(Job *job, const uint8_t *src, Py_ssize_t g0, Py_ssize_t groups, Scratch *scratch)
{
    const Py_ssize_t packed = (job->count * job->bits + 7) / 8;
    const Py_ssize_t end = 8 * (g0 + groups);
    const Py_ssize_t tail = end + 8 > job->count ? job->count - end : 0;
    uint64_t bad;
    switch (job->table.itemsize) {
    case 1: bad = run_uint8_t(job, src, packed, g0, groups, tail, scratch->codes); break;
    case 2: bad = run_uint16_t(job, src, packed, g0, groups, tail, scratch->codes); break;
    case 4: bad = run_uint32_t(job, src, packed, g0, groups, tail, scratch->codes); break;
    default: bad = run_uint64_t(job, src, packed, g0, groups, tail, scratch->codes); break;
    }
    if (bad)
        __atomic_store_n(&job->status, JOB_INDEX, __ATOMIC_RELAXED);
}

/* A packed or zstd item (rANS jobs go through run_rans). */
static void run_item(const Item *item, Scratch *scratch)
{
    Job *job = item->job;
    const Py_ssize_t packed = (job->count * job->bits + 7) / 8;
    const uint8_t *src = job->frame == FRAME_ZSTD ? unframe(job, scratch, packed) : job->stream.buf;
    if (src)
        map_indices(job, src, item->first, item->groups, scratch);
}

static void *worker(void *arg)
{
    Work *work = arg;
    Scratch scratch = {malloc(MAX_CODE_BYTES), NULL, 0, NULL};
    Lane *lanes = work->n_rans ? calloc(RANS_LANES, sizeof(Lane)) : NULL;
    if (scratch.codes && (lanes || !work->n_rans)) { /* else the other threads take the items this one would have */
        if (lanes)
            run_rans(work, lanes);
        for (;;) {
            const Py_ssize_t i = __atomic_fetch_add(&work->next, 1, __ATOMIC_RELAXED);
            if (i >= work->n_items)
                break;
            run_item(&work->items[i], &scratch);
        }
    }
    for (int l = 0; lanes && l < RANS_LANES; l++)
        free(lanes[l].out);
    free(lanes);
    free(scratch.codes);
    free(scratch.stream);
    if (scratch.dctx)
        zstd.free(scratch.dctx);
    return NULL;
}

static void run_on_threads(Work *work, int threads)
{
    pthread_t helpers[MAX_THREADS];
    int started = 0;
    for (; started < threads - 1; started++)
        if (pthread_create(&helpers[started], NULL, worker, work) != 0)
            break; /* fewer threads: the items still all get taken */
    worker(work);
    for (int t = 0; t < started; t++)
        pthread_join(helpers[t], NULL);
}

/* When torch has loaded an OpenMP runtime, its worker threads spin for a while after each parallel op,
 * waiting for the next one: threads of our own would share the cores with them. A batch then runs as
 * a parallel region of that runtime instead (GOMP_parallel: libgomp's entry point, which LLVM's and
 * Intel's runtimes also provide), on the threads that are already spinning. Looked up in the process
 * only (RTLD_NOLOAD), never loaded by sqz. */
typedef void (*gomp_parallel_fn)(void (*)(void *), void *, unsigned, unsigned);

static gomp_parallel_fn openmp_parallel(void)
{
    static gomp_parallel_fn found;
    static const char *const names[] = {"libgomp.so.1", "libomp.so", "libiomp5.so", "libomp.dylib"};
    for (size_t i = 0; !found && i < sizeof names / sizeof *names; i++) {
        void *lib = dlopen(names[i], RTLD_NOW | RTLD_NOLOAD);
        if (lib)
            *(void **)&found = dlsym(lib, "GOMP_parallel"); /* the handle stays open with the runtime */
    }
    return found;
}

static void openmp_worker(void *work) { worker(work); }

/* A grouped job's parameters (3 bytes a group, the groups dividing its count) and axis; each group's centre must lie
 * within the codebook (spec §4.2). */
static int take_params(Job *job, PyObject *params_obj, int axis)
{
    if (PyObject_GetBuffer(params_obj, &job->params, PyBUF_C_CONTIGUOUS) < 0)
        return -1;
    job->groups = job->params.len / 3;
    if (job->params.len % 3 || job->groups < 1 || job->count % job->groups || job->groups > job->count / job->groups
        || (axis != 0 && axis != 1)) {
        PyErr_SetString(PyExc_ValueError, "a grouped rANS job needs 3 bytes of params for each of 1 or more groups "
                                          "that divide its count, no more groups than indices in each (spec §4.2), "
                                          "and an axis of 0 or 1");
        return -1;
    }
    const uint8_t *params = job->params.buf;
    for (Py_ssize_t g = 0; g < job->groups; g++)
        if ((params[3 * g] | params[3 * g + 1] << 8) > 16 * ((int)job->entries - 1)) {
            PyErr_SetString(PyExc_ValueError, "a grouped rANS job's centre lies past its last table entry");
            return -1;
        }
    job->transposed = axis;
    return 0;
}

static int take_model(Job *job, PyObject *counts_obj)
{
    Py_buffer counts;
    if (PyObject_GetBuffer(counts_obj, &counts, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0)
        return -1;
    int ok = counts.itemsize == 8 && counts.len == 8 * (Py_ssize_t)job->entries;
    if (!ok)
        PyErr_SetString(PyExc_ValueError, "a rANS job's counts must be one uint64 per table entry");
    else if (job->entries > 256 && !(job->cdf = PyMem_Malloc((job->entries + 1) * sizeof *job->cdf))) {
        PyErr_NoMemory();
        ok = 0;
    } else if (!rans_model(counts.buf, (int)job->entries, job->cdf))
        job->status = JOB_RANS;
    PyBuffer_Release(&counts);
    return ok ? 0 : -1;
}

static int take_job(PyObject *spec, Job *job)
{
    PyObject *table_obj, *out_obj, *counts_obj = Py_None, *params_obj = Py_None;
    int axis = 0;
    if (!PyArg_ParseTuple(spec, "y*niOOi|OOii;a job is (stream, count, bits, table, out, frame[, counts[, params, axis[, "
                          "trellis]]])", &job->stream, &job->count, &job->bits, &table_obj, &out_obj, &job->frame,
                          &counts_obj, &params_obj, &axis, &job->trellis))
        return -1;
    job->groups = 1;
    /* FORMAT so that itemsize is the element size, not 1 */
    if (PyObject_GetBuffer(table_obj, &job->table, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0)
        return -1;
    if (PyObject_GetBuffer(out_obj, &job->out, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | PyBUF_WRITABLE) < 0)
        return -1;
    const Py_ssize_t item = job->table.itemsize;
    const Py_ssize_t entries = item ? job->table.len / item : 0;
    if (job->frame == FRAME_RANS ? job->bits != 8 && job->bits != 16 : job->bits < 1 || job->bits > 8) {
        PyErr_SetString(PyExc_ValueError, "bits must be in [1, 8], or 8 or 16 for a rANS job");
        return -1;
    }
    if (job->count < 0) {
        PyErr_SetString(PyExc_ValueError, "count must be >= 0");
        return -1;
    }
    const Py_ssize_t most = job->bits == 16 ? RANS_MAX_SYMBOLS : 1 << job->bits;
    if ((item != 1 && item != 2 && item != 4 && item != 8) || entries < 1 || entries > most) {
        PyErr_SetString(PyExc_ValueError, "table must hold 1 to 2**bits (a rANS job at 16: 4096) entries of 1, 2, 4 "
                                          "or 8 bytes");
        return -1;
    }
    if (job->frame < FRAME_PACKED || job->frame > FRAME_RANS) {
        PyErr_SetString(PyExc_ValueError, "frame must be 0 (packed), 1 (zstd) or 2 (rANS)");
        return -1;
    }
    if (job->frame == FRAME_ZSTD && !zstd.decompress) {
        PyErr_SetString(PyExc_ValueError, "zstd frames need libzstd, which was not found (HAS_ZSTD)");
        return -1;
    }
    if (job->frame == FRAME_RANS && (counts_obj == Py_None) == (params_obj == Py_None)) {
        PyErr_SetString(PyExc_ValueError, "a rANS job needs its counts, or (grouped) its params");
        return -1;
    }
    if (job->frame == FRAME_PACKED && job->stream.len != (job->count * job->bits + 7) / 8) {
        PyErr_SetString(PyExc_ValueError, "packed stream has the wrong length");
        return -1;
    }
    if (job->out.itemsize != item || job->out.len != job->count * item) {
        PyErr_SetString(PyExc_ValueError, "out must hold count entries of the table's type");
        return -1;
    }
    job->entries = (uint64_t)entries;
    job->status = JOB_OK;
    if (job->trellis && (job->frame != FRAME_RANS || params_obj == Py_None || entries < 4)) {
        PyErr_SetString(PyExc_ValueError, "a trellis job is a grouped rANS job of 4 or more table entries");
        return -1;
    }
    if (job->frame == FRAME_RANS) { /* its indices are symbols of the model: gather reads the table itself */
        job->cdf = job->cdf_inline;
        return params_obj != Py_None ? take_params(job, params_obj, axis) : take_model(job, counts_obj);
    }
    memset(job->padded, 0, sizeof job->padded);
    memcpy(job->padded, job->table.buf, job->table.len);
    return 0;
}

static PyObject *lookup_many(PyObject *Py_UNUSED(self), PyObject *args)
{
    PyObject *specs_obj, *result = NULL;
    int threads;
    if (!PyArg_ParseTuple(args, "Oi", &specs_obj, &threads))
        return NULL;
    PyObject *specs = PySequence_Fast(specs_obj, "jobs must be a sequence");
    if (!specs)
        return NULL;
    const Py_ssize_t n_jobs = PySequence_Fast_GET_SIZE(specs);
    Job *jobs = PyMem_Calloc(n_jobs ? n_jobs : 1, sizeof(Job));
    Py_ssize_t taken = 0, n_items = 0;
    Item *items = NULL;
    if (!jobs) {
        PyErr_NoMemory();
        goto done;
    }
    for (; taken < n_jobs; taken++) {
        if (take_job(PySequence_Fast_GET_ITEM(specs, taken), &jobs[taken]) < 0) {
            taken++; /* its buffers that were taken are released below */
            goto done;
        }
        const Py_ssize_t groups = jobs[taken].count / 8;
        n_items += groups && jobs[taken].frame == FRAME_PACKED ? (groups + CHUNK_GROUPS - 1) / CHUNK_GROUPS : 1;
    }
    items = PyMem_Malloc((n_items ? n_items : 1) * sizeof(Item));
    if (!items) {
        PyErr_NoMemory();
        goto done;
    }
    Py_ssize_t k = 0, n_rans = 0;
    for (Py_ssize_t j = 0; j < n_jobs; j++) /* the rANS jobs first: run_rans takes them from the front */
        if (jobs[j].frame == FRAME_RANS)
            items[k++] = (Item){&jobs[j], 0, jobs[j].count / 8};
    n_rans = k;
    for (Py_ssize_t j = 0; j < n_jobs; j++) {
        if (jobs[j].frame == FRAME_RANS)
            continue;
        const Py_ssize_t groups = jobs[j].count / 8;
        Py_ssize_t g = 0;
        do { /* a frame is decoded whole: its job is one item */
            const Py_ssize_t size = groups - g < CHUNK_GROUPS || jobs[j].frame != FRAME_PACKED ? groups - g : CHUNK_GROUPS;
            items[k++] = (Item){&jobs[j], g, size};
            g += size;
        } while (g < groups);
    }
    Work work = {items, n_items, n_rans, n_rans, 0};
    if (threads < 1)
        threads = 1;
    if (threads > MAX_THREADS)
        threads = MAX_THREADS;
    if (threads > n_items)
        threads = (int)n_items;
    const gomp_parallel_fn parallel = threads > 1 ? openmp_parallel() : NULL;
    Py_BEGIN_ALLOW_THREADS
    if (parallel)
        parallel(openmp_worker, &work, (unsigned)threads, 0);
    else
        run_on_threads(&work, threads);
    Py_END_ALLOW_THREADS
    if (work.next < n_items || work.next_rans < n_rans) { /* not even the calling thread got its scratch */
        PyErr_NoMemory();
        goto done;
    }
    result = PyList_New(0);
    for (Py_ssize_t j = 0; result && j < n_jobs; j++) {
        if (jobs[j].status == JOB_OK)
            continue;
        PyObject *problem = Py_BuildValue("(ns)", j, JOB_PROBLEMS[jobs[j].status]);
        if (!problem || PyList_Append(result, problem) < 0)
            Py_CLEAR(result);
        Py_XDECREF(problem);
    }
done:
    for (Py_ssize_t j = 0; j < taken; j++) {
        if (jobs[j].stream.obj)
            PyBuffer_Release(&jobs[j].stream);
        if (jobs[j].table.obj)
            PyBuffer_Release(&jobs[j].table);
        if (jobs[j].out.obj)
            PyBuffer_Release(&jobs[j].out);
        if (jobs[j].params.obj)
            PyBuffer_Release(&jobs[j].params);
        if (jobs[j].cdf != jobs[j].cdf_inline)
            PyMem_Free(jobs[j].cdf);
    }
    PyMem_Free(items);
    PyMem_Free(jobs);
    Py_DECREF(specs);
    return result;
}

/* grid_codebook(section, k) -> (entries, used): a GRID codebook (spec §4.2, format 2.2) read from the start of
 * `section`: k float32 entries as bytes and the bytes the codebook took. grid.py's numpy reader is the reference;
 * this one exists because reading a small codebook in numpy costs ~100 µs of call overheads, as much as the
 * lookup of a whole small tensor. Raises ValueError with the reference's message for bytes that break §4.2. */
#define GRID_MAX_MANTISSA (1LL << 24)
#define GRID_MAX_REMAINDER_BITS 24
#define GRID_MAX_ENTRIES 4096

static PyObject *grid_error(const char *what)
{
    PyErr_Format(PyExc_ValueError, "GRID codebook%s", what);
    return NULL;
}

static PyObject *grid_codebook(PyObject *Py_UNUSED(self), PyObject *args)
{
    Py_buffer view;
    Py_ssize_t k;
    if (!PyArg_ParseTuple(args, "y*n", &view, &k))
        return NULL;
    const uint8_t *b = view.buf;
    const Py_ssize_t size = view.len;
    PyObject *result = NULL;
    float *entries = NULL;
    int64_t *mantissas = NULL;
    if (k < 1 || k > GRID_MAX_ENTRIES) {
        PyErr_SetString(PyExc_ValueError, "k must be 1..4096");
        goto done;
    }
    if (size < 3) {
        grid_error(" truncated");
        goto done;
    }
    const int exponent = (int8_t)b[0], p = b[1];
    if (p > GRID_MAX_REMAINDER_BITS) {
        PyErr_Format(PyExc_ValueError, "GRID Rice width %d exceeds %d", p, GRID_MAX_REMAINDER_BITS);
        goto done;
    }
    uint64_t zigzag = 0;
    Py_ssize_t at = 2;
    for (int i = 0;; i++) {
        if (i == 4) {
            grid_error(": m_0 takes more than 4 bytes");
            goto done;
        }
        if (at >= size) {
            grid_error(" truncated");
            goto done;
        }
        const uint8_t byte = b[at++];
        zigzag |= (uint64_t)(byte & 0x7F) << (7 * i);
        if (!(byte & 0x80)) {
            if (byte == 0 && i) {
                grid_error(": m_0 is not in its shortest form");
                goto done;
            }
            break;
        }
    }
    int64_t m = (int64_t)(zigzag >> 1) ^ -(int64_t)(zigzag & 1);
    const int64_t first = m;
    entries = PyMem_Malloc((size_t)k * sizeof *entries);
    mantissas = PyMem_Malloc((size_t)k * sizeof *mantissas);
    if (!entries || !mantissas) {
        PyErr_NoMemory();
        goto done;
    }
    mantissas[0] = m;
    if (k > 1) {
        const Py_ssize_t gaps = k - 1, low_end = at + (gaps * p + 7) / 8;
        if (low_end > size) {
            grid_error(" truncated");
            goto done;
        }
        for (Py_ssize_t bit = gaps * p; bit < 8 * (low_end - at); bit++)
            if (b[at + bit / 8] >> (bit % 8) & 1) {
                grid_error(": unused bits are not zero");
                goto done;
            }
        Py_ssize_t cursor = 8 * low_end; /* bit position of the unary part */
        for (Py_ssize_t i = 0; i < gaps; i++) {
            int64_t low = 0;
            for (int t = 0; t < p; t++) {
                const Py_ssize_t bit = i * p + t;
                low |= (int64_t)(b[at + bit / 8] >> (bit % 8) & 1) << t;
            }
            int64_t q = 0;
            for (;; cursor++, q++) {
                if (cursor >= 8 * size) {
                    grid_error(" truncated");
                    goto done;
                }
                if (b[cursor / 8] >> (cursor % 8) & 1)
                    break;
            }
            cursor++;
            if (q >= GRID_MAX_MANTISSA) {
                grid_error(": a mantissa is out of range");
                goto done;
            }
            m += (q << p) + low + 1;
            mantissas[i + 1] = m;
        }
        at = (cursor + 7) / 8;
        for (; cursor < 8 * at; cursor++)
            if (b[cursor / 8] >> (cursor % 8) & 1) {
                grid_error(": unused bits are not zero");
                goto done;
            }
    }
    if (llabs(first) >= GRID_MAX_MANTISSA || llabs(m) >= GRID_MAX_MANTISSA) {
        grid_error(": a mantissa is out of range");
        goto done;
    }
    for (Py_ssize_t i = 0; i < k; i++) {
        const double value = ldexp((double)mantissas[i], exponent);
        if (!(fabs(value) <= FLT_MAX)) {
            grid_error(": an entry is not finite as float32");
            goto done;
        }
        entries[i] = (float)value;
    }
    result = Py_BuildValue("(y#n)", (const char *)entries, (Py_ssize_t)(k * sizeof *entries), at);
done:
    PyMem_Free(entries);
    PyMem_Free(mantissas);
    PyBuffer_Release(&view);
    return result;
}

static PyMethodDef methods[] = {
    {"grid_codebook", grid_codebook, METH_VARARGS,
     "grid_codebook(section, k) -> (float32 entries as bytes, bytes used): a GRID codebook (spec 4.2)."},
    {"lookup_many", lookup_many, METH_VARARGS,
     "lookup_many(jobs, threads) -> [(job, problem)] for the jobs that failed: 'index' (outside the table),\n"
     "for zstd frames 'frame' (not one good zstd frame), 'size' (wrong content size), 'padding' (unused\n"
     "bits of the last byte set), for rANS streams 'rans' (a last word of zero, or counts with no model)\n"
     "or 'rans-left' (data left after the last index), and 'memory' (no room to decode the stream).\n"
     "Each job is (stream, count, bits, table, out, frame[, counts[, params, axis]]): out[i] = table[index i of the b-bit\n"
     "stream]; frame 1: the stream is a zstd frame of it (only when HAS_ZSTD); frame 2: a rANS stream of\n"
     "indices under the model of counts (uint64, one per table entry), with b = 8 (up to 256 entries) or\n"
     "16 (up to 4096); or, counts None, a rans-grouped stream (format 2.4) of the matrix's rows (axis 0) or\n"
     "columns (axis 1) in turn, each under the discrete Gaussian of its 3 bytes of params."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, .m_name = "sqz._lookup", .m_size = -1, .m_methods = methods};

static void find_zstd(void)
{
    static const char *const names[] = {"libzstd.so.1", "libzstd.1.dylib", "libzstd.so"};
    for (size_t i = 0; i < sizeof names / sizeof *names; i++) {
        void *lib = dlopen(names[i], RTLD_NOW | RTLD_LOCAL);
        if (!lib)
            continue;
        *(void **)&zstd.create = dlsym(lib, "ZSTD_createDCtx");
        *(void **)&zstd.free = dlsym(lib, "ZSTD_freeDCtx");
        *(void **)&zstd.content_size = dlsym(lib, "ZSTD_getFrameContentSize");
        *(void **)&zstd.frame_size = dlsym(lib, "ZSTD_findFrameCompressedSize");
        *(void **)&zstd.is_error = dlsym(lib, "ZSTD_isError");
        *(void **)&zstd.decompress = dlsym(lib, "ZSTD_decompressDCtx");
        if (zstd.create && zstd.free && zstd.content_size && zstd.frame_size && zstd.is_error && zstd.decompress)
            return; /* the library stays loaded for the life of the process */
        memset(&zstd, 0, sizeof zstd);
        dlclose(lib);
    }
}

PyMODINIT_FUNC PyInit__lookup(void)
{
    find_zstd();
    make_exp2_table();
    PyObject *m = PyModule_Create(&module);
    if (m && PyModule_AddIntConstant(m, "HAS_ZSTD", zstd.decompress != NULL) < 0)
        Py_CLEAR(m);
    return m;
}
