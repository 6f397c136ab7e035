/* Part of _speedups.c (one translation unit; see there): a traced timer's callback (TimerCallback) and its cancel (TimerCancel). */

/* Timers (instrumentation/timers.py, in C): a traced timer's callback (TimerCallback), and the
 * traced side of the loop's call_at / call_later (TimerPatch), the same as the Python forms
 * there, which run without the accelerator. */
static PyObject *active_var;           /* _context.ACTIVE */
static PyObject *timer_handle_type;    /* asyncio.TimerHandle */
/* Whether CPython has let a handle of timer_handle_type become a traced_handle_type: its
 * checks (the two layouts compatible) hold for every handle of that pair of types, so after
 * the first, the class is swapped as handle.__class__ = ... would, without them. */
static int class_swap_checked;
static PyObject *traced_handle_type;   /* timers._TracedTimerHandle */
static PyObject *unsettled_append;     /* timers._unsettled_append(trace, callback) */
static PyObject *builtin_round;
static PyObject *s_time, *s_timer, *s_kind, *s_delay_ms, *s_late_ms, *s_callback, *s_error;
static PyObject *s_error_state, *s_class, *s_delay, *s_f_locals;
static PyObject *s_sleep, *s_timeout, *s_wait_for, *s_set_result_unless, *s_on_timeout;
static PyObject *s_release_waiter, *thousand, *zero_float, *s_kind_call_later;

typedef struct {
    PyObject_HEAD
    PyObject *callback;
    TraceCore *trace;
    ResourceObject *res;
    PyObject *loop;
    PyObject *when;
    PyObject *handle;
    vectorcallfunc vectorcall;
} TimerCallback;

static PyTypeObject TimerCallbackType;

/* A duration in milliseconds to the microsecond, as timers._ms writes it: for a float,
 * round(max(seconds, 0.0) * 1000 * 1000) / 1000 (round() halves to even, as nearbyint does;
 * round(x, 3) would cost a decimal conversion, a tenth of a traced timer); for an int not
 * below 0, seconds * 1000 (what round(seconds * 1000, 3) gives back, without calling it: a
 * timeout such as wait_for's is often an int); otherwise, or beyond 2**52 microseconds,
 * round(max(seconds, 0.0) * 1000, 3). */
static PyObject *
as_ms(PyObject *seconds)
{
    if (PyLong_CheckExact(seconds)) {
        int overflow = 0;
        long long s = PyLong_AsLongLongAndOverflow(seconds, &overflow);
        if (s == -1 && PyErr_Occurred()) {
            return NULL;
        }
        if (!overflow && s >= 0 && s <= LLONG_MAX / 1000) {
            return PyLong_FromLongLong(s * 1000);
        }
    }
    if (PyFloat_CheckExact(seconds)) {
        double s = PyFloat_AS_DOUBLE(seconds);
        double micro = (s < 0.0 ? 0.0 : s) * 1000.0 * 1000.0;
        if (fabs(micro) < 4503599627370496.0) {
            /* + 0.0: -0.0 as 0.0, as round() makes the int 0 of it */
            return PyFloat_FromDouble(nearbyint(micro) / 1000.0 + 0.0);
        }
    }
    int negative = PyObject_RichCompareBool(seconds, zero_float, Py_LT);
    if (negative < 0) {
        return NULL;
    }
    PyObject *ms = PyNumber_Multiply(negative ? zero_float : seconds, thousand);
    if (ms == NULL) {
        return NULL;
    }
    PyObject *out = PyObject_CallFunction(builtin_round, "Oi", ms, 3);
    Py_DECREF(ms);
    return out;
}

static PyObject *
duration_ms(PyObject *module, PyObject *seconds)
{
    return as_ms(seconds);
}

static int
note(TraceCore *t, PyObject *res, PyObject *key, PyObject *value)
{
    if (value == NULL) {
        return -1;
    }
    PyObject *args[3] = {res, key, value};
    PyObject *out = core_annotate(t, args, 3);
    Py_DECREF(value);
    Py_XDECREF(out);
    return out == NULL ? -1 : 0;
}

