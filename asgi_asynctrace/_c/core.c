/* Part of _speedups.c (one translation unit; see there): TraceCore: its state, the running step, the clock, dropped counts, watched timers. */

/* TraceCore: the recording half of _model.Trace (its base class when this module is built):
 * add, begin, end, settle, annotate, stack_id and new_resource, the calls every hook makes
 * for every resource of a traced request. _recording._PyTraceCore is the same in Python; the
 * tests run both. Limits are kept as plain integers (set by Trace.__init__); what goes over
 * them is counted on the trace's Dropped object (a rare path: attribute arithmetic). */
typedef struct {
    PyObject_HEAD
    PyObject *resources;   /* list of Resource */
    PyObject *annotations; /* list of (async_id, key, value) */
    PyObject *stacks;      /* list of frame tuples */
    PyObject *stack_ids;   /* dict: stack key -> index in stacks */
    PyObject *dropped;     /* Dropped */
    char closed;
    Py_ssize_t max_resources, max_annotations, max_annotation_length, max_callbacks, max_stacks;
    Py_ssize_t stack_depth;
    long long next_id;
    /* The first IDENTITY_KEYS stack keys that compare by identity (the creation stacks the
     * hooks capture) with their indexes, found by a pointer scan: a request's few stacks
     * then need no dict (made, hashed into, grown) per trace. NULL until the first one; 16
     * entries, then 32 (no bigger than the dict it saves for a trace with few stacks). */
    struct ident_key *ident;
    Py_ssize_t n_ident, ident_size;
    /* Timers whose loop reports no cancel (uvloop's handles take no class of ours): the
     * async_id of the resource that made them -> a list of (Resource, handle); looked at as
     * steps end, see core_check_watched. NULL: none. */
    PyObject *watched;
    /* The resource whose step runs now, and the thread running it (set around each step of a
     * TimedCoroutine or a timer's callback, the outer step's put back after): what the
     * blocked-loop watchdog (_watchdog.py) reads to know which step to sample. NULL: none. */
    PyObject *running;
    unsigned long running_thread;
    /* What the watchdog saw a long step doing: a list of (async_id, when, frames), or NULL. */
    PyObject *samples;
} TraceCore;

/* What the watchdog's thread reads without the GIL (quiet_wait, below): how many traces have a
 * step running now, a count bumped each time any trace's running step changes, and, while a
 * quiet_wait is under way, when the latest step began (so the wait need not look often to
 * know it). Written with the GIL held, by every thread that runs traced steps; read by the
 * watchdog's thread with the GIL released, so all are atomic (relaxed: only "did it change",
 * "is it zero", "since when"). */
#if (defined(__GNUC__) || defined(__clang__)) && !defined(_WIN32) && \
    !defined(ASYNCTRACE_NO_QUIET_WAIT)
#define HAVE_QUIET_WAIT 1 /* atomics, nanosleep, CLOCK_MONOTONIC; elsewhere the thread polls */
static long steps_running;
static unsigned long step_changes;
static long quiet_waiters;        /* quiet_waits under way */
static long long step_started_at; /* monotonic_ns() when the latest step began or resumed */

static long long
monotonic_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}
#if defined(__linux__) && defined(CLOCK_MONOTONIC)
/* The latest reading of clock_ns (below), the same clock: a step's start was read just
 * before its mark is taken, so running_changed need not read the clock again. */
#define CLOCK_READ_LAST 1
static long long clock_last_ns;
#endif
#endif

static inline void
running_changed(PyObject *before, PyObject *after)
{
#ifndef HAVE_QUIET_WAIT
    (void)before;
    (void)after;
#else
    if (before == NULL && after != NULL) {
        __atomic_add_fetch(&steps_running, 1, __ATOMIC_RELAXED);
    }
    else if (before != NULL && after == NULL) {
        __atomic_sub_fetch(&steps_running, 1, __ATOMIC_RELAXED);
    }
    if (after != NULL && __atomic_load_n(&quiet_waiters, __ATOMIC_RELAXED) > 0) {
#ifdef CLOCK_READ_LAST
        long long began = __atomic_load_n(&clock_last_ns, __ATOMIC_RELAXED);
#else
        long long began = monotonic_ns();
#endif
        __atomic_store_n(&step_started_at, began, __ATOMIC_RELAXED);
    }
    __atomic_store_n(&step_changes, __atomic_load_n(&step_changes, __ATOMIC_RELAXED) + 1,
                     __ATOMIC_RELAXED);
#endif
}

