/* sqz._kmeans: optimal 1-D k-means over a histogram, in C (optional; quantize.py falls back to kmeans1d).
 *
 * fit(weight, sum, sum_sq, k) takes n bins in increasing order of value, each given by its weight (the
 * count of values in it), the sum of those values and the sum of their squares (float64 buffers), and
 * returns the k starting bins of the partition into k runs of consecutive bins with the least total
 * squared error, as bytes holding k int32 (bin 0 first). A float16 tensor has at most 65,536 distinct
 * values, one bin each, so this is the exact optimum over every value of the tensor at O(n) input size.
 *
 * The dynamic programme: D[m][i] = min over j of D[m-1][j-1] + cost(j..i), cost from prefix sums. The best j
 * never decreases as i grows (the squared-error cost is Monge), so each of the k rows is filled by divide
 * and conquer in O(n log n); the smallest best j is kept on ties, so the result is deterministic. Sums are
 * taken about the mean (less cancellation in sum_sq - sum^2/weight). Runs without the GIL.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>

typedef struct {
    const double *pw, *p1, *p2; /* prefix sums, n + 1 entries */
    const double *prev;         /* D[m-1][.] */
    double *cur;                /* D[m][.] */
    int32_t *arg;               /* best j of row m */
    const int32_t *below;       /* best j of row m-1: a lower bound on row m's */
    Py_ssize_t below_end;       /* row m-1 is filled for i < below_end */
} Row;

static inline double cost(const Row *r, Py_ssize_t j, Py_ssize_t i) {
    double w = r->pw[i + 1] - r->pw[j], s = r->p1[i + 1] - r->p1[j], e = r->p2[i + 1] - r->p2[j] - s * s / w;
    return e > 0 ? e : 0;
}

/* Fill cur[i] for i in [ilo, ihi], knowing the best j lies in [jlo, jhi]. Row m starts at bin m. */
static void fill(const Row *r, Py_ssize_t ilo, Py_ssize_t ihi, Py_ssize_t jlo, Py_ssize_t jhi) {
    while (ilo <= ihi) {
        Py_ssize_t mid = ilo + (ihi - ilo) / 2, stop = jhi < mid ? jhi : mid, start = jlo;
        if (mid < r->below_end && r->below[mid] > start) start = r->below[mid];
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

static int solve(const double *w, const double *s1, const double *s2, Py_ssize_t n, Py_ssize_t k, int32_t *starts) {
    double total_w = 0, total_s = 0;
    for (Py_ssize_t i = 0; i < n; i++) total_w += w[i], total_s += s1[i];
    double c = total_s / total_w;
    double *pw = malloc(3 * (n + 1) * sizeof(double)), *rows = malloc(2 * n * sizeof(double));
    int32_t *arg = malloc((size_t)k * n * sizeof(int32_t));
    if (!pw || !rows || !arg) {
        free(pw), free(rows), free(arg);
        return -1;
    }
    double *p1 = pw + (n + 1), *p2 = p1 + (n + 1);
    pw[0] = p1[0] = p2[0] = 0;
    for (Py_ssize_t i = 0; i < n; i++) { /* about the mean c: sum (x-c)^2 = s2 - 2c s1 + c^2 w */
        pw[i + 1] = pw[i] + w[i];
        p1[i + 1] = p1[i] + (s1[i] - c * w[i]);
        p2[i + 1] = p2[i] + (s2[i] - 2 * c * s1[i] + c * c * w[i]);
    }
    Row r = {pw, p1, p2, rows, rows + n, arg, arg, 0};
    for (Py_ssize_t i = 0; i < n; i++) rows[i] = cost(&r, 0, i), arg[i] = 0;
    for (Py_ssize_t m = 1; m < k; m++) {
        r.below = arg + (m - 1) * n, r.below_end = m == 1 ? n : n - (k - m);
        r.arg = arg + m * n;
        fill(&r, m, n - 1 - (k - 1 - m), m, n - 1);
        double *t = (double *)r.prev;
        r.prev = r.cur, r.cur = t;
    }
    Py_ssize_t i = n - 1;
    for (Py_ssize_t m = k - 1; m >= 0; m--) {
        starts[m] = m ? arg[m * n + i] : 0;
        i = starts[m] - 1;
    }
    free(pw), free(rows), free(arg);
    return 0;
}

static PyObject *fit(PyObject *self, PyObject *args) {
    Py_buffer w, s1, s2;
    Py_ssize_t k;
    if (!PyArg_ParseTuple(args, "y*y*y*n", &w, &s1, &s2, &k)) return NULL;
    PyObject *result = NULL;
    Py_ssize_t n = w.len / (Py_ssize_t)sizeof(double);
    if (w.len % sizeof(double) || s1.len != w.len || s2.len != w.len || n < 1 || k < 1 || k > n || n > INT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "fit needs three float64 buffers of n bins and 1 <= k <= n");
        goto done;
    }
    result = PyBytes_FromStringAndSize(NULL, k * (Py_ssize_t)sizeof(int32_t));
    if (!result) goto done;
    int status;
    Py_BEGIN_ALLOW_THREADS
    status = solve(w.buf, s1.buf, s2.buf, n, k, (int32_t *)PyBytes_AS_STRING(result));
    Py_END_ALLOW_THREADS
    if (status) {
        Py_CLEAR(result);
        PyErr_NoMemory();
    }
done:
    PyBuffer_Release(&w), PyBuffer_Release(&s1), PyBuffer_Release(&s2);
    return result;
}

static PyMethodDef methods[] = {
    {"fit", fit, METH_VARARGS, "fit(weight, sum, sum_sq, k) -> int32 bytes: the first bin of each of k clusters"},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, .m_name = "sqz._kmeans", .m_size = -1, .m_methods = methods};

PyMODINIT_FUNC PyInit__kmeans(void) { return PyModule_Create(&module); }
