/* Part of _speedups.c (one translation unit; see there): TimerPatch: the traced side of call_later / call_at / call_soon. */

/* The "delay" asyncio's call_later was given, when the calling frame is that call_later
 * (code): borrowed, or NULL (no exception) when it is not, or not a number. */
static PyObject *
call_later_delay(PyObject *code, Py_ssize_t index)
{
#ifdef INTERNAL_FRAMES
    _PyInterpreterFrame *f = running_frame();
    if (f == NULL || FRAME_CODE(f) != code || index < 0 ||
        index >= ((PyCodeObject *)code)->co_nlocalsplus) {
        return NULL;
    }
    PyObject *delay = f->localsplus[index];
#else
    PyFrameObject *frame = PyEval_GetFrame(); /* borrowed */
    if (frame == NULL) {
        return NULL;
    }
    PyCodeObject *fcode = PyFrame_GetCode(frame);
    Py_DECREF(fcode);
    if ((PyObject *)fcode != code) {
        return NULL;
    }
    PyObject *locals = PyObject_GetAttr((PyObject *)frame, s_f_locals);
    if (locals == NULL) {
        PyErr_Clear();
        return NULL;
    }
    PyObject *delay = PyMapping_Check(locals) ? PyObject_GetItem(locals, s_delay) : NULL;
    Py_DECREF(locals);
    if (delay == NULL) {
        PyErr_Clear();
        return NULL;
    }
    Py_DECREF(delay); /* the frame's locals keep it */
#endif
    if (delay == NULL || !(PyLong_Check(delay) || PyFloat_Check(delay))) {
        return NULL;
    }
    return delay;
}

/* TimerPatch(original, kind, takes_delay, call_later_code, delay_index): the traced side of
 * the loop's call_at (takes_delay False) or call_later (True), called as original is. */
typedef struct {
    PyObject_HEAD
    PyObject *original;
    PyObject *kind;
    int takes_delay;
    PyObject *call_later_code;
    Py_ssize_t delay_index;
    vectorcallfunc vectorcall;
} TimerPatch;

static PyObject *
timer_kind(PyObject *callback, PyObject *fallback)
{
    PyObject *name = PyObject_GetAttr(callback, s_qualname);
    if (name == NULL) {
        PyErr_Clear();
        return Py_NewRef(fallback);
    }
    PyObject *kind = fallback;
    if (PyUnicode_Check(name)) {
        if (PyUnicode_Compare(name, s_set_result_unless) == 0) {
            kind = s_sleep;
        }
        else if (PyUnicode_Compare(name, s_on_timeout) == 0) {
            kind = s_timeout;
        }
        else if (PyUnicode_Compare(name, s_release_waiter) == 0) {
            kind = s_wait_for; /* wait_for's deadline before Python 3.12 */
        }
    }
    Py_DECREF(name);
    return Py_NewRef(kind);
}

/* What a timer scheduled directly is called: its callback's __qualname__, else its type's. */
static PyObject *
callback_name(PyObject *callback)
{
    PyObject *name = PyObject_GetAttr(callback, s_qualname);
    if (name == NULL) {
        PyErr_Clear();
    }
    else {
        int truthy = PyObject_IsTrue(name);
        if (truthy > 0) {
            return name;
        }
        Py_DECREF(name);
        if (truthy < 0) {
            return NULL;
        }
    }
    return PyObject_GetAttr((PyObject *)Py_TYPE(callback), s_qualname);
}

