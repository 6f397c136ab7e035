/* Part of _speedups.c (one translation unit; see there): TraceCore's settings from _stacks, its running step, the watchdog's quiet wait, its type. */

/* Set by _stacks: how a missed walk is formatted, where walks are cached, where they stop. */
static PyObject *
set_stack_formatter(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3 || !PyCallable_Check(args[0]) || !PyDict_CheckExact(args[1])) {
        PyErr_SetString(PyExc_TypeError, "set_stack_formatter(format, cache: dict, stop_code)");
        return NULL;
    }
    Py_XSETREF(format_stack, Py_NewRef(args[0]));
    Py_XSETREF(stack_cache, Py_NewRef(args[1]));
    Py_XSETREF(stop_code, Py_NewRef(args[2]));
    Py_RETURN_NONE;
}

/* Keeps codes (a tuple of at most max code objects) in slots; 0, or -1 with an exception. */
static int
keep_codes(PyObject *codes, PyObject **slots, int *n, int max)
{
    if (!PyTuple_Check(codes) || PyTuple_GET_SIZE(codes) > max) {
        PyErr_Format(PyExc_TypeError, "set_stack_bounds: a tuple of at most %d code objects", max);
        return -1;
    }
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(codes); i++) {
        if (!PyCode_Check(PyTuple_GET_ITEM(codes, i))) {
            PyErr_SetString(PyExc_TypeError, "set_stack_bounds: not a code object");
            return -1;
        }
    }
    for (int i = 0; i < *n; i++) {
        Py_CLEAR(slots[i]);
    }
    *n = (int)PyTuple_GET_SIZE(codes);
    for (int i = 0; i < *n; i++) {
        slots[i] = Py_NewRef(PyTuple_GET_ITEM(codes, i));
    }
    return 0;
}

/* Set by _stacks: the plain functions that drive a coroutine for the tracer (walked past, see
 * frame_kind), the frames that run a loop and those where a request begins (stopped at). */
