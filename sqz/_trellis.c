/* sqz._trellis: the encoder's side of trellis-coded quantization (format 2.5, entropy stage rans-trellis), in C.
 *
 * The trellis (spec §4.2, rans-trellis) has 8 states; state s allows the indices of one class, c(s) = i mod 2, and
 * the index taken decides the next state by i mod 4. Values are quantized to a path through it, which the indices
 * spell out, so that a value may go to only half the levels (those of its state's class) while its neighbours'
 * choices make up for that: a granular gain of about 1 dB over a scalar quantizer at the same entropy (Marcellin and
 * Fischer's TCQ with entropy coding, ECTCQ).
 *
 * The values come in the stream's order, G groups of n / G (spec §4.2 rans-grouped: a factor's components), each
 * group with its own model.
 *
 * viterbi(values, levels, bits, slope) finds the path of least squared error plus slope times the bits of its
 * indices (index i in group g costs bits[g * k + i], the encoder's model of its class in that group), over float64
 * values and k increasing float64 levels; it returns the indices as uint16 bytes. Each step keeps, per state, the
 * best path into it: for each of the 4 subsets (i mod 4) the best index near the value, then the 2 ways into each of
 * the 8 states; it keeps one bit a state a step (which way) and each subset's best index (8 bytes a step), and reads
 * the path's indices back from them.
 *
 * encode(indices, counts, groups) codes them as the rans-trellis stream: one rANS stack (spec §4.2 `rans`, u64 state, u32
 * words, 24-bit probabilities) in which each index i is coded as i div 2 under the model of its state's class in its
 * group, built by the `rans` formula from the counts (G x k uint64) of that class's indices in the group. It returns
 * the stream's words (little-endian), last word in full. Both run without the GIL.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "_entropy_spec.h"

#define MAX_SYMBOLS 4096

static int get_buffer(PyObject *object, Py_buffer *view, Py_ssize_t itemsize, const char *what)
{
    if (PyObject_GetBuffer(object, view, PyBUF_C_CONTIGUOUS) < 0)
        return 0;
    if (view->len % itemsize) {
        PyErr_Format(PyExc_ValueError, "%s: a whole number of %zd-byte items expected", what, itemsize);
        PyBuffer_Release(view);
        return 0;
    }
    return 1;
}

typedef struct {
    const double *level; /* increasing, near a uniform grid */
    Py_ssize_t k;
    double origin, per_level, slope;
} Grid;

/* The best index of each subset (i mod 4) for the value v, and its cost (squared error + slope x bits): its nearest
 * levels either side (the next ones out changed no path in tests). Selects, not branches: which way each goes depends
 * on the data. */
static inline void subset_bests(const Grid *grid, double v, const double *bits, double best[4], int index[4])
{
    const Py_ssize_t k = grid->k;
    const double guess = (v - grid->origin) * grid->per_level + 1; /* lo: the first level above v */
    Py_ssize_t lo = guess <= 0 ? 0 : guess >= (double)k ? k : (Py_ssize_t)guess;
    while (lo > 0 && grid->level[lo - 1] > v)
        lo--;
    while (lo < k && grid->level[lo] <= v)
        lo++;
    for (int j = 0; j < 4; j++) {
        const Py_ssize_t tried[2] = {lo - 1 - ((lo - 1 - j) & 3), lo + ((j - lo) & 3)};
        best[j] = INFINITY;
        index[j] = 0;
        for (int c = 0; c < 2; c++) {
            const Py_ssize_t i = tried[c];
            const int inside = i >= 0 && i < k;
            const Py_ssize_t at = inside ? i : 0;
            const double d = v - grid->level[at], e = inside ? d * d + grid->slope * bits[at] : INFINITY;
            const int better = e < best[j];
            best[j] = better ? e : best[j];
            index[j] = better ? (int)at : index[j];
        }
    }
}