/* The callback returned (exc NULL) or raised: the run ends, the timer settles. */
static void
timer_done(TimerCallback *cb, PyObject *token, PyObject *exc)
{
    if (token != NULL && PyContextVar_Reset(active_var, token) < 0) {
        report_and_clear("timers");
    }
    PyObject *now = now_ns();
    if (now == NULL) {
        report_and_clear("timers");
        return;
    }
    PyObject *cbs = cb->res->callbacks;
    if (cbs != NULL && PyList_Check(cbs) && (PyList_GET_SIZE(cbs) & 1) &&
        PyList_Append(cbs, now) < 0) {
        report_and_clear("timers");
    }
    settle_resource(cb->res, now, exc == NULL ? s_ok : s_error_state);
    Py_DECREF(now);
    if (exc != NULL) {
        PyObject *name = PyObject_GetAttr((PyObject *)Py_TYPE(exc), s_qualname);
        if (note(cb->trace, (PyObject *)cb->res, s_error, name) < 0) {
            report_and_clear("timers");
        }
    }
}

static PyObject *
timer_call(PyObject *self, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    TimerCallback *cb = (TimerCallback *)self;
    if (cb->trace->closed) {
        return PyObject_Vectorcall(cb->callback, args, nargsf, kwnames);
    }
    PyObject *token = NULL;
    { /* the run starts: its time, how late it is, and the timer as the current resource */
        int ok = 0;
        ResourceObject *r = cb->res;
        if (r->callbacks == NULL) {
            r->callbacks = PyList_New(0);
        }
        PyObject *now = r->callbacks != NULL ? now_ns() : NULL;
        if (now != NULL) {
            PyObject *begin_args[2] = {(PyObject *)r, now};
            PyObject *out = core_begin(cb->trace, begin_args, 2);
            Py_DECREF(now);
            PyObject *time = out != NULL ? PyObject_CallMethodNoArgs(cb->loop, s_time) : NULL;
            Py_XDECREF(out);
            PyObject *late = time != NULL ? PyNumber_Subtract(time, cb->when) : NULL;
            Py_XDECREF(time);
            if (late != NULL && note(cb->trace, (PyObject *)r, s_late_ms, as_ms(late)) == 0) {
                PyObject *state = PyTuple_Pack(2, (PyObject *)cb->trace, (PyObject *)r);
                token = state != NULL ? PyContextVar_Set(active_var, state) : NULL;
                Py_XDECREF(state);
                ok = token != NULL;
            }
            Py_XDECREF(late);
        }
        if (!ok) {
            report_and_clear("timers");
        }
    }
    step_mark outer = step_enter(cb->trace, (PyObject *)cb->res);
    PyObject *out = PyObject_Vectorcall(cb->callback, args, nargsf, kwnames);
    step_leave(cb->trace, outer);
    if (out == NULL) {
        PyObject *type, *value, *tb;
        fetch_exception(&type, &value, &tb);
        timer_done(cb, token, value);
        PyErr_Restore(type, value, tb);
    }
    else {
        timer_done(cb, token, NULL);
    }
    Py_XDECREF(token);
    return out;
}

static PyObject *
timer_cancelled(TimerCallback *cb, PyObject *unused)
{
    if (!cb->trace->closed) {
        PyObject *now = now_ns();
        if (now == NULL) {
            return NULL;
        }
        settle_resource(cb->res, now, s_cancelled);
        Py_DECREF(now);
    }
    Py_RETURN_NONE;
}

