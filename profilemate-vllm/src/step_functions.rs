//! The step path's Python type, `profilemate_vllm._native.StepPath`, written against CPython's C
//! API directly.
//!
//! vLLM's engine step passes through the plugin's seven wrappers, and each timed region costs a
//! call into this module when it begins and one when it ends: about a dozen calls a step. A
//! method of a PyO3 class costs about 14 ns a call without arguments and 8 ns more per integer
//! argument (its trampoline, and an argument parser that CPython's specialising interpreter
//! cannot see through); a method of a C type with `METH_NOARGS`, `METH_O` or `METH_FASTCALL`
//! costs about 6 ns, which the interpreter calls directly, and an integer read with
//! `PyLong_AsLongLong` about 2. That difference, some 0.15 µs a step, is the reason this one type
//! is written by hand (`PyType_FromSpec`, in the limited API since Python 3.10): an instance
//! holds a reference to the Python object that owns its [`StepPath`] (the `Recorder`), and each
//! method converts its integers itself and calls the step path.
//!
//! The methods never unwind into Python: a panic would abort the process, so each body runs
//! under `catch_unwind` and a panic becomes a `RuntimeError`. Wrong arguments raise `TypeError`
//! (how many) or the integer conversion's own error (`OverflowError`, `TypeError`). Everything
//! else of the recorder stays a PyO3 method.

use crate::step_path::StepPath;
use pyo3::ffi;
use pyo3::prelude::*;
use std::ffi::{c_int, CStr};
use std::os::raw::c_char;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::ptr;
use std::sync::OnceLock;

/// An instance: the object header, a strong reference to the object that owns the step path,
/// and the step path (inside that owner, so alive as long as the instance).
#[repr(C)]
struct Instance {
    header: ffi::PyObject,
    owner: *mut ffi::PyObject,
    path: *const StepPath,
    // The scheduler's queue type whose length `scheduled` reads through its base's C function
    // (`set_queue_type`; a strong reference, or NULL), and that function.
    queue_type: *mut ffi::PyObject,
    queue_len: Option<ffi::lenfunc>,
}

/// Runs `f` on the step path of the instance `slf`: `NULL` (with a Python error set) when it
/// panicked or failed, else a new reference.
#[inline(always)]
unsafe fn with_path(
    slf: *mut ffi::PyObject,
    f: impl FnOnce(&StepPath) -> Result<*mut ffi::PyObject, ()>,
) -> *mut ffi::PyObject {
    // SAFETY: CPython calls a method with the GIL held and `slf` an instance of the type (method
    // descriptors check it); the instance holds the path's owner for its whole life.
    let path = unsafe { &*(*slf.cast::<Instance>()).path };
    match catch_unwind(AssertUnwindSafe(|| f(path))) {
        Ok(Ok(result)) => result,
        Ok(Err(())) => ptr::null_mut(),
        Err(_) => {
            unsafe { ffi::PyErr_SetString(ffi::PyExc_RuntimeError, c"profilemate: panic in the step path".as_ptr()) };
            ptr::null_mut()
        }
    }
}

#[inline(always)]
fn none() -> Result<*mut ffi::PyObject, ()> {
    // SAFETY: the GIL is held (we are called by CPython); `Py_None` is a valid object.
    Ok(unsafe { ffi::Py_NewRef(ffi::Py_None()) })
}

#[inline(always)]
fn boolean(b: bool) -> Result<*mut ffi::PyObject, ()> {
    // SAFETY: as in `none`.
    Ok(unsafe { ffi::Py_NewRef(if b { ffi::Py_True() } else { ffi::Py_False() }) })
}

/// A Python `int` as `i64`; `Err` with Python's conversion error set.
#[inline(always)]
unsafe fn int(obj: *mut ffi::PyObject) -> Result<i64, ()> {
    // SAFETY: `obj` is a borrowed argument of the current call.
    let v = unsafe { ffi::PyLong_AsLongLong(obj) };
    if v == -1 && unsafe { !ffi::PyErr_Occurred().is_null() } {
        return Err(());
    }
    Ok(v)
}

