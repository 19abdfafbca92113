/* sqz._kmeans: optimal 1-D k-means over a histogram, in C (optional; quantize.py falls back to kmeans1d).
 *
 * pattern_counts(patterns) counts a 16-bit tensor's values by bit pattern (its histogram, 65,536 int64 counts):
 * 2-3 ns a value, where np.bincount first widens every pattern to int64 (~8 ns).
 *
 * fit(weight, sum, sum_sq, ks) takes n bins in increasing order of value, each given by its weight (the
 * count of values in it), the sum of those values and the sum of their squares (float64 buffers), and
 * returns, for each k of the increasing sequence ks, the k starting bins of the partition into k runs of
 * consecutive bins with the least total squared error, as bytes holding k int32 (bin 0 first). One run of
 * the programme serves every k up to the largest: row m of the table is the best partition into m + 1 runs.
 * A float16 tensor has at most 65,536 distinct values, one bin each, so this is the exact optimum over every
 * value of the tensor at O(n) input size.
 *
 * The dynamic programme: D[m][i] = min over j of D[m-1][j-1] + cost(j..i), cost from prefix sums. The best j
 * never decreases as i grows (the squared-error cost is Monge), so each of the k rows is filled by divide
 * and conquer in O(n log n); the smallest best j is kept on ties, so the result is deterministic. Sums are
 * taken about the mean (less cancellation in sum_sq - sum^2/weight). Runs without the GIL.
 *
 * fit_entropy(weight, sum, start, slope, level_bits, max_iter) is the entropy-constrained Lloyd algorithm on the
 * same bins (entropy_constrained.py): the first bin of each cell of the quantizer that minimises squared error
 * plus slope times the bits of the indices and of the codebook, from the levels `start`. Also without the GIL.
 *
 * piece_sums(bins, piece_of_bin, values, rank, pieces, by_row) counts and sums a factor's values by component
 * (its rows where by_row, else its columns: the values in row-major order) and by piece, a piece being a run of
 * bins (ratecontrol.component_moments): one pass, where numpy took four (~13 ns a value). Without the GIL.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    const double *pw, *p1, *p2; /* prefix sums, n + 1 entries */
    const double *prev;         /* D[m-1][.] */
    double *cur;                /* D[m][.] */
    int32_t *arg;               /* best j of row m */
    const int32_t *below;       /* best j of row m-1: a lower bound on row m's */
} Row;

static inline double cost(const Row *r, Py_ssize_t j, Py_ssize_t i) {
    double w = r->pw[i + 1] - r->pw[j], s = r->p1[i + 1] - r->p1[j], e = r->p2[i + 1] - r->p2[j] - s * s / w;
    return e > 0 ? e : 0;
}

/* Fill cur[i] for i in [ilo, ihi], knowing the best j lies in [jlo, jhi]. Row m starts at bin m. */
static void fill(const Row *r, Py_ssize_t ilo, Py_ssize_t ihi, Py_ssize_t jlo, Py_ssize_t jhi) {
    while (ilo <= ihi) {
        Py_ssize_t mid = ilo + (ihi - ilo) / 2, stop = jhi < mid ? jhi : mid, start = jlo;
        if (r->below[mid] > start) start = r->below[mid];
        Py_ssize_t best = start;
        double value = r->prev[start - 1] + cost(r, start, mid);
        for (Py_ssize_t j = start + 1; j <= stop; j++) {
            double v = r->prev[j - 1] + cost(r, j, mid);
            if (v < value) value = v, best = j;
        }
        r->cur[mid] = value;
        r->arg[mid] = (int32_t)best;
        fill(r, ilo, mid - 1, jlo, best); /* recurse on the left, loop on the right */
        ilo = mid + 1, jlo = best;
    }
}

/* Prefix sums of weight, sum and sum of squares into pw[0..3n+2] (pw, then p1, then p2, n + 1 each), taken about
 * the mean c: sum (x-c)^2 = s2 - 2c s1 + c^2 w, less cancellation in sum_sq - sum^2/weight. */
