/* Part of _speedups.c (one translation unit; see there): futures: TracedFuture's settling (SettleAfter) and create_future's traced side (FutureMaker). */

/* Futures (_futures.TracedFuture and create_future's traced side, in C). SettleAfter(method,
 * state, only_if_true) goes in TracedFuture's class in place of set_result / set_exception /
 * cancel: it calls asyncio's own method, then settles the future's resource (for cancel, only
 * when the cancel took). FutureMaker(var, original, traced_future_type, own) is the traced side
 * of the loop's create_future: a future made by a function whose code is in the tuple own
 * (asyncio's sleep, wait_for and wait, whose timer or task already says what was waited for)
 * is asyncio's own. */
static PyObject *s_record_futures, *s_asynctrace_trace, *s_future;

typedef struct {
    PyObject_HEAD
    PyObject *method;
    PyObject *state;
    int only_if_true;
    vectorcallfunc vectorcall;
} SettleAfter;

static PyObject *
settle_after_call(PyObject *self, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    SettleAfter *s = (SettleAfter *)self;
    PyObject *out = PyObject_Vectorcall(s->method, args, nargsf, kwnames);
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    if (out == NULL || nargs < 1) {
        return out;
    }
    if (s->only_if_true) {
        int took = PyObject_IsTrue(out);
        if (took <= 0) {
            if (took < 0) {
                Py_DECREF(out);
                return NULL;
            }
            return out;
        }
    }
    PyObject *res = slot_get(args[0], s_asynctrace_res);
    if (res == NULL) {
        report_and_clear("future");
        return out;
    }
    if (Py_IS_TYPE(res, &ResourceType)) {
        ResourceObject *r = (ResourceObject *)res;
        if (r->settled_at == Py_None || r->settled_at == NULL) {
            PyObject *now = now_ns();
            if (now == NULL) {
                report_and_clear("future");
            }
            else {
                settle_resource(r, now, s->state);
                Py_DECREF(now);
            }
        }
    }
    Py_DECREF(res);
    return out;
}

static PyObject *
settle_after_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    PyObject *method, *state;
    int only_if_true;
    if (!PyArg_ParseTuple(args, "OUp:SettleAfter", &method, &state, &only_if_true)) {
        return NULL;
    }
    SettleAfter *s = (SettleAfter *)type->tp_alloc(type, 0);
    if (s == NULL) {
        return NULL;
    }
    s->method = Py_NewRef(method);
    s->state = Py_NewRef(state);
    s->only_if_true = only_if_true;
    s->vectorcall = settle_after_call;
    return (PyObject *)s;
}

static int
settle_after_traverse(SettleAfter *s, visitproc visit, void *arg)
{
    Py_VISIT(s->method);
    Py_VISIT(s->state);
    return 0;
}

static int
settle_after_clear(SettleAfter *s)
{
    Py_CLEAR(s->method);
    Py_CLEAR(s->state);
    return 0;
}

static void
settle_after_dealloc(SettleAfter *s)
{
    PyObject_GC_UnTrack(s);
    settle_after_clear(s);
    Py_TYPE(s)->tp_free((PyObject *)s);
}

static PyTypeObject SettleAfterType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "asgi_asynctrace._speedups.SettleAfter",
    .tp_basicsize = sizeof(SettleAfter),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL |
                Py_TPFLAGS_METHOD_DESCRIPTOR,
    .tp_doc = "SettleAfter(method, state, only_if_true): a future method that settles after.",
    .tp_new = settle_after_new,
    .tp_traverse = (traverseproc)settle_after_traverse,
    .tp_clear = (inquiry)settle_after_clear,
    .tp_dealloc = (destructor)settle_after_dealloc,
    .tp_descr_get = dispatch_get,
    .tp_call = PyVectorcall_Call,
    .tp_vectorcall_offset = offsetof(SettleAfter, vectorcall),
};

typedef struct {
    PyObject_HEAD
    PyObject *var;
    PyObject *original;
    PyObject *future_type;
    PyObject *own; /* a tuple of code objects */
    vectorcallfunc vectorcall;
} FutureMaker;

/* Whether the running Python frame (create_future's caller) runs one of the codes in own. */
static int
made_by_one_of(PyObject *own)
{
    Py_ssize_t n = PyTuple_GET_SIZE(own);
    if (n == 0) {
        return 0;
    }
#ifdef INTERNAL_FRAMES
    _PyInterpreterFrame *f = running_frame();
    PyObject *code = f == NULL ? NULL : FRAME_CODE(f);
#else
    PyFrameObject *frame = PyEval_GetFrame(); /* borrowed */
    PyObject *code = NULL;
    if (frame != NULL) {
        code = (PyObject *)PyFrame_GetCode(frame);
        Py_DECREF(code); /* the frame keeps it: compared only */
    }
#endif
    for (Py_ssize_t i = 0; code != NULL && i < n; i++) {
        if (PyTuple_GET_ITEM(own, i) == code) {
            return 1;
        }
    }
    return 0;
}