/// `nargs` arguments of a `METH_FASTCALL` call, checked against `expected`.
#[inline(always)]
unsafe fn ints<const N: usize>(
    name: &CStr,
    args: *mut *mut ffi::PyObject,
    nargs: ffi::Py_ssize_t,
) -> Result<[i64; N], ()> {
    if nargs != N as ffi::Py_ssize_t {
        let msg = format!("{}() takes {N} integer arguments ({nargs} given)\0", name.to_string_lossy());
        unsafe { ffi::PyErr_SetString(ffi::PyExc_TypeError, msg.as_ptr().cast::<c_char>()) };
        return Err(());
    }
    let mut out = [0i64; N];
    for (i, v) in out.iter_mut().enumerate() {
        // SAFETY: CPython passes `nargs` valid arguments.
        *v = unsafe { int(*args.add(i))? };
    }
    Ok(out)
}

fn clamp_u32(v: i64) -> u32 {
    v.clamp(0, i64::from(u32::MAX)) as u32
}

// --- the functions ------------------------------------------------------------------------------

/// A `METH_NOARGS` method: `$body` on the step path `$r`, returning `None`.
macro_rules! no_args {
    ($name:ident, |$r:ident| $body:expr) => {
        unsafe extern "C" fn $name(slf: *mut ffi::PyObject, _: *mut ffi::PyObject) -> *mut ffi::PyObject {
            unsafe {
                with_path(slf, |$r| {
                    $body;
                    none()
                })
            }
        }
    };
}

/// A `METH_O` method taking a Python `int` (as `$v`, an `i64`): `$body` on the step path `$r`,
/// returning `None`.
macro_rules! one_int {
    ($name:ident, |$r:ident, $v:ident| $body:expr) => {
        unsafe extern "C" fn $name(slf: *mut ffi::PyObject, arg: *mut ffi::PyObject) -> *mut ffi::PyObject {
            unsafe {
                with_path(slf, |$r| {
                    let $v = int(arg)?;
                    $body;
                    none()
                })
            }
        }
    };
}

no_args!(execute_begin, |r| r.execute_begin());
no_args!(forward_begin, |r| r.forward_begin());
no_args!(forward_end, |r| r.forward_end());
no_args!(sample_end, |r| r.sample_end());
no_args!(end_step, |r| r.close_step());
one_int!(op_begin, |r, op| r.op_begin(usize::try_from(op).unwrap_or(usize::MAX)));
one_int!(op_end, |r, op| r.op_end(usize::try_from(op).unwrap_or(usize::MAX)));

/// Opens engine step `step` (a Python `int`); `ValueError` for an id out of range.
unsafe fn open_step(r: &StepPath, step: *mut ffi::PyObject) -> Result<*mut ffi::PyObject, ()> {
    let step = unsafe { int(step)? };
    if u64::try_from(step).is_ok_and(|s| r.open_step(s)) {
        none()
    } else {
        step_out_of_range(step)
    }
}

/// `ValueError` naming the step id and the range accepted.
fn step_out_of_range(step: i64) -> Result<*mut ffi::PyObject, ()> {
    let msg = format!("step id {step}: expected 1 to {}\0", profilemate::MAX_STEP);
    // SAFETY: called with the GIL held, from a method; the message is NUL-terminated.
    unsafe { ffi::PyErr_SetString(ffi::PyExc_ValueError, msg.as_ptr().cast::<c_char>()) };
    Err(())
}

unsafe extern "C" fn schedule_begin(slf: *mut ffi::PyObject, step: *mut ffi::PyObject) -> *mut ffi::PyObject {
    unsafe {
        with_path(slf, |r| {
            let step = int(step)?;
            if u64::try_from(step).is_ok_and(|s| r.schedule_begin(s)) {
                none()
            } else {
                step_out_of_range(step)
            }
        })
    }
}

unsafe extern "C" fn begin_step(slf: *mut ffi::PyObject, step: *mut ffi::PyObject) -> *mut ffi::PyObject {
    unsafe { with_path(slf, |r| open_step(r, step)) }
}