static void prefix_sums(const double *w, const double *s1, const double *s2, Py_ssize_t n, double *pw) {
    double total_w = 0, total_s = 0;
    for (Py_ssize_t i = 0; i < n; i++) total_w += w[i], total_s += s1[i];
    double c = total_s / total_w, *p1 = pw + (n + 1), *p2 = p1 + (n + 1);
    pw[0] = p1[0] = p2[0] = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        pw[i + 1] = pw[i] + w[i];
        p1[i + 1] = p1[i] + (s1[i] - c * w[i]);
        p2[i + 1] = p2[i] + (s2[i] - 2 * c * s1[i] + c * c * w[i]);
    }
}

/* Fill the table up to row ks[count-1] - 1, then write each ks[c]'s starts at out[c]. */
static int solve(const double *w, const double *s1, const double *s2, Py_ssize_t n, const Py_ssize_t *ks,
                 Py_ssize_t count, int32_t **out) {
    Py_ssize_t k = ks[count - 1];
    double *pw = malloc(3 * (n + 1) * sizeof(double)), *rows = malloc(2 * n * sizeof(double));
    int32_t *arg = malloc((size_t)k * n * sizeof(int32_t));
    if (!pw || !rows || !arg) {
        free(pw), free(rows), free(arg);
        return -1;
    }
    prefix_sums(w, s1, s2, n, pw);
    Row r = {pw, pw + (n + 1), pw + 2 * (n + 1), rows, rows + n, arg, arg};
    for (Py_ssize_t i = 0; i < n; i++) rows[i] = cost(&r, 0, i), arg[i] = 0;
    for (Py_ssize_t m = 1; m < k; m++) { /* whole rows: every k <= kmax is read off at i = n - 1 */
        r.below = arg + (m - 1) * n, r.arg = arg + m * n;
        fill(&r, m, n - 1, m, n - 1);
        double *t = (double *)r.prev;
        r.prev = r.cur, r.cur = t;
    }
    for (Py_ssize_t c = 0; c < count; c++) {
        Py_ssize_t i = n - 1;
        for (Py_ssize_t m = ks[c] - 1; m >= 0; m--) {
            out[c][m] = m ? arg[m * n + i] : 0;
            i = out[c][m] - 1;
        }
    }
    free(pw), free(rows), free(arg);
    return 0;
}


/* One k, faster for large k: the Lagrangian relaxation. For a price lam per cluster, the best partition with
 * any number of clusters is one pass, E[t] = min over j of E[j] + cost(j..t-1) + lam (t bins), solved in
 * O(n log n) by decision monotonicity (a start j that loses to a later one at some bin loses at every later
 * bin: a deque of starts, each with the first bin where it wins). The cluster count falls as lam grows; a
 * lam whose optimum has exactly k clusters gives the optimal k-partition (any other k-partition would beat it
 * at that price). Bisection on lam finds one in ~30 passes against k rows of the full programme; where none is
 * found (a plateau of lam skipping k), the caller falls back to the full programme. Ties take fewer clusters. */
static Py_ssize_t priced(const Row *r, Py_ssize_t n, double lam, double *E, Py_ssize_t *count, int32_t *arg,
                         Py_ssize_t *start, Py_ssize_t *from) {
#define PRICED(j, i) (E[j] + cost(r, j, i) + lam)
#define WINS(a, b, i) (PRICED(a, i) < PRICED(b, i) || (PRICED(a, i) == PRICED(b, i) && count[a] < count[b]))
    Py_ssize_t head = 0, tail = 1;
    E[0] = 0, count[0] = 0, start[0] = 0, from[0] = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        while (tail - head > 1 && from[head + 1] <= i) head++;
        Py_ssize_t j = start[head];
        E[i + 1] = PRICED(j, i), count[i + 1] = count[j] + 1, arg[i] = (int32_t)j;
        Py_ssize_t c = i + 1; /* a cluster starting at the next bin */
        if (c == n) break;
        while (tail > head) {
            Py_ssize_t last = start[tail - 1], at = from[tail - 1] > c ? from[tail - 1] : c;
            if (WINS(c, last, at)) {
                tail--;
                continue;
            }
            Py_ssize_t lo = at + 1, hi = n;
            while (lo < hi) {
                Py_ssize_t mid = lo + (hi - lo) / 2;
                if (WINS(c, last, mid)) hi = mid;
                else lo = mid + 1;
            }
            if (lo < n) start[tail] = c, from[tail] = lo, tail++;
            break;
        }
        if (tail == head) start[tail] = c, from[tail] = c, tail++;
    }