/* What a step replaced as the trace's running step, given back when it ends. */
typedef struct {
    PyObject *res;
    unsigned long thread;
} step_mark;

static inline step_mark
step_enter(TraceCore *t, PyObject *res)
{
    step_mark outer = {t->running, t->running_thread};
    running_changed(outer.res, res);
    t->running = Py_NewRef(res);
    t->running_thread = PyThread_get_thread_ident();
    return outer;
}

static inline void
step_leave(TraceCore *t, step_mark outer)
{
    PyObject *mine = t->running;
    running_changed(mine, outer.res);
    t->running = outer.res;
    t->running_thread = outer.thread;
    Py_XDECREF(mine);
}

#define IDENTITY_KEYS 32
struct ident_key {
    PyObject *key;
    PyObject *sid;
};

/* Whether key's equality and hash are object's own, which are its identity. */
static int
identity_key(PyObject *key)
{
    PyTypeObject *tp = Py_TYPE(key);
    return tp->tp_hash == PyBaseObject_Type.tp_hash &&
           tp->tp_richcompare == PyBaseObject_Type.tp_richcompare;
}

static PyObject *perf_counter_ns;    /* time.perf_counter_ns */

/* time.perf_counter_ns() now. On Linux CPython reads that clock as CLOCK_MONOTONIC in whole
 * nanoseconds: read here the same way, the same number without a Python call (a traced
 * /cache request reads the clock 51 times); elsewhere, perf_counter_ns itself. */
static PyObject *
clock_ns(void)
{
#if defined(__linux__) && defined(CLOCK_MONOTONIC)
    struct timespec ts;
    if (clock_gettime(CLOCK_MONOTONIC, &ts) == 0) {
        long long now = (long long)ts.tv_sec * 1000000000LL + (long long)ts.tv_nsec;
#ifdef CLOCK_READ_LAST
        __atomic_store_n(&clock_last_ns, now, __ATOMIC_RELAXED);
#endif
        return PyLong_FromLongLong(now);
    }
#endif
    return PyObject_CallNoArgs(perf_counter_ns);
}
static PyObject *format_stack;       /* _stacks._format_and_cache_c, set by _stacks */
static PyObject *stack_cache;        /* _stacks._c_cache */
static PyObject *stop_code;          /* _stacks._STOP_CODE */
static PyObject *s_frames, *s_ellipsis;

static int
count_dropped(TraceCore *t, const char *name)
{
    if (t->dropped == NULL) {
        return 0;
    }
    PyObject *v = PyObject_GetAttrString(t->dropped, name);
    if (v == NULL) {
        return -1;
    }
    PyObject *one = PyLong_FromLong(1);
    PyObject *sum = one ? PyNumber_Add(v, one) : NULL;
    Py_DECREF(v);
    Py_XDECREF(one);
    if (sum == NULL) {
        return -1;
    }
    int rc = PyObject_SetAttrString(t->dropped, name, sum);
    Py_DECREF(sum);
    return rc;
}

static int
core_ready(TraceCore *t)
{
    if (t->resources == NULL || t->annotations == NULL || t->stacks == NULL ||
        t->stack_ids == NULL || !PyList_CheckExact(t->resources) ||
        !PyList_CheckExact(t->annotations) || !PyList_CheckExact(t->stacks) ||
        !PyDict_CheckExact(t->stack_ids)) {
        PyErr_SetString(PyExc_TypeError, "trace not initialised: resources, annotations and "
                                         "stacks must be lists, _stack_ids a dict");
        return -1;
    }
    return 0;
}