/* The timer's resource and callback, or 0 when it is not to be traced; -1 on failure. */
static int
patch_prepare(TimerPatch *p, PyObject *const *args, PyObject **wrapper)
{
    PyObject *active = NULL;
    if (active_var == NULL) {
        return 0; /* set_timer_hooks was not called: nothing to record with */
    }
    if (PyContextVar_Get(active_var, NULL, &active) < 0) {
        return -1;
    }
    if (active == NULL) {
        return 0;
    }
    int rc = 0;
    PyObject *loop = args[0], *arg = args[1], *callback = args[2];
    PyObject *when = NULL, *delay = NULL, *kind = p->kind, *res = NULL, *skip = NULL;
    PyObject *trace = PyTuple_CheckExact(active) && PyTuple_GET_SIZE(active) == 2
                          ? PyTuple_GET_ITEM(active, 0)
                          : NULL;
    if (trace == NULL || !PyObject_TypeCheck(trace, &TraceCoreType) ||
        ((TraceCore *)trace)->closed || Py_IS_TYPE(callback, &TimerCallbackType)) {
        goto done;
    }
    long skip_frames = 0; /* the stack starts at whoever called call_at / call_later */
    if (p->takes_delay) {
        delay = Py_NewRef(arg);
        PyObject *now = PyObject_CallMethodNoArgs(loop, s_time);
        when = now != NULL ? PyNumber_Add(now, arg) : NULL;
        Py_XDECREF(now);
    }
    else {
        when = Py_NewRef(arg);
        PyObject *asked = call_later_delay(p->call_later_code, p->delay_index);
        if (asked != NULL) { /* asyncio's call_later, which calls call_at: recorded as one */
            delay = Py_NewRef(asked);
            kind = s_kind_call_later;
            skip_frames = 1;
        }
        else {
            PyObject *now = PyObject_CallMethodNoArgs(loop, s_time);
            delay = now != NULL ? PyNumber_Subtract(arg, now) : NULL;
            Py_XDECREF(now);
        }
    }
    if (when == NULL || delay == NULL) { /* not a number: the loop's own error, untraced */
        PyErr_Clear();
        goto done;
    }
    if ((skip = PyLong_FromLong(skip_frames)) == NULL) {
        rc = -1;
        goto done;
    }
    PyObject *call[4] = {trace, s_timer, PyTuple_GET_ITEM(active, 1), skip};
    res = call_new_resource(call);
    if (res == NULL || res == Py_None) {
        rc = res == NULL ? -1 : 0;
        goto done;
    }
    *wrapper = timer_new_impl(callback, trace, res, loop, when);
    if (*wrapper == NULL) {
        rc = -1;
        goto done;
    }
    PyObject *named = timer_kind(callback, kind);
    TraceCore *t = (TraceCore *)trace;
    int same = named == kind;
    if (note(t, res, s_kind, named) < 0 || note(t, res, s_delay_ms, as_ms(delay)) < 0 ||
        (same && note(t, res, s_callback, callback_name(callback)) < 0)) {
        Py_CLEAR(*wrapper);
        rc = -1;
        goto done;
    }
    rc = 1;
done:
    Py_XDECREF(active);
    Py_XDECREF(when);
    Py_XDECREF(delay);
    Py_XDECREF(res);
    Py_XDECREF(skip);
    return rc;
}

/* handle.__class__ = to, for a handle whose class is timer_handle_type (the caller checks). */
static void
swap_class(PyObject *handle, PyObject *to)
{
    PyTypeObject *from = Py_TYPE(handle);
    PyTypeObject *into = (PyTypeObject *)to;
    int plain = (from->tp_flags & into->tp_flags & Py_TPFLAGS_HEAPTYPE) &&
                from->tp_dictoffset == 0 && into->tp_dictoffset == 0;
#ifdef Py_TPFLAGS_MANAGED_DICT
    plain = plain && !((from->tp_flags | into->tp_flags) & Py_TPFLAGS_MANAGED_DICT);
#endif
    if (!class_swap_checked || !plain) {
        if (PyObject_SetAttr(handle, s_class, to) < 0) {
            report_and_clear("timers");
            return;
        }
        class_swap_checked = 1;
        return;
    }
    Py_INCREF(to);
    Py_SET_TYPE(handle, (PyTypeObject *)to);
    Py_DECREF(from);
}

/* A timer whose loop reports no cancel (uvloop's handle takes no class of ours): (res, handle)
 * added to the trace's watched timers under the resource that made it, as
 * timers._unsettled_append does; that Python function is called for the trace's first one,
 * which also makes the dict and puts the trace's finisher on. */
static int
watch_unsettled(TimerCallback *cb)
{
    PyObject *watched = cb->trace->watched;
    if (watched == NULL || !PyDict_CheckExact(watched)) {
        PyObject *out = PyObject_CallFunctionObjArgs(unsettled_append, (PyObject *)cb->trace,
                                                     (PyObject *)cb, NULL);
        Py_XDECREF(out);
        return out == NULL ? -1 : 0;
    }
    PyObject *key = cb->res->trigger_id;
    PyObject *mine = PyDict_GetItemWithError(watched, key); /* borrowed */
    if (mine == NULL) {
        if (PyErr_Occurred()) {
            return -1;
        }
        PyObject *fresh = PyList_New(0);
        if (fresh == NULL || PyDict_SetItem(watched, key, fresh) < 0) {
            Py_XDECREF(fresh);
            return -1;
        }
        mine = fresh;
        Py_DECREF(fresh); /* the dict holds it */
    }
    if (!PyList_Check(mine)) {
        PyErr_SetString(PyExc_TypeError, "a trace's watched timers must be lists");
        return -1;
    }
    PyObject *pair = PyTuple_Pack(2, (PyObject *)cb->res, cb->handle);
    int rc = pair == NULL ? -1 : PyList_Append(mine, pair);
    Py_XDECREF(pair);
    return rc;
}