#undef WINS
#undef PRICED
    return count[n];
}

#define PRICE_STEPS 100

/* The best partition into exactly k runs by bisection on the price; 1 when found (starts in out), 0 when no
 * price gives k, -1 when out of memory. */
static int solve_priced(const double *w, const double *s1, const double *s2, Py_ssize_t n, Py_ssize_t k,
                        int32_t *out) {
    double *pw = malloc(4 * (n + 1) * sizeof(double)); /* prefix sums, then E */
    Py_ssize_t *index = malloc(3 * (n + 1) * sizeof(Py_ssize_t));
    int32_t *arg = malloc(n * sizeof(int32_t));
    if (!pw || !index || !arg) {
        free(pw), free(index), free(arg);
        return -1;
    }
    double *E = pw + 3 * (n + 1);
    prefix_sums(w, s1, s2, n, pw);
    Row r = {pw, pw + (n + 1), pw + 2 * (n + 1), NULL, NULL, NULL, NULL};
    double lo = 0, hi = cost(&r, 0, n - 1) + 1; /* at hi one cluster wins: it is cheaper than any split */
    int found = 0;
    for (int step = 0; step < PRICE_STEPS && !found; step++) {
        double lam = 0.5 * (lo + hi);
        Py_ssize_t got = priced(&r, n, lam, E, index, arg, index + (n + 1), index + 2 * (n + 1));
        if (got == k) found = 1;
        else if (got > k) lo = lam;
        else hi = lam;
    }
    if (found)
        for (Py_ssize_t m = k - 1, i = n - 1; m >= 0; m--) out[m] = arg[i], i = arg[i] - 1;
    free(pw), free(index), free(arg);
    return found;
}

static PyObject *fit_one(PyObject *self, PyObject *args) {
    Py_buffer w, s1, s2;
    Py_ssize_t k;
    PyObject *result = NULL;
    if (!PyArg_ParseTuple(args, "y*y*y*n", &w, &s1, &s2, &k)) return NULL;
    Py_ssize_t n = w.len / (Py_ssize_t)sizeof(double);
    if (w.len % sizeof(double) || s1.len != w.len || s2.len != w.len || n < 1 || n > INT32_MAX || k < 1 || k > n) {
        PyErr_SetString(PyExc_ValueError, "fit_one needs three float64 buffers of n >= 1 bins and 1 <= k <= n");
        goto done;
    }
    PyObject *starts = PyBytes_FromStringAndSize(NULL, k * (Py_ssize_t)sizeof(int32_t));
    if (!starts) goto done;
    int status;
    Py_BEGIN_ALLOW_THREADS
    status = solve_priced(w.buf, s1.buf, s2.buf, n, k, (int32_t *)PyBytes_AS_STRING(starts));
    Py_END_ALLOW_THREADS
    if (status == 1) result = starts;
    else {
        Py_DECREF(starts);
        if (status < 0) PyErr_NoMemory();
        else result = Py_NewRef(Py_None);
    }
done:
    PyBuffer_Release(&w), PyBuffer_Release(&s1), PyBuffer_Release(&s2);
    return result;
}

#define MAX_KS 64