static PyObject *
future_maker_call(PyObject *self, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    FutureMaker *m = (FutureMaker *)self;
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    PyObject *active = NULL;
    if (nargs != 1 || kwnames != NULL || PyContextVar_Get(m->var, NULL, &active) < 0) {
        PyErr_Clear();
        return PyObject_Vectorcall(m->original, args, nargsf, kwnames);
    }
    PyObject *trace = active != NULL && PyTuple_CheckExact(active) &&
                              PyTuple_GET_SIZE(active) == 2
                          ? PyTuple_GET_ITEM(active, 0)
                          : NULL;
    int wanted = 0;
    if (trace != NULL && PyObject_TypeCheck(trace, &TraceCoreType) &&
        !((TraceCore *)trace)->closed) {
        PyObject *flag = slot_get(trace, s_record_futures);
        wanted = flag == NULL ? -1 : PyObject_IsTrue(flag);
        Py_XDECREF(flag);
        if (wanted > 0 && made_by_one_of(m->own)) {
            wanted = 0;
        }
    }
    if (wanted <= 0) {
        Py_XDECREF(active);
        if (wanted < 0) {
            report_and_clear("create-future");
        }
        return PyObject_Vectorcall(m->original, args, nargsf, kwnames);
    }
    PyObject *fut = PyObject_Vectorcall(m->future_type, args, 0, s_loop_only);
    if (fut == NULL) {
        Py_DECREF(active);
        return NULL; /* the loop's own future could not be made either */
    }
    if (slot_set(fut, s_asynctrace_trace, trace) < 0 ||
        slot_set(fut, s_asynctrace_res, Py_None) < 0) {
        Py_DECREF(active);
        Py_DECREF(fut);
        return NULL;
    }
    PyObject *skip = PyLong_FromLong(0); /* the stack from create_future's caller */
    PyObject *call[4] = {trace, s_future, PyTuple_GET_ITEM(active, 1), skip};
    PyObject *res = skip ? call_new_resource(call) : NULL;
    Py_XDECREF(skip);
    if (res == NULL || slot_set(fut, s_asynctrace_res, res) < 0) {
        report_and_clear("create-future");
    }
    Py_XDECREF(res);
    Py_DECREF(active);
    return fut;
}

static PyObject *
future_maker_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    PyObject *var, *original, *future_type, *own;
    if (!PyArg_ParseTuple(args, "OOOO!:FutureMaker", &var, &original, &future_type, &PyTuple_Type,
                          &own)) {
        return NULL;
    }
    if (!PyContextVar_CheckExact(var) || !PyCallable_Check(original) ||
        !PyType_Check(future_type)) {
        PyErr_SetString(PyExc_TypeError, "FutureMaker(var, original, traced_future_type, own)");
        return NULL;
    }
    FutureMaker *m = (FutureMaker *)type->tp_alloc(type, 0);
    if (m == NULL) {
        return NULL;
    }
    m->var = Py_NewRef(var);
    m->original = Py_NewRef(original);
    m->future_type = Py_NewRef(future_type);
    m->own = Py_NewRef(own);
    m->vectorcall = future_maker_call;
    return (PyObject *)m;
}

static int
future_maker_traverse(FutureMaker *m, visitproc visit, void *arg)
{
    Py_VISIT(m->var);
    Py_VISIT(m->original);
    Py_VISIT(m->future_type);
    Py_VISIT(m->own);
    return 0;
}

static int
future_maker_clear(FutureMaker *m)
{
    Py_CLEAR(m->var);
    Py_CLEAR(m->original);
    Py_CLEAR(m->future_type);
    Py_CLEAR(m->own);
    return 0;
}

static void
future_maker_dealloc(FutureMaker *m)
{
    PyObject_GC_UnTrack(m);
    future_maker_clear(m);
    Py_TYPE(m)->tp_free((PyObject *)m);
}

static PyTypeObject FutureMakerType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "asgi_asynctrace._speedups.FutureMaker",
    .tp_basicsize = sizeof(FutureMaker),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_doc = "FutureMaker(var, original, traced_future_type, own): create_future's traced side.",
    .tp_new = future_maker_new,
    .tp_traverse = (traverseproc)future_maker_traverse,
    .tp_clear = (inquiry)future_maker_clear,
    .tp_dealloc = (destructor)future_maker_dealloc,
    .tp_call = PyVectorcall_Call,
    .tp_vectorcall_offset = offsetof(FutureMaker, vectorcall),
};