static PyObject *
timer_new_impl(PyObject *callback, PyObject *trace, PyObject *res, PyObject *loop,
               PyObject *when)
{
    if (!PyObject_TypeCheck(trace, &TraceCoreType) || !Py_IS_TYPE(res, &ResourceType)) {
        PyErr_SetString(PyExc_TypeError, "TimerCallback(callback, trace: TraceCore, res: "
                                         "Resource, loop, when)");
        return NULL;
    }
    TimerCallback *cb = PyObject_GC_New(TimerCallback, &TimerCallbackType);
    if (cb == NULL) {
        return NULL;
    }
    cb->callback = Py_NewRef(callback);
    cb->trace = (TraceCore *)Py_NewRef(trace);
    cb->res = (ResourceObject *)Py_NewRef(res);
    cb->loop = Py_NewRef(loop);
    cb->when = Py_NewRef(when);
    cb->handle = Py_NewRef(Py_None);
    cb->vectorcall = timer_call;
    PyObject_GC_Track(cb);
    return (PyObject *)cb;
}

static PyObject *
timer_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    PyObject *callback, *trace, *res, *loop, *when;
    if (!PyArg_ParseTuple(args, "OOOOO:TimerCallback", &callback, &trace, &res, &loop, &when)) {
        return NULL;
    }
    return timer_new_impl(callback, trace, res, loop, when);
}

static int
timer_traverse(TimerCallback *cb, visitproc visit, void *arg)
{
    Py_VISIT(cb->callback);
    Py_VISIT(cb->trace);
    Py_VISIT(cb->res);
    Py_VISIT(cb->loop);
    Py_VISIT(cb->when);
    Py_VISIT(cb->handle);
    return 0;
}

static int
timer_clear(TimerCallback *cb)
{
    Py_CLEAR(cb->callback);
    Py_CLEAR(cb->trace);
    Py_CLEAR(cb->res);
    Py_CLEAR(cb->loop);
    Py_CLEAR(cb->when);
    Py_CLEAR(cb->handle);
    return 0;
}

static void
timer_dealloc(TimerCallback *cb)
{
    PyObject_GC_UnTrack(cb);
    timer_clear(cb);
    PyObject_GC_Del(cb);
}

static PyObject *
timer_repr(TimerCallback *cb)
{
    return PyObject_Repr(cb->callback);
}

static PyMemberDef timer_members[] = {
    {"callback", T_OBJECT, offsetof(TimerCallback, callback), READONLY, NULL},
    {"trace", T_OBJECT, offsetof(TimerCallback, trace), READONLY, NULL},
    {"res", T_OBJECT, offsetof(TimerCallback, res), READONLY, NULL},
    {"loop", T_OBJECT, offsetof(TimerCallback, loop), READONLY, NULL},
    {"when", T_OBJECT, offsetof(TimerCallback, when), READONLY, NULL},
    {"handle", T_OBJECT, offsetof(TimerCallback, handle), 0, NULL},
    {NULL},
};

static PyMethodDef timer_methods[] = {
    {"cancelled", (PyCFunction)timer_cancelled, METH_NOARGS, "The timer was cancelled."},
    {NULL},
};

static PyTypeObject TimerCallbackType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "asgi_asynctrace._speedups.TimerCallback",
    .tp_basicsize = sizeof(TimerCallback),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_doc = "TimerCallback(callback, trace, res, loop, when): a traced timer's callback.",
    .tp_new = timer_new,
    .tp_traverse = (traverseproc)timer_traverse,
    .tp_clear = (inquiry)timer_clear,
    .tp_dealloc = (destructor)timer_dealloc,
    .tp_repr = (reprfunc)timer_repr,
    .tp_call = PyVectorcall_Call,
    .tp_vectorcall_offset = offsetof(TimerCallback, vectorcall),
    .tp_members = timer_members,
    .tp_methods = timer_methods,
};

/* TimerCancel(cancel, python_callback_type): ``cancel`` of a traced timer's handle on
 * asyncio's loops (timers._TracedTimerHandle), as the Python method there does it: a handle not
 * cancelled yet whose callback is a traced timer's settles that timer "cancelled", then
 * ``cancel(handle)`` (asyncio's TimerHandle.cancel) runs and the handle lets go of its context.
 * A method in the class (see dispatch_get), so handle.cancel() runs no Python frame of ours. */
