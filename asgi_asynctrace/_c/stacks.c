/* Part of _speedups.c (one translation unit; see there): the walk of a creation stack and its cache (stack_lookup). */

#define MAX_FRAMES 256

/* Where a request's stack ends on a loop whose callbacks run in C (uvloop), where no frame of
 * asyncio's Handle._run is there to stop at: a coroutine's frame entered from a plain
 * function's is a coroutine being driven by whoever runs the loop (asyncio.Runner.run,
 * uvloop.run, a server's main), and everything from that plain function outwards is the
 * process, not the request. A plain function that drives a coroutine for the tracer itself
 * (the pure-Python TimedCoroutine's send and throw) is passed through. Both set by
 * set_stack_bounds. */
#define MAX_DRIVERS 4
static PyObject *stack_drivers[MAX_DRIVERS]; /* owned code objects */
static int n_stack_drivers;
/* And, for a callback's walk on such a loop, the frames that run a loop (asyncio.Runner.run,
 * asyncio.run): stopped at, as stop_code is. */
#define MAX_RUNNERS 4
static PyObject *loop_runners[MAX_RUNNERS]; /* owned code objects */
static int n_loop_runners;
/* And where a request begins: the middleware's coroutine that runs the app. Everything from it
 * outwards is the server's (uvicorn's run_asgi, an outer middleware), the same for every
 * request: stopped at, coroutine though it is. */
#define MAX_BOUNDARIES 4
static PyObject *request_bounds[MAX_BOUNDARIES]; /* owned code objects */
static int n_request_bounds;

#define CORO_FLAGS (CO_COROUTINE | CO_ITERABLE_COROUTINE)
#define RESUMABLE_FLAGS (CO_GENERATOR | CO_COROUTINE | CO_ITERABLE_COROUTINE | CO_ASYNC_GENERATOR)

/* Whether code is one of the n codes (compared by address). */
static inline int
one_of(PyObject *code, PyObject *const *codes, int n)
{
    for (int i = 0; i < n; i++) {
        if (codes[i] == code) {
            return 1;
        }
    }
    return 0;
}
#define is_runner(code) one_of((code), loop_runners, n_loop_runners)
#define is_driver(code) one_of((code), stack_drivers, n_stack_drivers)
#define is_boundary(code) one_of((code), request_bounds, n_request_bounds)

/* What the walk does at a frame running code, given whether the frame just inside it (walked
 * before) is a coroutine or stands for one: STOPS before it, or goes on, with *coro set to
 * whether this frame is a coroutine or stands for one (a driver stands for the coroutine it
 * drives). A request's walk is mostly coroutines, which cost one test of their flags. */
#define STOPS (-1)
static inline int
frame_kind(PyObject *code, PyObject *stop, int inner_coro, int *coro)
{
    *coro = 0;
    if (code == stop || !PyCode_Check(code)) {
        return code == stop ? STOPS : 0;
    }
    int flags = ((PyCodeObject *)code)->co_flags;
    if (flags & RESUMABLE_FLAGS) {
        *coro = (flags & CORO_FLAGS) != 0;
        return is_boundary(code) ? STOPS : 0;
    }
    if (is_driver(code)) {
        *coro = 1;
        return 0;
    }
    return inner_coro || is_runner(code) ? STOPS : 0;
}

typedef struct {
    void *code;
    long long lasti;
} entry;

#ifdef INTERNAL_FRAMES
#if PY_VERSION_HEX >= 0x030D0000
#define FRAME_CODE(f) ((PyObject *)(f)->f_executable)
#else
#define FRAME_CODE(f) ((PyObject *)(f)->f_code)
#endif

/* The first frame from f outwards that has begun to run: the thread's list of frames also
 * holds ones being set up, which are nobody's caller yet. */
static inline _PyInterpreterFrame *
begun(_PyInterpreterFrame *f)
{
    while (f != NULL && _PyFrame_IsIncomplete(f)) {
        f = f->previous;
    }
    return f;
}

/* The frame the running thread is executing (the interpreter's own record of it). */
static inline _PyInterpreterFrame *
running_frame(void)
{
    PyThreadState *tstate = PyThreadState_Get();
#if PY_VERSION_HEX >= 0x030D0000
    return begun(tstate->current_frame);
#else
    return begun(tstate->cframe->current_frame);
#endif
}
#endif

/* Fills buf with the (code, last instruction) of at most depth frames, from the caller's frame
 * (skip = 0) outwards, stopping before a frame running stop; returns how many. */
static Py_ssize_t
walk(Py_ssize_t skip, Py_ssize_t depth, PyObject *stop, entry *buf)
{
    Py_ssize_t n = 0;
#ifdef INTERNAL_FRAMES
    _PyInterpreterFrame *f = running_frame();
    for (Py_ssize_t i = 0; i < skip && f != NULL; i++) {
        f = begun(f->previous);
    }
    int coro = 0;
    while (f != NULL && n < depth) {
        PyObject *code = FRAME_CODE(f);
        if (frame_kind(code, stop, coro, &coro) == STOPS) {
            break;
        }
        buf[n].code = (void *)code;
        buf[n].lasti = _PyInterpreterFrame_LASTI(f);
        n++;
        f = begun(f->previous);
    }
#else
    PyFrameObject *f = PyEval_GetFrame(); /* borrowed */
    Py_XINCREF(f);
    for (Py_ssize_t i = 0; i < skip && f != NULL; i++) {
        PyFrameObject *back = PyFrame_GetBack(f);
        Py_DECREF(f);
        f = back;
    }
    int coro = 0;
    while (f != NULL && n < depth) {
        PyCodeObject *code = PyFrame_GetCode(f);
        if (frame_kind((PyObject *)code, stop, coro, &coro) == STOPS) {
            Py_DECREF(code);
            break;
        }
        buf[n].code = (void *)code;
#if PY_VERSION_HEX >= 0x030B0000
        buf[n].lasti = PyFrame_GetLasti(f);
#else
        buf[n].lasti = f->f_lasti;
#endif
        n++;
        PyFrameObject *back = PyFrame_GetBack(f);
        Py_DECREF(f);
        f = back;
        Py_DECREF(code);
    }
    Py_XDECREF(f);
#endif
    return n;
}