static PyObject *viterbi(PyObject *self, PyObject *args)
{
    PyObject *values_obj, *levels_obj, *bits_obj;
    double slope;
    if (!PyArg_ParseTuple(args, "OOOd", &values_obj, &levels_obj, &bits_obj, &slope))
        return NULL;
    Py_buffer vb, lb, bb;
    if (!get_buffer(values_obj, &vb, 8, "values"))
        return NULL;
    if (!get_buffer(levels_obj, &lb, 8, "levels")) {
        PyBuffer_Release(&vb);
        return NULL;
    }
    if (!get_buffer(bits_obj, &bb, 8, "bits")) {
        PyBuffer_Release(&vb);
        PyBuffer_Release(&lb);
        return NULL;
    }
    const Py_ssize_t n = vb.len / 8, k = lb.len / 8, groups = k ? bb.len / 8 / k : 0;
    PyObject *result = NULL;
    if (k < 4 || k > MAX_SYMBOLS || groups < 1 || bb.len / 8 != groups * k || n % groups) {
        PyErr_SetString(PyExc_ValueError, "viterbi: 4 to 4096 levels, and a bit cost for each in each of the groups "
                                          "that divide the values");
        goto done;
    }
    const Py_ssize_t length = n / groups;
    result = PyBytes_FromStringAndSize(NULL, 2 * n);
    uint8_t *second = malloc((size_t)n + 1); /* bit s of second[t]: the best path into state s at t came its second way */
    uint16_t *nearest = malloc(4 * ((size_t)n + 1) * sizeof *nearest); /* each subset's best index at each t */
    if (!result || !second || !nearest) {
        free(second);
        free(nearest);
        Py_XDECREF(result);
        result = PyErr_NoMemory();
        goto done;
    }
    const Grid grid = {lb.buf, k, ((const double *)lb.buf)[0],
                       (double)(k - 1) / (((const double *)lb.buf)[k - 1] - ((const double *)lb.buf)[0]), slope};
    const double *x = vb.buf, *bits = bb.buf;
    uint16_t *out = (uint16_t *)PyBytes_AS_STRING(result);
    Py_BEGIN_ALLOW_THREADS
    int from[TRELLIS_STATES][2], subset[TRELLIS_STATES][2]; /* the two ways into each state: (state, subset) */
    int ways[TRELLIS_STATES] = {0};
    for (int s = 0; s < TRELLIS_STATES; s++)
        for (int j = TRELLIS_CLASS(s); j < 4; j += 2) {
            const int to = TRELLIS_NEXT(s, j >> 1);
            from[to][ways[to]] = s;
            subset[to][ways[to]++] = j;
        }
    double cost[TRELLIS_STATES], next[TRELLIS_STATES], best[4];
    int index[4];
    for (int s = 0; s < TRELLIS_STATES; s++)
        cost[s] = s ? INFINITY : 0.0;
    const double *cost_of = bits; /* the bits of t's group */
    for (Py_ssize_t t = 0, in_group = 0; t < n; t++, in_group++) {
        if (in_group == length)
            cost_of += k, in_group = 0;
        subset_bests(&grid, x[t], cost_of, best, index);
        for (int j = 0; j < 4; j++)
            nearest[4 * t + j] = (uint16_t)index[j];
        uint8_t seconds = 0;
        for (int to = 0; to < TRELLIS_STATES; to++) {
            const double a = cost[from[to][0]] + best[subset[to][0]], b = cost[from[to][1]] + best[subset[to][1]];
            const int way = b < a;
            next[to] = way ? b : a;
            seconds |= (uint8_t)(way << to);
        }
        second[t] = seconds;
        memcpy(cost, next, sizeof cost);
    }
    int s = 0;
    for (int q = 1; q < TRELLIS_STATES; q++)
        if (cost[q] < cost[s])
            s = q;
    for (Py_ssize_t t = n - 1; t >= 0; t--) { /* back along the best path, each index found again */
        const int way = second[t] >> s & 1;
        out[t] = nearest[4 * t + subset[s][way]];
        s = from[s][way];
    }
    Py_END_ALLOW_THREADS
    free(second);
    free(nearest);
done:
    PyBuffer_Release(&vb);
    PyBuffer_Release(&lb);
    PyBuffer_Release(&bb);
    return result;
}