static PyObject *fit(PyObject *self, PyObject *args) {
    Py_buffer w, s1, s2;
    PyObject *ks_obj, *result = NULL, *seq = NULL;
    if (!PyArg_ParseTuple(args, "y*y*y*O", &w, &s1, &s2, &ks_obj)) return NULL;
    Py_ssize_t n = w.len / (Py_ssize_t)sizeof(double), count = 0, ks[MAX_KS];
    int32_t *out[MAX_KS];
    if (w.len % sizeof(double) || s1.len != w.len || s2.len != w.len || n < 1 || n > INT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "fit needs three float64 buffers of n >= 1 bins");
        goto done;
    }
    if (!(seq = PySequence_Fast(ks_obj, "ks must be a sequence of ints"))) goto done;
    count = PySequence_Fast_GET_SIZE(seq);
    if (count < 1 || count > MAX_KS) {
        PyErr_SetString(PyExc_ValueError, "fit takes 1 to 64 values of k");
        goto done;
    }
    for (Py_ssize_t c = 0; c < count; c++) {
        ks[c] = PyLong_AsSsize_t(PySequence_Fast_GET_ITEM(seq, c));
        if (ks[c] == -1 && PyErr_Occurred()) goto done;
        if (ks[c] < 1 || ks[c] > n || (c && ks[c] <= ks[c - 1])) {
            PyErr_SetString(PyExc_ValueError, "ks must increase, each 1 <= k <= n");
            goto done;
        }
    }
    if (!(result = PyList_New(count))) goto done;
    for (Py_ssize_t c = 0; c < count; c++) {
        PyObject *starts = PyBytes_FromStringAndSize(NULL, ks[c] * (Py_ssize_t)sizeof(int32_t));
        if (!starts) {
            Py_CLEAR(result);
            goto done;
        }
        PyList_SET_ITEM(result, c, starts);
        out[c] = (int32_t *)PyBytes_AS_STRING(starts);
    }
    int status;
    Py_BEGIN_ALLOW_THREADS
    status = solve(w.buf, s1.buf, s2.buf, n, ks, count, out);
    Py_END_ALLOW_THREADS
    if (status) {
        Py_CLEAR(result);
        PyErr_NoMemory();
    }
done:
    Py_XDECREF(seq);
    PyBuffer_Release(&w), PyBuffer_Release(&s1), PyBuffer_Release(&s2);
    return result;
}

/* Entropy-constrained Lloyd (Chou, Lookabaugh and Gray) on the same histogram: cells minimise
 * (x - c)^2 + slope * (-log2 p), so each value goes to the level of least cost, which for levels in increasing
 * order is the lower envelope of lines in x (a level that never attains it empties); then every level moves
 * to its cell's mean and p to its cell's share. A level's own bits in the codebook are shared out over its cell's
 * values: its code length is -log2 p + level_bits / count, so a level that few values use does not pay.
 * Iterates until no cell boundary moves (or max_iter). Writes the first bin of each non-empty cell to `out`
 * (room for k) and returns how many. */
static Py_ssize_t entropy_fit(const double *pw, const double *p1, const double *centers, Py_ssize_t n,
                              const double *start, Py_ssize_t k, double slope, double level_bits, int max_iter,
                              double *c, double *len,
                              Py_ssize_t *keep, double *t, Py_ssize_t *edge, Py_ssize_t *prev, int32_t *out) {
    Py_ssize_t m = k, cells = 0;
    for (Py_ssize_t j = 0; j < k; j++) c[j] = start[j], len[j] = log2((double)k);
    for (int iter = 0; iter < max_iter; iter++) {
        Py_ssize_t top = 0; /* the envelope: keep[0..top) levels, t[i] the crossing of keep[i] and keep[i + 1] */
        for (Py_ssize_t j = 0; j < m; j++) {
            while (top > 0) {
                Py_ssize_t a = keep[top - 1];
                double x = (c[a] + c[j]) / 2 + slope * (len[j] - len[a]) / (2 * (c[j] - c[a]));
                if (top > 1 && x <= t[top - 2]) top--;
                else {
                    t[top - 1] = x;
                    break;
                }
            }
            keep[top++] = j;
        }
        edge[0] = 0; /* cell i holds bins edge[i] .. edge[i + 1] - 1: bins whose center is above t[i - 1] */
        for (Py_ssize_t i = 1; i < top; i++) {
            Py_ssize_t lo = edge[i - 1], hi = n;
            while (lo < hi) {
                Py_ssize_t mid = lo + (hi - lo) / 2;
                if (centers[mid] <= t[i - 1]) lo = mid + 1;
                else hi = mid;
            }
            edge[i] = lo;
        }
        edge[top] = n;
        int moved = iter == 0 || top != cells;
        Py_ssize_t used = 0;
        for (Py_ssize_t i = 0; i < top; i++) {
            double w = pw[edge[i + 1]] - pw[edge[i]];
            if (w <= 0) continue;
            if (!moved && prev[used] != edge[i]) moved = 1;
            prev[used] = edge[i];
            c[used] = (p1[edge[i + 1]] - p1[edge[i]]) / w;
            len[used] = -log2(w / pw[n]) + level_bits / w;
            used++;
        }
        if (!moved && used == cells) break;
        m = cells = used;
    }
    for (Py_ssize_t i = 0; i < cells; i++) out[i] = (int32_t)prev[i];
    return cells;
}

