/* Part of _speedups.c (one translation unit; see there): a trace made in one call, as
 * Trace.start makes it (start_trace) and as a traced request starts it (open_request). */

static PyObject *s_root, *s_trace_id, *s_request, *s_origin, *s_started_at_unix_ns;
static PyObject *s_ended_at, *s_limits, *s_finishers, *s_propagate_to;
static PyObject *s_method, *s_client, *s_traced, *s_traceparent, *s_ws, *s_header_traceparent;

/* A new trace of cls (a TraceCore subclass whose __init__ and add are Trace's own: the caller
 * checks) with its lists, its limits as the machine integers of ints (the six of
 * _model._machine_limits, in their order), a new dropped_type, the Python slots set as
 * Trace.__init__ sets them, and its root resource (id 1) made at origin. propagate_to NULL:
 * a new dict. The tests hold this and Trace.__init__ to the same state. */
static PyObject *
make_trace(PyTypeObject *cls, PyObject *trace_id, PyObject *request, PyObject *limits,
           PyObject *ints_tuple, PyObject *origin, PyObject *unix_ns, PyObject *dropped_type,
           PyObject *record_futures, PyObject *propagate_to)
{
    if (!PyTuple_CheckExact(ints_tuple) || PyTuple_GET_SIZE(ints_tuple) != 6) {
        PyErr_SetString(PyExc_TypeError, "the trace's limits: a 6-tuple of ints");
        return NULL;
    }
    Py_ssize_t ints[6];
    for (Py_ssize_t i = 0; i < 6; i++) {
        ints[i] = PyLong_AsSsize_t(PyTuple_GET_ITEM(ints_tuple, i));
        if (ints[i] == -1 && PyErr_Occurred()) {
            return NULL;
        }
    }
    TraceCore *t = (TraceCore *)core_new(cls, NULL, NULL);
    if (t == NULL) {
        return NULL;
    }
    PyObject *trace = (PyObject *)t, *finishers = PyList_New(0);
    PyObject *propagate = propagate_to ? Py_NewRef(propagate_to) : PyDict_New();
    t->resources = PyList_New(0);
    t->annotations = PyList_New(0);
    t->stacks = PyList_New(0);
    t->stack_ids = PyDict_New();
    t->dropped = PyObject_CallNoArgs(dropped_type);
    t->max_resources = ints[0];
    t->max_annotations = ints[1];
    t->max_annotation_length = ints[2];
    t->max_callbacks = ints[3];
    t->max_stacks = ints[4];
    t->stack_depth = ints[5];
    PyObject *root = NULL;
    if (finishers == NULL || propagate == NULL || t->resources == NULL ||
        t->annotations == NULL || t->stacks == NULL || t->stack_ids == NULL ||
        t->dropped == NULL || slot_set(trace, s_trace_id, trace_id) < 0 ||
        slot_set(trace, s_request, request) < 0 || slot_set(trace, s_origin, origin) < 0 ||
        slot_set(trace, s_started_at_unix_ns, unix_ns) < 0 ||
        slot_set(trace, s_ended_at, Py_None) < 0 || slot_set(trace, s_limits, limits) < 0 ||
        slot_set(trace, s_record_futures, record_futures) < 0 ||
        slot_set(trace, s_propagate_to, propagate) < 0 ||
        slot_set(trace, s_finishers, finishers) < 0 ||
        (root = core_add_impl(t, s_root, zero, Py_None, origin)) == NULL) {
        Py_XDECREF(finishers);
        Py_XDECREF(propagate);
        Py_DECREF(trace);
        return NULL;
    }
    Py_DECREF(root);
    Py_DECREF(finishers);
    Py_DECREF(propagate);
    return trace;
}

/* start_trace(cls, trace_id, request, limits, ints, origin, started_at_unix_ns, dropped_type):
 * what Trace.start makes, without Trace.__init__'s frame and keyword arguments;
 * NotImplemented for a class on the Python core (Trace.__init__ makes it). */
static PyObject *
start_trace(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 8 || !PyType_Check(args[0]) || !PyCallable_Check(args[7])) {
        PyErr_SetString(PyExc_TypeError,
                        "start_trace(cls, trace_id, request, limits, ints: 6-tuple, origin, "
                        "started_at_unix_ns, dropped_type)");
        return NULL;
    }
    if (!PyType_IsSubtype((PyTypeObject *)args[0], &TraceCoreType)) {
        Py_RETURN_NOTIMPLEMENTED;
    }
    return make_trace((PyTypeObject *)args[0], args[1], args[2], args[3], args[4], args[5],
                      args[6], args[7], Py_True, NULL);
}