static ResourceObject *
as_resource(PyObject *res)
{
    if (!Py_IS_TYPE(res, &ResourceType)) {
        PyErr_Format(PyExc_TypeError, "expected a Resource, got %.100s", Py_TYPE(res)->tp_name);
        return NULL;
    }
    return (ResourceObject *)res;
}

/* res reached its final state at now; only the first settle counts. */
static void
settle_resource(ResourceObject *r, PyObject *now, PyObject *state)
{
    if (r->settled_at == Py_None || r->settled_at == NULL) {
        Py_XSETREF(r->settled_at, Py_NewRef(now));
        Py_XSETREF(r->state, Py_NewRef(state));
    }
}

static PyObject *s_cancelled;
static PyObject *report_and_clear(const char *where);

/* Of the watched timers in list w (see TraceCore.watched), those whose handle says it was
 * cancelled are settled "cancelled" now, and those settled are let go. A handle that cannot
 * say is let go, the failure reported. */
static void
check_watched_list(PyObject *w, PyObject *now)
{
    Py_INCREF(w);
    for (Py_ssize_t i = PyList_GET_SIZE(w) - 1; i >= 0; i--) {
        if (i >= PyList_GET_SIZE(w)) { /* a handle's cancelled() shortened it */
            continue;
        }
        PyObject *pair = Py_NewRef(PyList_GET_ITEM(w, i));
        int done = 1;
        if (PyTuple_CheckExact(pair) && PyTuple_GET_SIZE(pair) == 2 &&
            Py_IS_TYPE(PyTuple_GET_ITEM(pair, 0), &ResourceType)) {
            ResourceObject *r = (ResourceObject *)PyTuple_GET_ITEM(pair, 0);
            if (r->settled_at == Py_None || r->settled_at == NULL) {
                PyObject *c = PyObject_CallMethodNoArgs(PyTuple_GET_ITEM(pair, 1), s_cancelled);
                int yes = c == NULL ? -1 : PyObject_IsTrue(c);
                Py_XDECREF(c);
                if (yes < 0) {
                    report_and_clear("timers");
                }
                else if (yes) {
                    settle_resource(r, now, s_cancelled);
                }
                else {
                    done = 0;
                }
            }
        }
        Py_DECREF(pair);
        if (done && i < PyList_GET_SIZE(w) && PyList_SetSlice(w, i, i + 1, NULL) < 0) {
            report_and_clear("timers");
        }
    }
    Py_DECREF(w);
}

/* A step of res ended at now. The watched timers (see TraceCore.watched) that res made are
 * asked whether they were cancelled (a sleep's, a deadline's: cancelled by the task that made
 * them, in that step); at a step of the root, all of them (one task cancelling what another
 * made, a delete cancelling an entry's expiry, is seen when the request resumes). Never fails. */
static void
core_check_watched(TraceCore *t, ResourceObject *res, PyObject *now)
{
    PyObject *w = t->watched;
    if (w == NULL || !PyDict_CheckExact(w) || PyDict_GET_SIZE(w) == 0) {
        return;
    }
    int root = PyList_Check(t->resources) && PyList_GET_SIZE(t->resources) > 0 &&
               PyList_GET_ITEM(t->resources, 0) == (PyObject *)res;
    if (!root) {
        PyObject *mine = PyDict_GetItemWithError(w, res->async_id); /* borrowed */
        if (mine == NULL) {
            if (PyErr_Occurred()) {
                report_and_clear("timers");
            }
            return;
        }
        if (PyList_CheckExact(mine)) {
            Py_INCREF(mine);
            check_watched_list(mine, now);
            if (PyList_GET_SIZE(mine) == 0 && PyDict_DelItem(w, res->async_id) < 0) {
                report_and_clear("timers");
            }
            Py_DECREF(mine);
        }
        return;
    }
    PyObject *lists = PyDict_Values(w); /* a copy: the dict may change meanwhile */
    if (lists == NULL) {
        report_and_clear("timers");
        return;
    }
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(lists); i++) {
        PyObject *one = PyList_GET_ITEM(lists, i);
        if (PyList_CheckExact(one)) {
            check_watched_list(one, now);
        }
    }
    Py_DECREF(lists);
}