static PyObject *
patch_call(PyObject *self, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    TimerPatch *p = (TimerPatch *)self;
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    Py_ssize_t nkw = kwnames == NULL ? 0 : PyTuple_GET_SIZE(kwnames);
    if (nargs < 3 || nargs + nkw > 64) {
        return PyObject_Vectorcall(p->original, args, nargsf, kwnames);
    }
    PyObject *wrapper = NULL;
    int traced = patch_prepare(p, args, &wrapper);
    if (traced <= 0) {
        if (traced < 0) {
            report_and_clear("timers");
        }
        return PyObject_Vectorcall(p->original, args, nargsf, kwnames);
    }
    PyObject *stack[64];
    for (Py_ssize_t i = 0; i < nargs + nkw; i++) {
        stack[i] = args[i];
    }
    stack[2] = wrapper;
    PyObject *handle = PyObject_Vectorcall(p->original, stack, nargs, kwnames);
    TimerCallback *cb = (TimerCallback *)wrapper;
    if (handle == NULL) { /* refused by the loop (a bad delay, a closed loop): as ever */
        PyObject *type, *value, *tb;
        fetch_exception(&type, &value, &tb);
        timer_done(cb, NULL, value);
        PyErr_Restore(type, value, tb);
        Py_DECREF(wrapper);
        return NULL;
    }
    Py_XSETREF(cb->handle, Py_NewRef(handle));
    if ((PyObject *)Py_TYPE(handle) == timer_handle_type && traced_handle_type != NULL) {
        /* asyncio's loops: the handle records its own cancel */
        swap_class(handle, traced_handle_type);
    }
    else if (unsettled_append != NULL) { /* uvloop's handles: watched, see core_check_watched */
        if (watch_unsettled(cb) < 0) {
            report_and_clear("timers");
        }
    }
    Py_DECREF(wrapper);
    return handle;
}

static PyObject *
patch_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    PyObject *original, *kind, *code;
    int takes_delay;
    Py_ssize_t index;
    if (!PyArg_ParseTuple(args, "OUpOn:TimerPatch", &original, &kind, &takes_delay, &code,
                          &index)) {
        return NULL;
    }
    if (!PyCallable_Check(original) || !PyCode_Check(code)) {
        PyErr_SetString(PyExc_TypeError, "TimerPatch(original, kind, takes_delay, "
                                         "call_later_code: code, delay_index)");
        return NULL;
    }
    TimerPatch *p = (TimerPatch *)type->tp_alloc(type, 0);
    if (p == NULL) {
        return NULL;
    }
    p->original = Py_NewRef(original);
    p->kind = Py_NewRef(kind);
    p->takes_delay = takes_delay;
    p->call_later_code = Py_NewRef(code);
    p->delay_index = index;
    p->vectorcall = patch_call;
    return (PyObject *)p;
}

static int
patch_traverse(TimerPatch *p, visitproc visit, void *arg)
{
    Py_VISIT(p->original);
    Py_VISIT(p->kind);
    Py_VISIT(p->call_later_code);
    return 0;
}

static int
patch_clear(TimerPatch *p)
{
    Py_CLEAR(p->original);
    Py_CLEAR(p->kind);
    Py_CLEAR(p->call_later_code);
    return 0;
}

static void
patch_dealloc(TimerPatch *p)
{
    PyObject_GC_UnTrack(p);
    patch_clear(p);
    Py_TYPE(p)->tp_free((PyObject *)p);
}

static PyTypeObject TimerPatchType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "asgi_asynctrace._speedups.TimerPatch",
    .tp_basicsize = sizeof(TimerPatch),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_doc = "TimerPatch(original, kind, takes_delay, call_later_code, delay_index).",
    .tp_new = patch_new,
    .tp_traverse = (traverseproc)patch_traverse,
    .tp_clear = (inquiry)patch_clear,
    .tp_dealloc = (destructor)patch_dealloc,
    .tp_call = PyVectorcall_Call,
    .tp_vectorcall_offset = offsetof(TimerPatch, vectorcall),
};

/* Set by the timers instrumentation: the context variable, asyncio's TimerHandle and what a
 * traced one becomes, and how a timer whose cancel the loop does not report is listed. */
static PyObject *
set_timer_hooks(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4 || !PyContextVar_CheckExact(args[0]) || !PyType_Check(args[1]) ||
        !PyType_Check(args[2]) || !PyCallable_Check(args[3])) {
        PyErr_SetString(PyExc_TypeError, "set_timer_hooks(var, timer_handle_type, "
                                         "traced_handle_type, unsettled_append)");
        return NULL;
    }
    Py_XSETREF(active_var, Py_NewRef(args[0]));
    class_swap_checked = 0; /* another pair of types: CPython checks it again */
    Py_XSETREF(timer_handle_type, Py_NewRef(args[1]));
    Py_XSETREF(traced_handle_type, Py_NewRef(args[2]));
    Py_XSETREF(unsettled_append, Py_NewRef(args[3]));
    Py_RETURN_NONE;
}