/* time.time_ns() now (CLOCK_REALTIME on Linux, as CPython reads it). */
static PyObject *
unix_now_ns(void)
{
#if defined(__linux__) && defined(CLOCK_REALTIME)
    struct timespec ts;
    if (clock_gettime(CLOCK_REALTIME, &ts) == 0) {
        return PyLong_FromLongLong((long long)ts.tv_sec * 1000000000LL + (long long)ts.tv_nsec);
    }
#endif
    PyObject *time_module = PyImport_ImportModule("time");
    PyObject *now = time_module ? PyObject_CallMethod(time_module, "time_ns", NULL) : NULL;
    Py_XDECREF(time_module);
    return now;
}

/* A W3C traceparent: 2, 32, 16 and 2 lower-case hex digits joined by '-' (what _request's
 * _TRACEPARENT pattern matches whole). */
static int
is_traceparent(PyObject *value)
{
    static const int parts[4] = {2, 32, 16, 2};
    if (!PyBytes_Check(value) || PyBytes_GET_SIZE(value) != 55) {
        return 0;
    }
    const char *c = PyBytes_AS_STRING(value);
    for (int p = 0; p < 4; p++) {
        for (int i = 0; i < parts[p]; i++, c++) {
            if (!((*c >= '0' && *c <= '9') || (*c >= 'a' && *c <= 'f'))) {
                return 0;
            }
        }
        if (p < 3 && *c++ != '-') {
            return 0;
        }
    }
    return 1;
}

static int
annotate_root(TraceCore *t, PyObject *root, PyObject *key, PyObject *value)
{
    PyObject *args[3] = {root, key, value};
    PyObject *done = core_annotate(t, args, 3);
    Py_XDECREF(done);
    return done == NULL ? -1 : 0;
}

/* open_request's trace, once the headers are known to be usual ones. */
static PyObject *
open_trace(PyObject *scope, PyObject *websocket, PyObject *traced, PyObject *const *s,
           PyObject *traceparent)
{
    PyObject *method = PyDict_GetItemWithError(scope, s_method);
    if (method == NULL && PyErr_Occurred()) {
        return NULL;
    }
    Py_XINCREF(method); /* the scope's values, held: what runs below may change it */
    int truthy = method == NULL ? 0 : PyObject_IsTrue(method);
    if (truthy < 0) {
        Py_DECREF(method);
        return NULL;
    }
    if (!truthy) {
        Py_XSETREF(method, Py_NewRef(PyObject_IsTrue(websocket) ? s_ws : Py_None));
    }
    PyObject *path = PyDict_GetItemWithError(scope, s_path);
    if (path == NULL && PyErr_Occurred()) {
        Py_DECREF(method);
        return NULL;
    }
    path = Py_NewRef(path ? path : Py_None);
    PyObject *host = NULL;
    PyObject *client = PyDict_GetItemWithError(scope, s_client);
    Py_XINCREF(client);
    truthy = client == NULL ? (PyErr_Occurred() ? -1 : 0) : PyObject_IsTrue(client);
    if (truthy > 0) {
        PyObject *first = PySequence_GetItem(client, 0);
        host = first ? PyObject_Str(first) : NULL;
        Py_XDECREF(first);
        truthy = host == NULL ? -1 : 1;
    }
    Py_XDECREF(client);
    if (truthy < 0) {
        Py_DECREF(method);
        Py_DECREF(path);
        return NULL;
    }
    PyObject *trace_id;
    Py_ssize_t ids = PyList_GET_SIZE(s[6]);
    if (ids > 0) {
        trace_id = Py_NewRef(PyList_GET_ITEM(s[6], ids - 1));
        if (PyList_SetSlice(s[6], ids - 1, ids, NULL) < 0) {
            Py_DECREF(trace_id);
            trace_id = NULL;
        }
    }
    else {
        trace_id = PyObject_CallNoArgs(s[7]);
    }
    PyObject *request = trace_id ? PyDict_New() : NULL;
    PyObject *origin = request ? clock_ns() : NULL;
    PyObject *unix_ns = origin ? unix_now_ns() : NULL;
    PyObject *trace = NULL;
    if (unix_ns != NULL && PyDict_SetItem(request, s_method, method) == 0 &&
        PyDict_SetItem(request, s_path, path) == 0) {
        trace = make_trace((PyTypeObject *)s[0], trace_id, request, s[1], s[2], origin, unix_ns,
                           s[3], s[4], s[5]);
    }
    Py_XDECREF(trace_id);
    Py_XDECREF(origin);
    Py_XDECREF(unix_ns);
    if (trace != NULL) {
        TraceCore *t = (TraceCore *)trace;
        PyObject *root = PyList_GET_ITEM(t->resources, 0);
        PyObject *text = NULL;
        if (annotate_root(t, root, s_method, method) < 0 ||
            annotate_root(t, root, s_path, path) < 0 ||
            (host != NULL && annotate_root(t, root, s_client, host) < 0) ||
            annotate_root(t, root, s_traced, traced) < 0 ||
            (is_traceparent(traceparent) &&
             ((text = PyUnicode_FromStringAndSize(PyBytes_AS_STRING(traceparent), 55)) == NULL ||
              PyDict_SetItem(request, s_traceparent, text) < 0))) {
            Py_CLEAR(trace);
        }
        Py_XDECREF(text);
    }
    Py_XDECREF(request);
    Py_XDECREF(host);
    Py_DECREF(method);
    Py_DECREF(path);
    return trace;
}