/// The length of a scheduler queue argument: an `int` as it is, a `list` by `PyList_Size`, an
/// object of the type given to `set_queue_type` by its base's C length function (no Python
/// frame), anything else by `len()`.
#[inline(always)]
unsafe fn queue_length(slf: *mut ffi::PyObject, obj: *mut ffi::PyObject) -> Result<i64, ()> {
    // SAFETY: `obj` is a borrowed argument of the current call and `slf` our instance (see
    // `with_path`); `queue_len` is the length function of a base of `queue_type`, so it reads an
    // object of exactly that type correctly.
    unsafe {
        let instance = slf.cast::<Instance>();
        let n = if ffi::PyList_CheckExact(obj) != 0 {
            ffi::PyList_Size(obj)
        } else if ffi::PyLong_Check(obj) != 0 {
            return int(obj);
        } else if let (Some(len), true) =
            ((*instance).queue_len, ptr::eq(ffi::Py_TYPE(obj).cast::<ffi::PyObject>(), (*instance).queue_type))
        {
            len(obj)
        } else {
            ffi::PyObject_Size(obj)
        };
        if n < 0 {
            return Err(());
        }
        Ok(n as i64)
    }
}

unsafe extern "C" fn scheduled(
    slf: *mut ffi::PyObject,
    args: *mut *mut ffi::PyObject,
    nargs: ffi::Py_ssize_t,
) -> *mut ffi::PyObject {
    unsafe {
        with_path(slf, |r| {
            if nargs != 9 {
                let msg = format!("scheduled() takes 9 arguments ({nargs} given)\0");
                ffi::PyErr_SetString(ffi::PyExc_TypeError, msg.as_ptr().cast::<c_char>());
                return Err(());
            }
            let arg = |i: usize| *args.add(i);
            let (phase, seqs, tokens) = (int(arg(0))?, int(arg(1))?, int(arg(2))?);
            let running = queue_length(slf, arg(3))?;
            let waiting = queue_length(slf, arg(4))?.saturating_add(queue_length(slf, arg(5))?);
            let (free, queries, hits) = (int(arg(6))?, int(arg(7))?, int(arg(8))?);
            r.scheduled(
                usize::try_from(phase).unwrap_or(usize::MAX),
                clamp_u32(seqs),
                clamp_u32(tokens),
                clamp_u32(running),
                clamp_u32(waiting),
                free,
                queries,
                hits,
            );
            none()
        })
    }
}

/// `set_queue_type(queue_type, base)`: objects of exactly `queue_type` passed to `scheduled` as
/// queues are measured by `base`'s C length function (`base` a base class of `queue_type` with
/// one, such as `collections.deque`). The caller vouches that `queue_type`'s `len()` returns
/// what `base`'s does. `TypeError` otherwise. The step path holds `queue_type` until another
/// type replaces it or the step path is freed (the type is not tracked by Python's garbage
/// collector: a queue type that refers back to the step path is never freed).
unsafe extern "C" fn set_queue_type(
    slf: *mut ffi::PyObject,
    args: *mut *mut ffi::PyObject,
    nargs: ffi::Py_ssize_t,
) -> *mut ffi::PyObject {
    unsafe {
        with_path(slf, |_| {
            let fail = |msg: &CStr| {
                ffi::PyErr_SetString(ffi::PyExc_TypeError, msg.as_ptr());
                Err(())
            };
            if nargs != 2 {
                return fail(c"set_queue_type() takes 2 arguments (queue_type, base)");
            }
            let (queue_type, base) = (*args, *args.add(1));
            if ffi::PyType_Check(queue_type) == 0
                || ffi::PyType_Check(base) == 0
                || ffi::PyType_IsSubtype(queue_type.cast(), base.cast()) == 0
            {
                return fail(c"set_queue_type(): queue_type must be a subclass of base, and both types");
            }
            let len = ffi::PyType_GetSlot(base.cast(), ffi::Py_sq_length);
            if len.is_null() {
                return fail(c"set_queue_type(): base has no C length function (sq_length)");
            }
            let instance = slf.cast::<Instance>();
            let old = std::mem::replace(&mut (*instance).queue_type, ffi::Py_NewRef(queue_type));
            (*instance).queue_len = Some(std::mem::transmute::<*mut std::ffi::c_void, ffi::lenfunc>(len));
            if !old.is_null() {
                ffi::Py_DecRef(old);
            }
            none()
        })
    }
}

