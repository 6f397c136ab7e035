/* Hot loops that pure Python cannot make cheap: the walk of a creation stack, the
 * middleware's header scan on every request, a trace's resources and annotations written as
 * JSON, the loop methods the hooks replace (Dispatch), the recording core (TraceCore,
 * Resource), and what every traced task runs through: the task factory's traced side
 * (TaskFactory) and each step of its coroutine (TimedCoroutine).
 *
 *   got = stack_lookup(skip, max_depth, stop_code, cache)   # a Stack, or (hash, packed walk)
 *
 * Walks from the caller's frame (skip = 0) outwards, at most max_depth frames, stopping
 * before a frame running stop_code or where the loop runs the task (frame_kind, below), and
 * looks the (code object address, last instruction) pairs of the walk up in the cache,
 * allocating nothing the garbage collector sees on a hit.
 * The Python fallback in _stacks.py keys its own cache by the same pairs as a tuple; the two
 * caches never meet. Optional at build time: without a compiler the package runs on the
 * fallback.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <time.h>
#include <frameobject.h>
#include <structmember.h>

/* On CPython 3.11-3.13 the walk reads the interpreter's own frame records instead of asking for
 * frame objects: PyFrame_GetBack() makes a frame object (a garbage-collected allocation) for
 * every frame it passes that has none yet, which was most of what a stack cost. Which frames
 * count is decided by the interpreter's own _PyFrame_IsIncomplete, the test PyFrame_GetBack()
 * applies, so both walks see the same frames. Other versions use the public API. */
#if PY_VERSION_HEX >= 0x030B0000 && PY_VERSION_HEX < 0x030E0000 && !defined(PYPY_VERSION)
#define INTERNAL_FRAMES 1
#ifndef Py_BUILD_CORE
#define Py_BUILD_CORE 1
#define UNDEF_BUILD_CORE 1
#endif
#include <internal/pycore_frame.h>
#ifdef UNDEF_BUILD_CORE
#undef Py_BUILD_CORE
#endif
#endif


/* The accelerator is one translation unit, its parts in _c/ included in order: each part uses
 * what the ones before it define, and the hot paths that cross parts (a traced step runs
 * through coroutine.c, recording.c and core.c) stay static and inlined as one file would. */
#include "_c/slots.c"
#include "_c/stacks.c"
#include "_c/headers.c"
#include "_c/json.c"
#include "_c/dispatch.c"
#include "_c/json_trace.c"
#include "_c/resource.c"
#include "_c/core.c"
#include "_c/recording.c"
#include "_c/core_type.c"
#include "_c/coroutine.c"
#include "_c/tasks.c"
#include "_c/timers.c"
#include "_c/timer_patch.c"
#include "_c/calls.c"
#include "_c/keyed.c"
#include "_c/futures.c"

#include "_c/request.c"