/* open_request(scope, websocket, traced, settings): a traced request's trace, as
 * TracedRequest's Python makes it: the request's method (WS for a websocket without one)
 * and path, the root annotated with them, the client's host and how it came to be traced,
 * and the request's W3C traceparent when it has one. settings is the middleware's tuple
 * (cls, limits, ints, dropped_type, record_futures, propagate_to, trace_ids, new_trace_id):
 * the trace's id is popped from trace_ids, or new_trace_id() makes one when it is empty.
 * NotImplemented for a scope or headers of an unusual shape (the Python makes that trace). */
static PyObject *
open_request(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4 || !PyTuple_CheckExact(args[3]) || PyTuple_GET_SIZE(args[3]) != 8) {
        PyErr_SetString(PyExc_TypeError, "open_request(scope, websocket, traced, settings)");
        return NULL;
    }
    PyObject *scope = args[0], *traced = args[2], *const *s = &PyTuple_GET_ITEM(args[3], 0);
    if (!PyDict_CheckExact(scope) || !PyType_Check(s[0]) ||
        !PyType_IsSubtype((PyTypeObject *)s[0], &TraceCoreType) || !PyList_CheckExact(s[6])) {
        Py_RETURN_NOTIMPLEMENTED;
    }
    PyObject *headers = PyDict_GetItemWithError(scope, s_headers);
    if (headers == NULL && PyErr_Occurred()) {
        return NULL;
    }
    PyObject *traceparent = Py_None;
    if (headers != NULL && headers != Py_None) {
        PyObject *find[2] = {headers, s_header_traceparent};
        traceparent = find_header(module, find, 2);
        if (traceparent == NULL) {
            return NULL;
        }
        if (traceparent == Py_NotImplemented ||
            (traceparent != Py_None && !PyBytes_Check(traceparent))) {
            Py_DECREF(traceparent);
            Py_RETURN_NOTIMPLEMENTED;
        }
    }
    else {
        Py_INCREF(traceparent);
    }
    PyObject *trace = open_trace(scope, args[1], traced, s, traceparent);
    Py_DECREF(traceparent);
    return trace;
}

static int
request_strings(void)
{
    s_root = PyUnicode_InternFromString("root");
    s_trace_id = PyUnicode_InternFromString("trace_id");
    s_request = PyUnicode_InternFromString("request");
    s_origin = PyUnicode_InternFromString("origin");
    s_started_at_unix_ns = PyUnicode_InternFromString("started_at_unix_ns");
    s_ended_at = PyUnicode_InternFromString("ended_at");
    s_limits = PyUnicode_InternFromString("limits");
    s_finishers = PyUnicode_InternFromString("finishers");
    s_propagate_to = PyUnicode_InternFromString("propagate_to");
    s_method = PyUnicode_InternFromString("method");
    s_client = PyUnicode_InternFromString("client");
    s_traced = PyUnicode_InternFromString("traced");
    s_traceparent = PyUnicode_InternFromString("traceparent");
    s_ws = PyUnicode_InternFromString("WS");
    s_header_traceparent = PyBytes_FromString("traceparent");
    if (!s_root || !s_trace_id || !s_request || !s_origin || !s_started_at_unix_ns ||
        !s_ended_at || !s_limits || !s_finishers || !s_propagate_to || !s_method || !s_client ||
        !s_traced || !s_traceparent || !s_ws || !s_header_traceparent) {
        return -1;
    }
    return 0;
}