static PyObject *fit_entropy(PyObject *self, PyObject *args) {
    Py_buffer w, s1, start;
    double slope, level_bits;
    int max_iter;
    PyObject *result = NULL;
    if (!PyArg_ParseTuple(args, "y*y*y*ddi", &w, &s1, &start, &slope, &level_bits, &max_iter)) return NULL;
    Py_ssize_t n = w.len / (Py_ssize_t)sizeof(double), k = start.len / (Py_ssize_t)sizeof(double);
    if (w.len % sizeof(double) || s1.len != w.len || n < 1 || n > INT32_MAX || start.len % sizeof(double) ||
        k < 1 || k > n || !(slope >= 0) || !(level_bits >= 0) || max_iter < 1) {
        PyErr_SetString(PyExc_ValueError, "fit_entropy needs two float64 buffers of n >= 1 bins, 1 <= k <= n "
                                          "start levels, a slope >= 0, level_bits >= 0 and max_iter >= 1");
        goto release;
    }
    const double *st = start.buf;
    for (Py_ssize_t j = 1; j < k; j++)
        if (!(st[j] > st[j - 1])) {
            PyErr_SetString(PyExc_ValueError, "fit_entropy's start levels must increase");
            goto release;
        }
    double *pw = malloc((size_t)(n + 1) * sizeof(double)), *p1 = malloc((size_t)(n + 1) * sizeof(double));
    double *centers = malloc((size_t)n * sizeof(double)), *c = malloc((size_t)k * 3 * sizeof(double));
    Py_ssize_t *idx = malloc((size_t)(4 * k + 2) * sizeof(Py_ssize_t));
    int32_t *out = malloc((size_t)k * sizeof(int32_t));
    if (pw && p1 && centers && c && idx && out) {
        Py_ssize_t cells;
        Py_BEGIN_ALLOW_THREADS
        const double *wb = w.buf, *sb = s1.buf;
        pw[0] = p1[0] = 0;
        for (Py_ssize_t i = 0; i < n; i++) {
            pw[i + 1] = pw[i] + wb[i], p1[i + 1] = p1[i] + sb[i];
            centers[i] = sb[i] / wb[i];
        }
        cells = entropy_fit(pw, p1, centers, n, st, k, slope, level_bits, max_iter, c, c + k, idx, c + 2 * k, idx + k,
                            idx + 2 * k + 2, out);
        Py_END_ALLOW_THREADS
        result = PyBytes_FromStringAndSize((const char *)out, cells * (Py_ssize_t)sizeof(int32_t));
    } else
        PyErr_NoMemory();
    free(pw), free(p1), free(centers), free(c), free(idx), free(out);
release:
    PyBuffer_Release(&w), PyBuffer_Release(&s1), PyBuffer_Release(&start);
    return result;
}

#define PATTERNS 65536

static PyObject *pattern_counts(PyObject *self, PyObject *args) {
    Py_buffer p;
    if (!PyArg_ParseTuple(args, "y*", &p)) return NULL;
    PyObject *result = NULL;
    if (p.len % (Py_ssize_t)sizeof(uint16_t)) {
        PyErr_SetString(PyExc_ValueError, "pattern_counts needs a buffer of uint16 patterns");
        goto done;
    }
    if (!(result = PyBytes_FromStringAndSize(NULL, PATTERNS * (Py_ssize_t)sizeof(int64_t)))) goto done;
    int64_t *counts = (int64_t *)PyBytes_AS_STRING(result);
    const uint16_t *v = p.buf;
    Py_ssize_t n = p.len / (Py_ssize_t)sizeof(uint16_t);
    Py_BEGIN_ALLOW_THREADS
    memset(counts, 0, PATTERNS * sizeof(int64_t));
    for (Py_ssize_t i = 0; i < n; i++) counts[v[i]]++;
    Py_END_ALLOW_THREADS
done:
    PyBuffer_Release(&p);
    return result;
}