unsafe extern "C" fn execute_begin_with(
    slf: *mut ffi::PyObject,
    args: *mut *mut ffi::PyObject,
    nargs: ffi::Py_ssize_t,
) -> *mut ffi::PyObject {
    unsafe {
        with_path(slf, |r| {
            let [phase, seqs, tokens] = ints::<3>(c"execute_begin_with", args, nargs)?;
            r.execute_begin_with(usize::try_from(phase).unwrap_or(2), clamp_u32(seqs), clamp_u32(tokens));
            none()
        })
    }
}

unsafe extern "C" fn execute_end(slf: *mut ffi::PyObject, forward: *mut ffi::PyObject) -> *mut ffi::PyObject {
    unsafe {
        with_path(slf, |r| {
            let forward = match ffi::PyObject_IsTrue(forward) {
                -1 => return Err(()),
                v => v != 0,
            };
            r.execute_end(forward);
            none()
        })
    }
}

unsafe extern "C" fn sample_begin(slf: *mut ffi::PyObject, _: *mut ffi::PyObject) -> *mut ffi::PyObject {
    unsafe { with_path(slf, |r| boolean(r.sample_begin())) }
}

// --- a module function: the phase classification's scan ---------------------------------------

/// CPython's cached `int` 0: `PyLong_FromLong` returns one cached object for every value from -5
/// to 256 (its documentation says so), and `len()` and integer arithmetic build their results
/// through it, so a 0 that vLLM counted is this object.
fn cached_zero() -> *mut ffi::PyObject {
    static ZERO: OnceLock<usize> = OnceLock::new();
    // SAFETY: called with the GIL held; the cached small ints live as long as the interpreter,
    // and the reference taken here is never released.
    *ZERO.get_or_init(|| unsafe { ffi::PyLong_FromLong(0) } as usize) as *mut ffi::PyObject
}

/// `has_zero(counts)`: whether `counts` (a list of `int`, or any iterable) holds a 0. For a list
/// of ints it is a scan of pointers against the cached 0 (about 1.5 ns a count, against 3.5 for
/// `not all(counts)`: the classification's scan of every running request's output count); an item
/// that is not exactly an `int` is tested for truth as `all()` would, and the scan follows the
/// list as `all()` does when that test changes it.
unsafe extern "C" fn has_zero(_module: *mut ffi::PyObject, counts: *mut ffi::PyObject) -> *mut ffi::PyObject {
    let zero = cached_zero();
    // SAFETY: `counts` is a borrowed argument of the current call; `PyList_GetItem` returns a
    // borrowed item of a list we do not change; the GIL is held throughout.
    unsafe {
        // An item's truth, and whether finding it ran Python code (`__bool__`, which may change
        // the list; the item is held while it runs).
        let truth = |item: *mut ffi::PyObject| -> Result<(bool, bool), ()> {
            if ptr::eq(item, zero) {
                return Ok((false, false));
            }
            if ffi::PyLong_CheckExact(item) != 0 {
                return Ok((true, false));
            }
            let item = ffi::Py_NewRef(item);
            let v = ffi::PyObject_IsTrue(item);
            ffi::Py_DecRef(item);
            match v {
                -1 => Err(()),
                v => Ok((v != 0, true)),
            }
        };
        // Another iterable becomes a list first (an allocation, off the path vLLM takes).
        let list =
            if ffi::PyList_CheckExact(counts) != 0 { ffi::Py_NewRef(counts) } else { ffi::PySequence_List(counts) };
        if list.is_null() {
            return ptr::null_mut();
        }
        // As `all()` iterates a list: up to its length at each item, which only an item's
        // `__bool__` can change (shrinking or growing the list), so it is read again after one.
        let (mut found, mut i, mut n) = (Ok(false), 0, ffi::PyList_Size(list));
        while i < n {
            match truth(ffi::PyList_GetItem(list, i)) {
                Ok((true, ran_code)) => {
                    if ran_code {
                        n = ffi::PyList_Size(list);
                    }
                }
                other => {
                    found = other.map(|_| true);
                    break;
                }
            }
            i += 1;
        }
        ffi::Py_DecRef(list);
        match found {
            Ok(b) => boolean(b).unwrap_or(ptr::null_mut()),
            Err(()) => ptr::null_mut(),
        }
    }
}