static int
walk_args(PyObject *const *args, Py_ssize_t *skip, Py_ssize_t *depth)
{
    *skip = PyLong_AsSsize_t(args[0]);
    *depth = PyLong_AsSsize_t(args[1]);
    if ((*skip == -1 || *depth == -1) && PyErr_Occurred()) {
        return -1;
    }
    if (*depth > MAX_FRAMES) {
        *depth = MAX_FRAMES;
    }
    if (*skip < 0 || *depth < 0) {
        PyErr_SetString(PyExc_ValueError, "skip and max_depth must be >= 0");
        return -1;
    }
    return 0;
}

/* The walks found last, by their hash: a hit here skips making the hash an int and looking
 * it up in the cache dict (a third of what a found stack cost). An entry counts only while the
 * dict it was found in is unchanged since (its version tag, which CPython moves on every
 * change to a dict and never gives two dicts): a stack seen for the first time, or a cache
 * cleared or replaced, and the entries are looked up again. */
#define FRONT_SIZE 256
static struct {
    PyObject *cache; /* compared, not owned: the version tells a new dict at the same place */
    uint64_t version;
    uint64_t hash;
    PyObject *packed;
    PyObject *stack;
} front[FRONT_SIZE];

/* The dict's version tag; 0 where CPython has none (3.14 dropped it): no entry is kept. */
static uint64_t
dict_version(PyObject *dict)
{
#if PY_VERSION_HEX < 0x030E0000 && !defined(PYPY_VERSION)
#if defined(__GNUC__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wdeprecated-declarations"
#endif
    return ((PyDictObject *)dict)->ma_version_tag; /* deprecated as API in 3.12, still kept */
#if defined(__GNUC__)
#pragma GCC diagnostic pop
#endif
#else
    return 0;
#endif
}

/* stack_lookup(skip, max_depth, stop_code, cache): the caller's walk, looked up in cache
 * (a dict: hash of the walk -> (its packed key, the Stack made for it)) without building the
 * key: on a hit, the Stack; on a miss, (hash, packed key) for the caller to format and store.
 * The hash only finds the entry: the packed key is compared in full, so two walks that share
 * a hash can never share a Stack. */
static PyObject *
stack_lookup(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4 || !PyDict_CheckExact(args[3])) {
        PyErr_SetString(PyExc_TypeError, "stack_lookup(skip, max_depth, stop_code, cache: dict)");
        return NULL;
    }
    Py_ssize_t skip, depth;
    if (walk_args(args, &skip, &depth) < 0) {
        return NULL;
    }
    entry buf[MAX_FRAMES];
    Py_ssize_t n = walk(skip, depth, args[2], buf);
    Py_ssize_t size = n * (Py_ssize_t)sizeof(entry);
    uint64_t h = 0x9E3779B97F4A7C15ULL ^ (uint64_t)n;
    for (Py_ssize_t i = 0; i < n; i++) {
        h = (h ^ (uint64_t)(uintptr_t)buf[i].code) * 0xFF51AFD7ED558CCDULL;
        h = (h ^ (uint64_t)buf[i].lasti ^ (h >> 29)) * 0xC4CEB9FE1A85EC53ULL;
    }
    h ^= h >> 32;
    PyObject *cache = args[3];
    uint64_t version = dict_version(cache);
    Py_ssize_t slot = (Py_ssize_t)(h & (FRONT_SIZE - 1));
    if (version != 0 && front[slot].stack != NULL && front[slot].cache == cache &&
        front[slot].version == version && front[slot].hash == h &&
        PyBytes_GET_SIZE(front[slot].packed) == size &&
        memcmp(PyBytes_AS_STRING(front[slot].packed), buf, (size_t)size) == 0) {
        return Py_NewRef(front[slot].stack);
    }
    PyObject *key = PyLong_FromUnsignedLongLong(h);
    if (key == NULL) {
        return NULL;
    }
    PyObject *hit = PyDict_GetItemWithError(cache, key); /* borrowed */
    if (hit == NULL && PyErr_Occurred()) {
        Py_DECREF(key);
        return NULL;
    }
    if (hit != NULL && PyTuple_CheckExact(hit) && PyTuple_GET_SIZE(hit) == 2) {
        PyObject *packed = PyTuple_GET_ITEM(hit, 0);
        if (PyBytes_CheckExact(packed) && PyBytes_GET_SIZE(packed) == size &&
            memcmp(PyBytes_AS_STRING(packed), buf, (size_t)size) == 0) {
            Py_DECREF(key);
            PyObject *stack = PyTuple_GET_ITEM(hit, 1);
            if (version != 0) {
                Py_XSETREF(front[slot].packed, Py_NewRef(packed));
                Py_XSETREF(front[slot].stack, Py_NewRef(stack));
                front[slot].cache = cache;
                front[slot].version = version;
                front[slot].hash = h;
            }
            return Py_NewRef(stack);
        }
    }
    PyObject *packed = PyBytes_FromStringAndSize((const char *)buf, size);
    if (packed == NULL) {
        Py_DECREF(key);
        return NULL;
    }
    PyObject *miss = PyTuple_Pack(2, key, packed);
    Py_DECREF(key);
    Py_DECREF(packed);
    return miss;
}