typedef struct {
    PyObject_HEAD
    PyObject *cancel;
    PyObject *python_type; /* timers._TimerCallback: its own cancelled() is called */
    vectorcallfunc vectorcall;
} TimerCancel;

static PyObject *s__callback, *s__cancelled, *s__context;

static void
cancel_record(TimerCancel *c, PyObject *handle)
{
    PyObject *done = slot_get(handle, s__cancelled);
    int was = done == NULL ? -1 : PyObject_IsTrue(done);
    Py_XDECREF(done);
    if (was == 0) {
        PyObject *cb = slot_get(handle, s__callback);
        PyObject *out = NULL;
        if (cb == NULL) {
            was = -1;
        }
        else if (Py_IS_TYPE(cb, &TimerCallbackType)) {
            out = timer_cancelled((TimerCallback *)cb, NULL);
        }
        else if ((PyObject *)Py_TYPE(cb) == c->python_type) {
            out = PyObject_CallMethodNoArgs(cb, s_cancelled);
        }
        else {
            out = Py_NewRef(Py_None); /* not a traced timer's: nothing to record */
        }
        Py_XDECREF(cb);
        if (out == NULL) {
            was = -1;
        }
        Py_XDECREF(out);
    }
    if (was < 0) {
        report_and_clear("timers");
    }
}

static PyObject *
cancel_call(PyObject *self, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    TimerCancel *c = (TimerCancel *)self;
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    if (nargs >= 1) {
        cancel_record(c, args[0]);
    }
    PyObject *out = PyObject_Vectorcall(c->cancel, args, nargsf, kwnames);
    if (out != NULL && nargs >= 1 && slot_set(args[0], s__context, Py_None) < 0) {
        Py_CLEAR(out);
    }
    return out;
}

static PyObject *
cancel_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    PyObject *cancel, *python_type;
    if (!PyArg_ParseTuple(args, "OO:TimerCancel", &cancel, &python_type)) {
        return NULL;
    }
    if (!PyCallable_Check(cancel)) {
        PyErr_SetString(PyExc_TypeError, "TimerCancel(cancel: callable, python_callback_type)");
        return NULL;
    }
    TimerCancel *c = (TimerCancel *)type->tp_alloc(type, 0);
    if (c == NULL) {
        return NULL;
    }
    c->cancel = Py_NewRef(cancel);
    c->python_type = Py_NewRef(python_type);
    c->vectorcall = cancel_call;
    return (PyObject *)c;
}

static int
cancel_traverse(TimerCancel *c, visitproc visit, void *arg)
{
    Py_VISIT(c->cancel);
    Py_VISIT(c->python_type);
    return 0;
}

static int
cancel_clear(TimerCancel *c)
{
    Py_CLEAR(c->cancel);
    Py_CLEAR(c->python_type);
    return 0;
}

static void
cancel_dealloc(TimerCancel *c)
{
    PyObject_GC_UnTrack(c);
    cancel_clear(c);
    Py_TYPE(c)->tp_free((PyObject *)c);
}

static PyTypeObject TimerCancelType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "asgi_asynctrace._speedups.TimerCancel",
    .tp_basicsize = sizeof(TimerCancel),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL |
                Py_TPFLAGS_METHOD_DESCRIPTOR,
    .tp_doc = "TimerCancel(cancel, python_callback_type): a traced timer handle's cancel().",
    .tp_descr_get = dispatch_get,
    .tp_new = cancel_new,
    .tp_traverse = (traverseproc)cancel_traverse,
    .tp_clear = (inquiry)cancel_clear,
    .tp_dealloc = (destructor)cancel_dealloc,
    .tp_call = PyVectorcall_Call,
    .tp_vectorcall_offset = offsetof(TimerCancel, vectorcall),
};
