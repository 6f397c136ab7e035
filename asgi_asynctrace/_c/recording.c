/* Part of _speedups.c (one translation unit; see there): TraceCore's recording methods: add, begin, end, settle, annotate, stack ids, new_resource. */

/* add(type, trigger_id, stack_id, now) -> Resource | None */
static PyObject *
core_add_impl(TraceCore *t, PyObject *type, PyObject *trigger, PyObject *stack, PyObject *now)
{
    if (core_ready(t) < 0) {
        return NULL;
    }
    if (PyList_GET_SIZE(t->resources) >= t->max_resources) {
        if (count_dropped(t, "resources") < 0) {
            return NULL;
        }
        Py_RETURN_NONE;
    }
    ResourceObject *r = PyObject_New(ResourceObject, &ResourceType);
    if (r == NULL) {
        return NULL;
    }
    r->async_id = PyLong_FromLongLong(t->next_id);
    if (r->async_id == NULL) {
        r->trigger_id = r->type = r->stack_id = r->created_at = r->callbacks = NULL;
        r->settled_at = r->state = r->annotation_count = r->awaited_by = NULL;
        Py_DECREF(r);
        return NULL;
    }
    t->next_id++;
    r->trigger_id = Py_NewRef(trigger);
    r->type = Py_NewRef(type);
    r->stack_id = Py_NewRef(stack);
    r->created_at = Py_NewRef(now);
    r->callbacks = NULL;
    r->settled_at = Py_NewRef(Py_None);
    r->state = Py_NewRef(s_pending);
    r->annotation_count = Py_NewRef(zero);
    r->awaited_by = Py_NewRef(Py_None);
    if (PyList_Append(t->resources, (PyObject *)r) < 0) {
        Py_DECREF(r);
        return NULL;
    }
    return (PyObject *)r;
}

static PyObject *
core_add(TraceCore *t, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "add(type, trigger_id, stack_id, now)");
        return NULL;
    }
    return core_add_impl(t, args[0], args[1], args[2], args[3]);
}

static PyObject *
core_begin(TraceCore *t, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "begin(res, now)");
        return NULL;
    }
    ResourceObject *r = as_resource(args[0]);
    if (r == NULL) {
        return NULL;
    }
    if (r->callbacks == NULL && (r->callbacks = PyList_New(0)) == NULL) {
        return NULL;
    }
    if (!PyList_Check(r->callbacks)) {
        PyErr_SetString(PyExc_TypeError, "resource callbacks must be a list");
        return NULL;
    }
    if (PyList_GET_SIZE(r->callbacks) < t->max_callbacks) {
        if (PyList_Append(r->callbacks, args[1]) < 0) {
            return NULL;
        }
    }
    else if (count_dropped(t, "callbacks") < 0) {
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *
core_end(TraceCore *t, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "end(res, now)");
        return NULL;
    }
    ResourceObject *r = as_resource(args[0]);
    if (r == NULL) {
        return NULL;
    }
    PyObject *cb = r->callbacks;
    if (cb != NULL && PyList_Check(cb) && (PyList_GET_SIZE(cb) & 1)) {
        if (PyList_Append(cb, args[1]) < 0) {
            return NULL;
        }
    }
    core_check_watched(t, r, args[1]);
    Py_RETURN_NONE;
}

static PyObject *
core_settle(TraceCore *t, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "settle(res, now, state)");
        return NULL;
    }
    ResourceObject *r = as_resource(args[0]);
    if (r == NULL) {
        return NULL;
    }
    settle_resource(r, args[1], args[2]);
    Py_RETURN_NONE;
}