static PyObject *
set_stack_bounds(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "set_stack_bounds(drivers, runners, requests)");
        return NULL;
    }
    if (keep_codes(args[0], stack_drivers, &n_stack_drivers, MAX_DRIVERS) < 0 ||
        keep_codes(args[1], loop_runners, &n_loop_runners, MAX_RUNNERS) < 0 ||
        keep_codes(args[2], request_bounds, &n_request_bounds, MAX_BOUNDARIES) < 0) {
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyMethodDef core_methods[] = {
    {"add", (PyCFunction)(void (*)(void))core_add, METH_FASTCALL,
     "add(type, trigger_id, stack_id, now) -> Resource | None (None over the cap)."},
    {"begin", (PyCFunction)(void (*)(void))core_begin, METH_FASTCALL,
     "begin(res, now): a callback of res starts running."},
    {"end", (PyCFunction)(void (*)(void))core_end, METH_FASTCALL,
     "end(res, now): the running callback of res returns."},
    {"settle", (PyCFunction)(void (*)(void))core_settle, METH_FASTCALL,
     "settle(res, now, state): res reached its final state; only the first counts."},
    {"annotate", (PyCFunction)(void (*)(void))core_annotate, METH_FASTCALL,
     "annotate(res, key, value): label res."},
    {"stack_id", (PyCFunction)(void (*)(void))core_stack_id, METH_FASTCALL,
     "stack_id(key, frames) -> int | None: the stack's index in this trace's table."},
    {"new_resource", (PyCFunction)(void (*)(void))core_new_resource, METH_FASTCALL,
     "new_resource(type, parent, skip) -> Resource | None, with its creation stack."},
    {NULL},
};

static PyMemberDef core_members[] = {
    {"resources", T_OBJECT_EX, offsetof(TraceCore, resources), 0, NULL},
    {"annotations", T_OBJECT_EX, offsetof(TraceCore, annotations), 0, NULL},
    {"stacks", T_OBJECT_EX, offsetof(TraceCore, stacks), 0, NULL},
    {"_stack_ids", T_OBJECT_EX, offsetof(TraceCore, stack_ids), 0, NULL},
    {"dropped", T_OBJECT_EX, offsetof(TraceCore, dropped), 0, NULL},
    {"closed", T_BOOL, offsetof(TraceCore, closed), 0, NULL},
    {"_max_resources", T_PYSSIZET, offsetof(TraceCore, max_resources), 0, NULL},
    {"_max_annotations", T_PYSSIZET, offsetof(TraceCore, max_annotations), 0, NULL},
    {"_max_annotation_length", T_PYSSIZET, offsetof(TraceCore, max_annotation_length), 0, NULL},
    {"_max_callbacks", T_PYSSIZET, offsetof(TraceCore, max_callbacks), 0, NULL},
    {"_max_stacks", T_PYSSIZET, offsetof(TraceCore, max_stacks), 0, NULL},
    {"stack_depth", T_PYSSIZET, offsetof(TraceCore, stack_depth), 0, NULL},
    {"_next_id", T_LONGLONG, offsetof(TraceCore, next_id), 0, NULL},
    {"_watched", T_OBJECT, offsetof(TraceCore, watched), 0, NULL},
    {"samples", T_OBJECT, offsetof(TraceCore, samples), 0, NULL},
    {NULL},
};

/* (resource, thread ident) of the step running now, or None: for the watchdog. */
static PyObject *
core_get_running(TraceCore *t, void *unused)
{
    if (t->running == NULL) {
        Py_RETURN_NONE;
    }
    return Py_BuildValue("(Ok)", t->running, t->running_thread);
}

static int
core_set_running(TraceCore *t, PyObject *value, void *unused)
{
    PyObject *res = NULL;
    unsigned long thread = 0;
    if (value != NULL && value != Py_None &&
        !PyArg_ParseTuple(value, "Ok:_running", &res, &thread)) {
        return -1;
    }
    running_changed(t->running, res);
    Py_XSETREF(t->running, Py_XNewRef(res));
    t->running_thread = thread;
    return 0;
}

#ifdef HAVE_QUIET_WAIT
static unsigned long quiet_pokes;

/* quiet_poke(bump) -> int: with bump true, every quiet_wait under way returns False now (a
 * trace watched meanwhile wants its steps sampled sooner than the wait's after_ns); the count
 * of pokes, which a quiet_wait is given as where it starts from. */
static PyObject *
quiet_poke(PyObject *module, PyObject *bump)
{
    int yes = PyObject_IsTrue(bump);
    if (yes < 0) {
        return NULL;
    }
    if (yes) {
        __atomic_add_fetch(&quiet_pokes, 1, __ATOMIC_RELAXED);
    }
    return PyLong_FromUnsignedLong(__atomic_load_n(&quiet_pokes, __ATOMIC_RELAXED));
}

/* How long a quiet_wait sleeps at most between two looks: a poke is seen within this. */
#define LOOK_EVERY_NS 20000000LL

/* quiet_wait(pause_ns, after_ns, limit_ns, pokes) -> bool: the watchdog's sleep, with the GIL
 * let go throughout. Returns True when a step may be due for a sample: the step running at
 * the call still runs pause_ns later (the caller reckoned it due then), or one that began
 * since has run after_ns with no step starting or ending (counted from when it began, as
 * running_changed noted, and never from before the look that last saw none of it); then the
 * watchdog takes the GIL to look. Returns False once no traced step has run, started or ended
 * for limit_ns (the process has gone quiet: the watchdog may sleep), or once the count of
 * pokes is no longer pokes (read with quiet_poke(False) before the caller said what it waits
 * for).
 *
 * Each return costs the thread the GIL, which a busy loop hands over badly: it lets go at
 * every poll of its selector and takes it back at once, and a thread that waits for it is
 * woken each time and mostly loses (its wait times out, and asks for the GIL outright, only
 * after 5 ms without a wake-up): 70-330 ms of futile wake-ups, a futex call on the loop's side
 * at each poll, for one look. Looking every 20 ms with the GIL cost 1-2 % of the process's
 * CPU with one request in a hundred traced; returning every second under a steady trickle
 * of sampled requests, to see whether to sleep, cost 300-1,300 wake-ups a second. So it
 * returns only for a long step, a poke, or quiet. Between its looks it sleeps until a step
 * could be due (at most LOOK_EVERY_NS, for a poke): not four times per after_ns, which woke
 * it 200 times a second, each a switch of the loop's processor to it and back when they
 * share one. */
static PyObject *
quiet_wait(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    long long pause, after, limit;
    unsigned long pokes;
    if (nargs != 4 || (pause = PyLong_AsLongLong(args[0])) == -1 ||
        (after = PyLong_AsLongLong(args[1])) == -1 || (limit = PyLong_AsLongLong(args[2])) == -1 ||
        ((pokes = PyLong_AsUnsignedLong(args[3])) == (unsigned long)-1 && PyErr_Occurred())) {
        if (!PyErr_Occurred()) {
            PyErr_SetString(PyExc_TypeError, "quiet_wait(pause_ns, after_ns, limit_ns, pokes)");
        }
        return NULL;
    }
    after = after < 1000000 ? 1000000 : after; /* at least 1 ms: never a spin */
    pause = pause < 1000000 ? 1000000 : pause;
    int long_step = 0;
    Py_BEGIN_ALLOW_THREADS
    __atomic_add_fetch(&quiet_waiters, 1, __ATOMIC_RELAXED);
    long long start = monotonic_ns(), now = start, looked = start, busy = start;
    /* due: when the step being timed has run long enough (at first the one running at the
     * call, by the caller's reckoning); 0: none is (nothing ran at the last look) */
    long long due = start + pause;
    unsigned long seen = __atomic_load_n(&step_changes, __ATOMIC_RELAXED);
    for (;;) {
        long long nap = (due ? due : now + after) - now;
        nap = nap < 1000000 ? 1000000 : nap > LOOK_EVERY_NS ? LOOK_EVERY_NS : nap;
        if (limit - (now - busy) < nap) {
            nap = limit - (now - busy);
        }
        if (nap > 0) {
            struct timespec ts = {(time_t)(nap / 1000000000LL), (long)(nap % 1000000000LL)};
            nanosleep(&ts, NULL);
        }
        now = monotonic_ns();
        if (__atomic_load_n(&quiet_pokes, __ATOMIC_RELAXED) != pokes) {
            break;
        }
        unsigned long changes = __atomic_load_n(&step_changes, __ATOMIC_RELAXED);
        if (__atomic_load_n(&steps_running, __ATOMIC_RELAXED) <= 0) {
            due = 0;
        }
        else if (changes != seen) { /* a step began since the last look: after_ns from then */
            long long began = __atomic_load_n(&step_started_at, __ATOMIC_RELAXED);
            due = (began > looked ? began : looked) + after;
        }
        else if (due == 0) { /* one began between the two reads above: from now, then */
            due = now + after;
        }
        if (changes != seen || due) {
            busy = now; /* a traced step ran since the last look, or runs */
        }
        seen = changes;
        looked = now;
        if (due && now >= due) {
            long_step = 1;
            break;
        }
        if (now - busy >= limit) {
            break;
        }
    }
    __atomic_sub_fetch(&quiet_waiters, 1, __ATOMIC_RELAXED);
    Py_END_ALLOW_THREADS
    return PyBool_FromLong(long_step);
}
#endif /* HAVE_QUIET_WAIT */

static PyGetSetDef core_getset[] = {
    {"_running", (getter)core_get_running, (setter)core_set_running,
     "(resource, thread ident) of the step running now, or None", NULL},
    {NULL},
};

static PyTypeObject TraceCoreType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "asgi_asynctrace._speedups.TraceCore",
    .tp_basicsize = sizeof(TraceCore),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "The recording methods of a trace (the base of _model.Trace).",
    .tp_new = core_new,
    .tp_traverse = (traverseproc)core_traverse,
    .tp_clear = (inquiry)core_clear,
    .tp_dealloc = (destructor)core_dealloc,
    .tp_methods = core_methods,
    .tp_members = core_members,
    .tp_getset = core_getset,
};

/* trace.new_resource(type, parent, skip) for call = {trace, type, parent, skip}: the hooks
 * call it by name, so a Trace subclass's own method (or a test's) is the one that runs; when
 * the trace's class has not replaced TraceCore's, it is called straight, without the lookup
 * and the bound call. */
static PyObject *core_new_resource_method; /* TraceCore's own, from its type dict */
static PyObject *s_new_resource;

static PyObject *
call_new_resource(PyObject *const *call)
{
    PyTypeObject *type = Py_TYPE(call[0]);
    if (core_new_resource_method != NULL && type->tp_dictoffset == 0 &&
        PyObject_TypeCheck(call[0], &TraceCoreType) &&
        _PyType_Lookup(type, s_new_resource) == core_new_resource_method) {
        return core_new_resource((TraceCore *)call[0], call + 1, 3);
    }
    return PyObject_VectorcallMethod(s_new_resource, (PyObject **)call, 4, NULL);
}