/// Adds the module functions written against the C API (`has_zero`) to `module`.
pub(crate) fn add_functions(module: &Bound<'_, PyModule>) -> PyResult<()> {
    let def = Box::leak(Box::new(ffi::PyMethodDef {
        ml_name: c"has_zero".as_ptr(),
        ml_meth: ffi::PyMethodDefPointer { PyCFunction: has_zero },
        ml_flags: ffi::METH_O,
        ml_doc: c"has_zero(counts): whether a list of ints (or any iterable) holds a 0 (a native scan).".as_ptr(),
    }));
    // SAFETY: `def` lives for the rest of the process; the GIL is held (module initialisation).
    let f = unsafe {
        Bound::from_owned_ptr_or_err(module.py(), ffi::PyCFunction_NewEx(def, ptr::null_mut(), ptr::null_mut()))?
    };
    module.add("has_zero", f)
}

// --- the table ----------------------------------------------------------------------------------

type NoArgs = unsafe extern "C" fn(*mut ffi::PyObject, *mut ffi::PyObject) -> *mut ffi::PyObject;
type Fast = unsafe extern "C" fn(*mut ffi::PyObject, *mut *mut ffi::PyObject, ffi::Py_ssize_t) -> *mut ffi::PyObject;

enum Kind {
    NoArgs(NoArgs),
    One(NoArgs),
    Fast(Fast),
}

/// Name, kind, and what the function does (its `__doc__`).
const FUNCTIONS: [(&CStr, Kind, &CStr); 14] = [
    (
        c"schedule_begin",
        Kind::One(schedule_begin),
        c"schedule_begin(step): Scheduler.schedule begins: opens engine step `step` and starts its scheduling time.",
    ),
    (
        c"scheduled",
        Kind::Fast(scheduled),
        c"scheduled(phase, num_seqs, num_tokens, running, waiting, waiting2, kv_free_blocks, prefix_queries, \
prefix_hits): the scheduling time, the batch against the limits, a KV cache reading; kept for execute_begin. \
running, waiting and waiting2 are queue lengths (int) or the queues (their lengths are read; waiting \
is their sum).",
    ),
    (
        c"set_queue_type",
        Kind::Fast(set_queue_type),
        c"set_queue_type(queue_type, base): queues of exactly queue_type are measured by base's C length function.",
    ),
    (c"execute_begin", Kind::NoArgs(execute_begin), c"The model runner's step begins, as scheduled last."),
    (
        c"execute_begin_with",
        Kind::Fast(execute_begin_with),
        c"execute_begin_with(phase, num_seqs, num_tokens): the model runner's step begins, classified by the caller.",
    ),
    (
        c"execute_end",
        Kind::One(execute_end),
        c"execute_end(forward): model_execution, and with `forward` the forward pass and the decoder time.",
    ),
    (c"forward_begin", Kind::NoArgs(forward_begin), c"_model_forward begins (inside a step)."),
    (c"forward_end", Kind::NoArgs(forward_end), c"_model_forward ended: adds to the step's forward time."),
    (c"op_begin", Kind::One(op_begin), c"op_begin(op): CPU operation `op` begins (inside a step)."),
    (c"op_end", Kind::One(op_end), c"op_end(op): CPU operation `op` ended, recorded with the step's phase."),
    (
        c"sample_begin",
        Kind::NoArgs(sample_begin),
        c"sample_tokens begins; True when it follows a step's execute_model.",
    ),
    (c"sample_end", Kind::NoArgs(sample_end), c"sample_tokens ended: its sampling time."),
    (
        c"begin_step",
        Kind::One(begin_step),
        c"begin_step(step): opens engine step `step` (a worker process opens the engine core's id).",
    ),
    (c"end_step", Kind::NoArgs(end_step), c"Closes the open step."),
];