static PyObject *
core_annotate(TraceCore *t, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "annotate(res, key, value)");
        return NULL;
    }
    ResourceObject *r = as_resource(args[0]);
    if (r == NULL || core_ready(t) < 0) {
        return NULL;
    }
    Py_ssize_t count = r->annotation_count ? PyLong_AsSsize_t(r->annotation_count) : 0;
    if (count == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (count >= t->max_annotations) {
        if (count_dropped(t, "annotations") < 0) {
            return NULL;
        }
        Py_RETURN_NONE;
    }
    PyObject *value = args[2];
    Py_ssize_t limit = t->max_annotation_length;
    if (PyUnicode_Check(value)) {
        if (PyUnicode_GET_LENGTH(value) > limit) {
            PyObject *head = PyUnicode_Substring(value, 0, limit);
            value = head ? PyUnicode_Concat(head, s_ellipsis) : NULL;
            Py_XDECREF(head);
            if (value == NULL || count_dropped(t, "truncated") < 0) {
                Py_XDECREF(value);
                return NULL;
            }
        }
        else {
            Py_INCREF(value);
        }
    }
    else if (value == Py_None || PyLong_Check(value) || PyFloat_Check(value)) {
        Py_INCREF(value); /* bool is an int */
    }
    else {
        PyObject *text = PyObject_Repr(value);
        if (text == NULL) {
            return NULL;
        }
        value = PyUnicode_Substring(text, 0, Py_MIN(limit, PyUnicode_GET_LENGTH(text)));
        Py_DECREF(text);
        if (value == NULL) {
            return NULL;
        }
    }
    PyObject *n = PyLong_FromSsize_t(count + 1);
    PyObject *item = n ? PyTuple_Pack(3, r->async_id, args[1], value) : NULL;
    Py_DECREF(value);
    if (item == NULL || PyList_Append(t->annotations, item) < 0) {
        Py_XDECREF(n);
        Py_XDECREF(item);
        return NULL;
    }
    Py_DECREF(item);
    Py_XSETREF(r->annotation_count, n);
    Py_RETURN_NONE;
}

/* The index of ``key`` in the stack table, adding ``frames`` (or, when NULL, the key's
 * ``frames`` attribute) under it: a new reference, None when the table is full. */
static PyObject *
core_stack_id_impl(TraceCore *t, PyObject *key, PyObject *frames)
{
    /* An identity key is either among t->ident (the first IDENTITY_KEYS of them) or in the
     * dict, never both: the scan always comes first. */
    int by_identity = identity_key(key);
    if (by_identity) {
        for (Py_ssize_t i = 0; i < t->n_ident; i++) {
            if (t->ident[i].key == key) {
                return Py_NewRef(t->ident[i].sid);
            }
        }
        if (t->n_ident == t->ident_size && t->ident_size < IDENTITY_KEYS) {
            Py_ssize_t size = t->ident_size ? IDENTITY_KEYS : IDENTITY_KEYS / 2;
            struct ident_key *grown = PyMem_Realloc(t->ident, size * sizeof(struct ident_key));
            if (grown == NULL) {
                PyErr_NoMemory();
                return NULL;
            }
            t->ident = grown;
            t->ident_size = size;
        }
        by_identity = t->n_ident < IDENTITY_KEYS;
    }
    PyObject *sid = NULL;
    if (!by_identity) {
        sid = PyDict_GetItemWithError(t->stack_ids, key);
        if (sid != NULL) {
            return Py_NewRef(sid);
        }
        if (PyErr_Occurred()) {
            return NULL;
        }
    }
    if (PyList_GET_SIZE(t->stacks) >= t->max_stacks) {
        if (count_dropped(t, "stacks") < 0) {
            return NULL;
        }
        Py_RETURN_NONE;
    }
    PyObject *owned = NULL;
    if (frames == NULL && (frames = owned = slot_get(key, s_frames)) == NULL) {
        return NULL;
    }
    sid = PyLong_FromSsize_t(PyList_GET_SIZE(t->stacks));
    if (sid == NULL || PyList_Append(t->stacks, frames) < 0 ||
        (!by_identity && PyDict_SetItem(t->stack_ids, key, sid) < 0)) {
        Py_XDECREF(owned);
        Py_XDECREF(sid);
        return NULL;
    }
    if (by_identity) {
        t->ident[t->n_ident].key = Py_NewRef(key);
        t->ident[t->n_ident].sid = Py_NewRef(sid);
        t->n_ident++;
    }
    Py_XDECREF(owned);
    return sid;
}

static PyObject *
core_stack_id(TraceCore *t, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "stack_id(key, frames)");
        return NULL;
    }
    if (core_ready(t) < 0) {
        return NULL;
    }
    return core_stack_id_impl(t, args[0], args[1]);
}