static PyObject *encode(PyObject *self, PyObject *args)
{
    PyObject *indices_obj, *counts_obj;
    Py_ssize_t groups;
    if (!PyArg_ParseTuple(args, "OOn", &indices_obj, &counts_obj, &groups))
        return NULL;
    Py_buffer ib, cb;
    if (!get_buffer(indices_obj, &ib, 2, "indices"))
        return NULL;
    if (!get_buffer(counts_obj, &cb, 8, "counts")) {
        PyBuffer_Release(&ib);
        return NULL;
    }
    PyObject *result = NULL;
    const Py_ssize_t n = ib.len / 2;
    const Py_ssize_t k = groups > 0 ? cb.len / 8 / groups : 0, length = groups > 0 ? n / groups : 0;
    const uint16_t *index = ib.buf;
    const uint64_t *counts = cb.buf;
    uint32_t *cdf = NULL, *words = NULL;
    uint8_t *classes = NULL;
    if (k < 4 || k > MAX_SYMBOLS || cb.len != 8 * groups * k || n % groups) {
        PyErr_SetString(PyExc_ValueError, "encode: 4 to 4096 counts for each of the groups that divide the indices");
        goto done;
    }
    cdf = malloc((size_t)groups * (k + 2) * sizeof *cdf); /* each group's class 0 model, then its class 1 model */
    if (!cdf) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t g = 0; g < groups; g++) {
        uint32_t *own = cdf + g * (k + 2);
        const Py_ssize_t k0 = (k + 1) / 2; /* class 0's indices 0, 2, ...: its model, then class 1's (1, 3, ...) */
        if (!rans_model_strided(counts + g * k, 2, k0, own)
            || !rans_model_strided(counts + g * k + 1, 2, k / 2, own + k0 + 1)) {
            PyErr_SetString(PyExc_ValueError, "encode: a group's counts make no model for a class");
            goto done;
        }
    }
    classes = malloc((size_t)n + 1);
    words = malloc(((size_t)n + 2) * sizeof(uint32_t)); /* at most one word a symbol, and the state's two */
    if (!classes || !words) {
        PyErr_NoMemory();
        goto done;
    }
    int state = 0;
    for (Py_ssize_t t = 0; t < n; t++) { /* the class each index is coded in: the trellis walked forwards */
        const int i = index[t];
        if (i >= k || (i & 1) != TRELLIS_CLASS(state)) {
            PyErr_Format(PyExc_ValueError, "encode: index %d at %zd is not on the trellis", i, t);
            goto done;
        }
        classes[t] = (uint8_t)TRELLIS_CLASS(state);
        state = TRELLIS_NEXT(state, (i & 3) >> 1);
    }
    Py_ssize_t pushed = 0;
    Py_BEGIN_ALLOW_THREADS
    uint64_t x = 0;
    for (Py_ssize_t t = n - 1; t >= 0; t--) { /* a stack: the last index first, so that they decode in order */
        const uint32_t *model = cdf + (t / length) * (k + 2) + (classes[t] ? (k + 1) / 2 + 1 : 0);
        const int symbol = index[t] >> 1;
        const uint64_t start = model[symbol], frequency = model[symbol + 1] - start;
        if ((x >> (64 - RANS_PRECISION)) >= frequency) {
            words[pushed++] = (uint32_t)x;
            x >>= 32;
        }
        x = ((x / frequency) << RANS_PRECISION) + x % frequency + start;
    }
    if (x) { /* the state's words: its low word, then its high one unless that is 0 (the last word is never 0) */
        words[pushed++] = (uint32_t)x;
        if (x >> 32)
            words[pushed++] = (uint32_t)(x >> 32);
    }
    Py_END_ALLOW_THREADS
    result = PyBytes_FromStringAndSize((const char *)words, pushed * (Py_ssize_t)sizeof(uint32_t));
done:
    free(cdf);
    free(classes);
    free(words);
    PyBuffer_Release(&ib);
    PyBuffer_Release(&cb);
    return result;
}

static PyMethodDef methods[] = {
    {"viterbi", viterbi, METH_VARARGS,
     "viterbi(values, levels, bits, slope) -> uint16 bytes: the trellis path of least squared error + slope x bits"},
    {"encode", encode, METH_VARARGS,
     "encode(indices, counts, groups) -> bytes: the rans-trellis stream of uint16 indices on the trellis, under the "
     "models of the uint64 counts (groups x k)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, .m_name = "sqz._trellis", .m_size = -1, .m_methods = methods};

PyMODINIT_FUNC PyInit__trellis(void) { return PyModule_Create(&module); }