/// The type, built once per process and never freed (CPython keeps pointers to its method
/// table); stored as an address.
fn step_path_type() -> PyResult<*mut ffi::PyTypeObject> {
    static TYPE: OnceLock<usize> = OnceLock::new();
    if let Some(&t) = TYPE.get() {
        return Ok(t as *mut ffi::PyTypeObject);
    }
    let methods: Vec<ffi::PyMethodDef> = FUNCTIONS
        .iter()
        .map(|(name, kind, doc)| {
            let (meth, flags): (ffi::PyMethodDefPointer, c_int) = match kind {
                Kind::NoArgs(f) => (ffi::PyMethodDefPointer { PyCFunction: *f }, ffi::METH_NOARGS),
                Kind::One(f) => (ffi::PyMethodDefPointer { PyCFunction: *f }, ffi::METH_O),
                Kind::Fast(f) => (ffi::PyMethodDefPointer { PyCFunctionFast: *f }, ffi::METH_FASTCALL),
            };
            ffi::PyMethodDef { ml_name: name.as_ptr(), ml_meth: meth, ml_flags: flags, ml_doc: doc.as_ptr() }
        })
        .chain(std::iter::once(ffi::PyMethodDef::zeroed()))
        .collect();
    let methods = Box::leak(methods.into_boxed_slice());
    let slots = Box::leak(Box::new([
        ffi::PyType_Slot { slot: ffi::Py_tp_methods, pfunc: methods.as_mut_ptr().cast() },
        ffi::PyType_Slot { slot: ffi::Py_tp_dealloc, pfunc: dealloc as *mut std::ffi::c_void },
        ffi::PyType_Slot { slot: ffi::Py_tp_doc, pfunc: DOC.as_ptr().cast_mut().cast() },
        ffi::PyType_Slot::default(),
    ]));
    let spec = Box::leak(Box::new(ffi::PyType_Spec {
        name: c"profilemate_vllm._native.StepPath".as_ptr(),
        basicsize: std::mem::size_of::<Instance>() as c_int,
        itemsize: 0,
        flags: ffi::Py_TPFLAGS_DEFAULT as std::ffi::c_uint,
        slots: slots.as_mut_ptr(),
    }));
    // SAFETY: the spec and everything it points to live for the rest of the process.
    let t = unsafe { ffi::PyType_FromSpec(spec) };
    if t.is_null() {
        // SAFETY: the GIL is held (we are called from a PyO3 method).
        return Err(PyErr::fetch(unsafe { Python::assume_attached() }));
    }
    Ok(*TYPE.get_or_init(|| t as usize) as *mut ffi::PyTypeObject)
}

const DOC: &CStr = c"The step path of one Recorder (Recorder.step_path()): each timed region of vLLM's engine \
step is a call when it begins and one when it ends; the clock is read natively.";

unsafe extern "C" fn dealloc(slf: *mut ffi::PyObject) {
    // SAFETY: CPython deallocates an instance of our heap type once: its owner reference is
    // released, its memory freed with the type's own `tp_free`, and the reference every instance
    // of a heap type holds to its type released.
    unsafe {
        let instance = slf.cast::<Instance>();
        (*instance).path = ptr::null();
        (*instance).queue_len = None;
        for held in [&mut (*instance).owner, &mut (*instance).queue_type] {
            let obj = std::mem::replace(held, ptr::null_mut());
            if !obj.is_null() {
                ffi::Py_DecRef(obj);
            }
        }
        let tp = ffi::Py_TYPE(slf);
        let free: ffi::freefunc = std::mem::transmute(ffi::PyType_GetSlot(tp, ffi::Py_tp_free));
        free(slf.cast());
        ffi::Py_DecRef(tp.cast());
    }
}

/// A new `StepPath` object for `path`, which `owner` holds (a field of a frozen PyO3 class: it
/// stays where it is while the owner lives, and the object keeps the owner alive).
pub(crate) fn step_path<'py>(owner: &Bound<'py, PyAny>, path: &StepPath) -> PyResult<Bound<'py, PyAny>> {
    let py = owner.py();
    let tp = step_path_type()?;
    // SAFETY: `tp` is our type; `PyType_GenericAlloc` zeroes the instance and takes a reference
    // to the type; the instance then takes one to the owner, which keeps `path` alive.
    unsafe {
        let obj = ffi::PyType_GenericAlloc(tp, 0);
        let obj = Bound::from_owned_ptr_or_err(py, obj)?;
        let instance = obj.as_ptr().cast::<Instance>();
        (*instance).owner = ffi::Py_NewRef(owner.as_ptr());
        (*instance).path = ptr::from_ref(path);
        Ok(obj)
    }
}