/* new_resource(type, parent, skip): a resource of ``type`` made now by ``parent``, with the
 * creation stack that starts ``skip`` frames out from the calling frame (0: the caller). */
static PyObject *
core_new_resource(TraceCore *t, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "new_resource(type, parent, skip)");
        return NULL;
    }
    ResourceObject *parent = as_resource(args[1]);
    Py_ssize_t skip = PyLong_AsSsize_t(args[2]);
    if (parent == NULL || (skip == -1 && PyErr_Occurred()) || core_ready(t) < 0) {
        return NULL;
    }
    if (skip < 0) {
        PyErr_SetString(PyExc_ValueError, "skip must be >= 0");
        return NULL;
    }
    PyObject *now = clock_ns();
    if (now == NULL) {
        return NULL;
    }
    PyObject *sid = Py_NewRef(Py_None);
    if (t->stack_depth > 0 && format_stack != NULL && stack_cache != NULL) {
        PyObject *walk[4] = {args[2], NULL, stop_code, stack_cache};
        PyObject *depth = PyLong_FromSsize_t(t->stack_depth);
        walk[1] = depth;
        PyObject *stack = depth ? stack_lookup(NULL, walk, 4) : NULL;
        Py_XDECREF(depth);
        if (stack != NULL && PyTuple_CheckExact(stack)) { /* a miss: (hash, key) to format */
            PyObject *at = PyLong_FromSsize_t(skip + 1);
            PyObject *made = at ? PyObject_CallFunctionObjArgs(format_stack, stack, at, NULL)
                                : NULL;
            Py_XDECREF(at);
            Py_SETREF(stack, made);
        }
        if (stack == NULL) {
            Py_DECREF(now);
            Py_DECREF(sid);
            return NULL;
        }
        Py_SETREF(sid, core_stack_id_impl(t, stack, NULL));
        Py_DECREF(stack);
        if (sid == NULL) {
            Py_DECREF(now);
            return NULL;
        }
    }
    PyObject *res = core_add_impl(t, args[0], parent->async_id, sid, now);
    Py_DECREF(sid);
    Py_DECREF(now);
    return res;
}

static void
core_drop_index(TraceCore *t)
{
    if (t->ident != NULL) {
        struct ident_key *ident = t->ident;
        Py_ssize_t n = t->n_ident;
        t->ident = NULL;
        t->n_ident = t->ident_size = 0;
        for (Py_ssize_t i = 0; i < n; i++) {
            Py_DECREF(ident[i].key);
            Py_DECREF(ident[i].sid);
        }
        PyMem_Free(ident);
    }
}

static int
core_traverse(TraceCore *t, visitproc visit, void *arg)
{
    Py_VISIT(t->resources);
    Py_VISIT(t->annotations);
    Py_VISIT(t->stacks);
    Py_VISIT(t->stack_ids);
    Py_VISIT(t->dropped);
    Py_VISIT(t->watched);
    Py_VISIT(t->running);
    Py_VISIT(t->samples);
    for (Py_ssize_t i = 0; i < t->n_ident; i++) {
        Py_VISIT(t->ident[i].key);
    }
    return 0;
}

static int
core_clear(TraceCore *t)
{
    Py_CLEAR(t->resources);
    Py_CLEAR(t->annotations);
    Py_CLEAR(t->stacks);
    Py_CLEAR(t->stack_ids);
    Py_CLEAR(t->dropped);
    Py_CLEAR(t->watched);
    if (t->running != NULL) {
        running_changed(t->running, NULL);
        Py_CLEAR(t->running);
    }
    Py_CLEAR(t->samples);
    core_drop_index(t);
    return 0;
}

static void
core_dealloc(TraceCore *t)
{
    PyObject_GC_UnTrack(t);
    core_clear(t);
    Py_TYPE(t)->tp_free((PyObject *)t);
}

static PyObject *
core_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    TraceCore *t = (TraceCore *)type->tp_alloc(type, 0);
    if (t != NULL) {
        t->next_id = 1;
        t->max_resources = t->max_annotations = t->max_annotation_length = PY_SSIZE_T_MAX;
        t->max_callbacks = t->max_stacks = PY_SSIZE_T_MAX;
    }
    return (PyObject *)t;
}