static PyObject *piece_sums(PyObject *self, PyObject *args) {
    Py_buffer b, lut, v;
    Py_ssize_t rank, pieces;
    int by_row;
    if (!PyArg_ParseTuple(args, "y*y*y*nnp", &b, &lut, &v, &rank, &pieces, &by_row)) return NULL;
    PyObject *result = NULL;
    Py_ssize_t n = b.len / (Py_ssize_t)sizeof(int64_t), bins = lut.len / (Py_ssize_t)sizeof(int32_t);
    if (b.len % (Py_ssize_t)sizeof(int64_t) || lut.len % (Py_ssize_t)sizeof(int32_t) ||
        v.len != n * (Py_ssize_t)sizeof(double) || rank < 1 || pieces < 1 || n % rank ||
        pieces > PY_SSIZE_T_MAX / 16 / rank) {
        PyErr_SetString(PyExc_ValueError, "piece_sums needs int64 bins, int32 pieces, as many float64 values as bins, "
                                          "and a rank that divides them");
        goto done;
    }
    if (!(result = PyBytes_FromStringAndSize(NULL, 2 * rank * pieces * (Py_ssize_t)sizeof(double)))) goto done;
    double *counts = (double *)PyBytes_AS_STRING(result), *sums = counts + rank * pieces;
    const int64_t *bin = b.buf;
    const int32_t *piece = lut.buf;
    const double *x = v.buf;
    Py_ssize_t per = n / rank;
    int bad = 0;
    Py_BEGIN_ALLOW_THREADS
    memset(counts, 0, 2 * (size_t)rank * (size_t)pieces * sizeof(double));
    for (Py_ssize_t outer = 0; outer < (by_row ? rank : per) && !bad; outer++) {
        for (Py_ssize_t inner = 0; inner < (by_row ? per : rank); inner++) {
            Py_ssize_t i = outer * (by_row ? per : rank) + inner, c = by_row ? outer : inner;
            int64_t k = bin[i];
            int32_t p = (k >= 0 && k < bins) ? piece[k] : -1;
            if (p < 0 || p >= pieces) {
                bad = 1;
                break;
            }
            counts[c * pieces + p] += 1.0;
            sums[c * pieces + p] += x[i];
        }
    }
    Py_END_ALLOW_THREADS
    if (bad) {
        Py_CLEAR(result);
        PyErr_SetString(PyExc_ValueError, "piece_sums: a bin or a piece out of range");
    }
done:
    PyBuffer_Release(&b);
    PyBuffer_Release(&lut);
    PyBuffer_Release(&v);
    return result;
}

static PyMethodDef methods[] = {
    {"fit", fit, METH_VARARGS, "fit(weight, sum, sum_sq, ks) -> [int32 bytes]: for each k, the first bin of each cluster"},
    {"fit_one", fit_one, METH_VARARGS,
     "fit_one(weight, sum, sum_sq, k) -> int32 bytes or None: the same for one k by Lagrangian relaxation, None if "
     "no price gives exactly k clusters"},
    {"fit_entropy", fit_entropy, METH_VARARGS,
     "fit_entropy(weight, sum, start, slope, level_bits, max_iter) -> int32 bytes: the first bin of each cell of "
     "the entropy-constrained quantizer at slope, each level costing level_bits, started from the increasing "
     "float64 levels start"},
    {"pattern_counts", pattern_counts, METH_VARARGS,
     "pattern_counts(patterns) -> bytes of 65,536 int64: how many of the uint16 patterns have each value"},
    {"piece_sums", piece_sums, METH_VARARGS,
     "piece_sums(bins, piece_of_bin, values, rank, pieces, by_row) -> bytes of 2 x rank x pieces float64: the count "
     "and the sum of the values of each component in each piece"},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, .m_name = "sqz._kmeans", .m_size = -1, .m_methods = methods};

PyMODINIT_FUNC PyInit__kmeans(void) { return PyModule_Create(&module); }