static PyMethodDef methods[] = {
    {"untraced_check", (PyCFunction)(void (*)(void))untraced_check, METH_FASTCALL,
     "untraced_check(scope, header, prefix) -> None, the header value, True or NotImplemented."},
    {"find_header", (PyCFunction)(void (*)(void))find_header, METH_FASTCALL,
     "find_header(headers, name) -> the first value of header name, None or NotImplemented."},
    {"start_trace", (PyCFunction)(void (*)(void))start_trace, METH_FASTCALL,
     "start_trace(cls, trace_id, request, limits, ints, origin, started_at_unix_ns, "
     "dropped_type) -> a started trace, as Trace.start makes it."},
    {"open_request", (PyCFunction)(void (*)(void))open_request, METH_FASTCALL,
     "open_request(scope, websocket, traced, settings) -> a traced request's trace, or "
     "NotImplemented."},
    {"set_stack_formatter", (PyCFunction)(void (*)(void))set_stack_formatter, METH_FASTCALL,
     "set_stack_formatter(format, cache, stop_code): what TraceCore.new_resource walks with."},
#ifdef HAVE_QUIET_WAIT
    {"quiet_poke", (PyCFunction)quiet_poke, METH_O,
     "quiet_poke(bump): with bump true, every quiet_wait under way returns False now; the "
     "count of pokes"},
    {"quiet_wait", (PyCFunction)(void (*)(void))quiet_wait, METH_FASTCALL,
     "quiet_wait(pause_ns, after_ns, limit_ns, pokes): sleep, without the GIL, until a step "
     "has run after_ns with no other starting or ending (True), limit_ns without a traced "
     "step, or a poke (False)"},
#endif
    {"set_stack_bounds", (PyCFunction)(void (*)(void))set_stack_bounds, METH_FASTCALL,
     "set_stack_bounds(drivers, runners, requests): code a walk goes past into the coroutine "
     "it drives, code that runs a loop and code where a request begins (stopped at)."},
    {"stack_lookup", (PyCFunction)(void (*)(void))stack_lookup, METH_FASTCALL,
     "stack_lookup(skip, max_depth, stop_code, cache) -> the cached Stack, or (hash, key)."},
    {"stacks_json", (PyCFunction)(void (*)(void))stacks_json, METH_FASTCALL,
     "stacks_json(stacks, cache, encode) -> bytes: v1's stackTraces."},
    {"trace_json", (PyCFunction)(void (*)(void))trace_json, METH_FASTCALL,
     "trace_json(head, resources, origin, slots, stacks, frames, annotations, dropped, encode, "
     "strings) -> bytes: a whole trace in format v1."},
    {"duration_ms", (PyCFunction)duration_ms, METH_O,
     "duration_ms(seconds) -> milliseconds to the microsecond, as timers write delayMs."},
    {"in_order", (PyCFunction)in_order, METH_O,
     "in_order(resources) -> True, False, or None when it cannot tell."},
    {"set_timed_hooks", (PyCFunction)(void (*)(void))set_timed_hooks, METH_FASTCALL,
     "set_timed_hooks(traced_future_type, settle_from_exception, report)."},
    {"found", (PyCFunction)found, METH_O,
     "found(result) -> {'hit': result is not None}: a read's annotation (ScopedCall's own)."},
    {"set_timer_hooks", (PyCFunction)(void (*)(void))set_timer_hooks, METH_FASTCALL,
     "set_timer_hooks(var, timer_handle_type, traced_handle_type, unsettled_append)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "asgi_asynctrace._speedups",
    "Optional C accelerator: creation-stack keys, the header scan, traces as JSON.", -1, methods,
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    s_type = PyUnicode_InternFromString("type");
    s_headers = PyUnicode_InternFromString("headers");
    s_path = PyUnicode_InternFromString("path");
    s_http = PyUnicode_InternFromString("http");
    s_websocket = PyUnicode_InternFromString("websocket");
    s_loop_only = Py_BuildValue("(s)", "loop");
    s_pending = PyUnicode_InternFromString("pending");
    zero = PyLong_FromLong(0);
    s_ok = PyUnicode_InternFromString("ok");
    s_callbacks = PyUnicode_InternFromString("callbacks");
    s_throw = PyUnicode_InternFromString("throw");
    s_close = PyUnicode_InternFromString("close");
    s_asynctrace_res = PyUnicode_InternFromString("_asynctrace_res");
    s_task = PyUnicode_InternFromString("task");
    s_coroutine = PyUnicode_InternFromString("coroutine");
    s_qualname = PyUnicode_InternFromString("__qualname__");
    s_context = PyUnicode_InternFromString("context");
    s_new_resource = PyUnicode_InternFromString("new_resource");
    s_annotate = PyUnicode_InternFromString("annotate");
    s_await = PyUnicode_InternFromString("__await__");
    s_record_futures = PyUnicode_InternFromString("record_futures");
    s_asynctrace_trace = PyUnicode_InternFromString("_asynctrace_trace");
    s_future = PyUnicode_InternFromString("future");
    if (s_await == NULL || !s_record_futures || !s_asynctrace_trace || !s_future) {
        return NULL;
    }
    s_time = PyUnicode_InternFromString("time");
    s_timer = PyUnicode_InternFromString("timer");
    s_kind = PyUnicode_InternFromString("kind");
    s_delay_ms = PyUnicode_InternFromString("delayMs");
    s_late_ms = PyUnicode_InternFromString("lateMs");
    s_callback = PyUnicode_InternFromString("callback");
    s_error = PyUnicode_InternFromString("error");
    s_cancelled = PyUnicode_InternFromString("cancelled");
    s_error_state = s_error;
    s_class = PyUnicode_InternFromString("__class__");
    s_delay = PyUnicode_InternFromString("delay");
    s_f_locals = PyUnicode_InternFromString("f_locals");
    s_sleep = PyUnicode_InternFromString("sleep");
    s_timeout = PyUnicode_InternFromString("timeout");
    s_wait_for = PyUnicode_InternFromString("wait_for");
    s_set_result_unless = PyUnicode_InternFromString("_set_result_unless_cancelled");
    s_on_timeout = PyUnicode_InternFromString("Timeout._on_timeout");
    s_release_waiter = PyUnicode_InternFromString("_release_waiter");
    s_kind_call_later = PyUnicode_InternFromString("call_later");
    s__callback = PyUnicode_InternFromString("_callback");
    s__cancelled = PyUnicode_InternFromString("_cancelled");
    s__context = PyUnicode_InternFromString("_context");
    if (!s__callback || !s__cancelled || !s__context) {
        return NULL;
    }
    thousand = PyLong_FromLong(1000);
    zero_float = PyFloat_FromDouble(0.0);
    PyObject *builtins = PyImport_ImportModule("builtins");
    builtin_round = builtins ? PyObject_GetAttrString(builtins, "round") : NULL;
    Py_XDECREF(builtins);
    if (!s_time || !s_timer || !s_kind || !s_delay_ms || !s_late_ms || !s_callback || !s_error ||
        !s_cancelled || !s_class || !s_delay || !s_f_locals || !s_sleep || !s_timeout ||
        !s_wait_for || !s_set_result_unless || !s_on_timeout || !s_release_waiter ||
        !s_kind_call_later || !thousand || !zero_float || !builtin_round) {
        return NULL;
    }
    if (!s_ok || !s_callbacks || !s_throw || !s_close || !s_asynctrace_res || !s_task ||
        !s_coroutine || !s_qualname || !s_context || !s_new_resource || !s_annotate) {
        return NULL;
    }
    if (request_strings() < 0) {
        return NULL;
    }
    s_hit = PyUnicode_InternFromString("hit");
    s_backend = PyUnicode_InternFromString("backend");
    s_op = PyUnicode_InternFromString("op");
    s_key = PyUnicode_InternFromString("key");
    s_ttl = PyUnicode_InternFromString("ttl");
    if (!s_hit || !s_backend || !s_op || !s_key || !s_ttl) {
        return NULL;
    }
    s_frames = PyUnicode_InternFromString("frames");
    s_ellipsis = PyUnicode_FromString("\xe2\x80\xa6"); /* U+2026, as _recording appends */
    PyObject *time_module = PyImport_ImportModule("time");
    perf_counter_ns = time_module ? PyObject_GetAttrString(time_module, "perf_counter_ns") : NULL;
    Py_XDECREF(time_module);
    if (!s_frames || !s_ellipsis || !perf_counter_ns) {
        return NULL;
    }
    if (!s_type || !s_headers || !s_path || !s_http || !s_websocket || !s_loop_only ||
        !s_pending || !zero) {
        return NULL;
    }
    if (PyType_Ready(&DispatchType) < 0 || PyType_Ready(&TaskCallType) < 0 ||
        PyType_Ready(&ResourceType) < 0 || PyType_Ready(&TraceCoreType) < 0 ||
        PyType_Ready(&TimedType) < 0 || PyType_Ready(&TaskFactoryType) < 0 ||
        PyType_Ready(&TimerCallbackType) < 0 || PyType_Ready(&TimerPatchType) < 0 ||
        PyType_Ready(&ScopedCallType) < 0 || PyType_Ready(&SettleAfterType) < 0 ||
        PyType_Ready(&FutureMakerType) < 0 || PyType_Ready(&TimerCancelType) < 0 ||
        PyType_Ready(&KeyedCallType) < 0) {
        return NULL;
    }
    core_new_resource_method = PyDict_GetItemWithError(TraceCoreType.tp_dict, s_new_resource);
    if (core_new_resource_method == NULL) {
        if (!PyErr_Occurred()) {
            PyErr_SetString(PyExc_RuntimeError, "TraceCore has no new_resource");
        }
        return NULL;
    }
    Py_INCREF(core_new_resource_method);
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) {
        return NULL;
    }
    if (PyModule_AddObjectRef(m, "Dispatch", (PyObject *)&DispatchType) < 0 ||
        PyModule_AddObjectRef(m, "TaskCall", (PyObject *)&TaskCallType) < 0 ||
        PyModule_AddObjectRef(m, "Resource", (PyObject *)&ResourceType) < 0 ||
        PyModule_AddObjectRef(m, "TraceCore", (PyObject *)&TraceCoreType) < 0 ||
        PyModule_AddObjectRef(m, "TimedCoroutine", (PyObject *)&TimedType) < 0 ||
        PyModule_AddObjectRef(m, "TaskFactory", (PyObject *)&TaskFactoryType) < 0 ||
        PyModule_AddObjectRef(m, "TimerCallback", (PyObject *)&TimerCallbackType) < 0 ||
        PyModule_AddObjectRef(m, "TimerPatch", (PyObject *)&TimerPatchType) < 0 ||
        PyModule_AddObjectRef(m, "ScopedCall", (PyObject *)&ScopedCallType) < 0 ||
        PyModule_AddObjectRef(m, "SettleAfter", (PyObject *)&SettleAfterType) < 0 ||
        PyModule_AddObjectRef(m, "FutureMaker", (PyObject *)&FutureMakerType) < 0 ||
        PyModule_AddObjectRef(m, "TimerCancel", (PyObject *)&TimerCancelType) < 0 ||
        PyModule_AddObjectRef(m, "KeyedCall", (PyObject *)&KeyedCallType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    found_function = PyObject_GetAttrString(m, "found");
    if (found_function == NULL) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
