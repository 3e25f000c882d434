//! The Python module `eventstore._es_codec`: the only place that knows about Python.
//!
//! Everything here is argument conversion, error mapping and GIL handling around the plain
//! Rust modules. Client errors become `InvalidRequest`/`RequestTooLarge` (both `ValueError`s)
//! with the core's message as is; caller mistakes (bad limits, inconsistent batch arguments,
//! malformed COPY data) become plain `ValueError`s so they are not mistaken for client errors
//! and turned into `INVALID_ARGUMENT`.
//!
//! Output buffers are Python `bytes` allocated once at their exact size and filled in place.
//! Work proportional to the payload runs with the GIL released once the input is large
//! enough for that to pay off, so other Python threads (the event loop) keep running.

use pyo3::create_exception;
use pyo3::exceptions::{PyException, PyIndexError, PyOSError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::sync::GILOnceCell;
use pyo3::types::{PyBool, PyBytes, PyInt, PyList, PyString, PyTuple, PyType};

use crate::copy_in;
use crate::copy_out;
use crate::http2;
use crate::json;
use crate::libpq;
use crate::literals;
use crate::request::{quote, AppendRequest, ErrorKind, EventView, Limits, RequestError};
use crate::uuids;
use crate::versions;

create_exception!(
    eventstore._es_codec,
    InvalidRequest,
    PyValueError,
    "The request is invalid; the message names the field. Maps to INVALID_ARGUMENT."
);
create_exception!(
    eventstore._es_codec,
    RequestTooLarge,
    InvalidRequest,
    "The request is over a size limit. Maps to RESOURCE_EXHAUSTED."
);

create_exception!(
    eventstore._es_codec,
    Http2Error,
    PyException,
    "A connection error of HTTP/2: args are (error code, message); the connection ends with GOAWAY."
);

/// Inputs at least this large are processed with the GIL released. Below it, releasing and
/// re-acquiring the GIL costs more than the work.
const RELEASE_GIL_AT: usize = 64 * 1024;

fn maybe_allow_threads<T, F>(py: Python<'_>, release: bool, f: F) -> T
where
    F: FnOnce() -> T + Send,
    T: Send,
{
    if release {
        py.allow_threads(f)
    } else {
        f()
    }
}

fn request_error(e: RequestError) -> PyErr {
    match e.kind {
        ErrorKind::Invalid => InvalidRequest::new_err(e.message),
        ErrorKind::TooLarge => RequestTooLarge::new_err(e.message),
        ErrorKind::Internal => PyOSError::new_err(e.message),
    }
}

fn value_error(e: impl std::fmt::Display) -> PyErr {
    PyValueError::new_err(e.to_string())
}

fn limit(name: &str, v: i64, min: i64) -> PyResult<usize> {
    if v < min {
        return Err(PyValueError::new_err(format!(
            "{name}: must be at least {min}, got {v}"
        )));
    }
    Ok(usize::try_from(v).unwrap_or(usize::MAX))
}

/// A validated `AppendEventsRequest`. Immutable: built only by `parse`.
#[pyclass(frozen, name = "AppendRequest", module = "eventstore._es_codec")]
pub struct PyAppendRequest {
    inner: AppendRequest,
}

impl PyAppendRequest {
    /// Event `i`; no negative indexing: callers always have a real index.
    fn event(&self, i: i64) -> PyResult<EventView<'_>> {
        usize::try_from(i)
            .ok()
            .and_then(|i| self.inner.event(i))
            .ok_or_else(|| {
                PyIndexError::new_err(format!(
                    "event index {i} out of range for {} events",
                    self.inner.event_count()
                ))
            })
    }
}

#[pymethods]
impl PyAppendRequest {
    /// Decodes and validates serialized `AppendEventsRequest` bytes. `caller`, a JSON value,
    /// is recorded in every event's metadata under the reserved key.
    #[staticmethod]
    #[pyo3(signature = (raw, max_events, max_event_bytes, caller=None))]
    fn parse(
        py: Python<'_>,
        raw: &[u8],
        max_events: i64,
        max_event_bytes: i64,
        caller: Option<&[u8]>,
    ) -> PyResult<Self> {
        let limits = Limits {
            max_events: limit("max_events", max_events, 1)?,
            max_event_bytes: limit("max_event_bytes", max_event_bytes, 1)?,
        };
        if let Some(caller) = caller {
            if json::validate(caller).is_err() {
                return Err(PyValueError::new_err("caller: not a JSON value"));
            }
        }
        maybe_allow_threads(py, raw.len() >= RELEASE_GIL_AT, || {
            AppendRequest::parse_with_caller(raw, limits, caller)
        })
        .map(|inner| PyAppendRequest { inner })
        .map_err(request_error)
    }

    #[getter]
    fn stream_id(&self) -> String {
        uuids::to_text(self.inner.stream_id())
    }

    #[getter]
    fn stream_id_bytes<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, self.inner.stream_id())
    }

    #[getter]
    fn stream_type(&self) -> &str {
        self.inner.stream_type()
    }

    #[getter]
    fn expected_version(&self) -> Option<i64> {
        self.inner.expected_version()
    }

    #[getter]
    fn event_count(&self) -> usize {
        self.inner.event_count()
    }

    #[getter]
    fn payload_bytes(&self) -> usize {
        self.inner.payload_bytes()
    }

    #[getter]
    fn event_ids(&self) -> Vec<String> {
        self.inner.event_ids().map(uuids::to_text).collect()
    }

    #[getter]
    fn client_event_ids(&self) -> Vec<String> {
        self.inner.client_event_ids().map(uuids::to_text).collect()
    }

    #[getter]
    fn has_client_ids(&self) -> bool {
        self.inner.has_client_ids()
    }

    fn event_type(&self, i: i64) -> PyResult<&str> {
        Ok(self.event(i)?.event_type)
    }

    fn event_data<'py>(&self, py: Python<'py>, i: i64) -> PyResult<Bound<'py, PyBytes>> {
        Ok(PyBytes::new(py, self.event(i)?.data))
    }

    fn event_metadata<'py>(
        &self,
        py: Python<'py>,
        i: i64,
    ) -> PyResult<Option<Bound<'py, PyBytes>>> {
        Ok(self.event(i)?.metadata.map(|m| PyBytes::new(py, m)))
    }

    /// Serialized `AppendEventsResponse` for this request stored from `first_version` and
    /// `first_position` on.
    fn response<'py>(
        &self,
        py: Python<'py>,
        first_version: i64,
        first_position: i64,
        snapshot_threshold: i64,
    ) -> PyResult<Bound<'py, PyBytes>> {
        let resp = self
            .inner
            .response(first_version, first_position, snapshot_threshold)
            .map_err(|e| PyValueError::new_err(e.0))?;
        PyBytes::new_with(py, resp.encoded_len(), |buf| {
            resp.write_into(buf);
            Ok(())
        })
    }

    fn __repr__(&self) -> String {
        format!(
            "AppendRequest(stream_id='{}', stream_type={}, event_count={}, expected_version={})",
            uuids::to_text(self.inner.stream_id()),
            quote(self.inner.stream_type().as_bytes()),
            self.inner.event_count(),
            self.inner
                .expected_version()
                .map_or_else(|| "None".to_owned(), |v| v.to_string()),
        )
    }
}

/// Checks that `doc` is one JSON document PostgreSQL's jsonb accepts, by the rules event data
/// is checked by (`json::validate`): whether its top level is an object; `InvalidRequest`
/// with the reason (e.g. `expected value at line 1 column 1`) otherwise.
#[pyfunction]
fn check_json(py: Python<'_>, doc: &[u8]) -> PyResult<bool> {
    maybe_allow_threads(py, doc.len() >= RELEASE_GIL_AT, || json::validate(doc))
        .map(|top| top == json::TopLevel::Object)
        .map_err(|e| InvalidRequest::new_err(e.0))
}

/// The optimistic-concurrency check of a batch; see `versions::check_versions`.
#[pyfunction]
#[allow(clippy::needless_pass_by_value)] // PyO3 can only extract a list into an owned Vec.
fn check_versions(
    current: Vec<i64>,
    stream_index: Vec<i64>,
    expected: Vec<Option<i64>>,
    counts: Vec<i64>,
) -> PyResult<Vec<i64>> {
    versions::check_versions(&current, &stream_index, &expected, &counts).map_err(value_error)
}

/// The binary COPY payload inserting every event of `requests`.
#[pyfunction]
#[allow(clippy::needless_pass_by_value)] // PyO3 can only extract a list into an owned Vec.
fn encode_copy<'py>(
    py: Python<'py>,
    requests: Vec<Bound<'py, PyAppendRequest>>,
    first_versions: Vec<i64>,
    first_position: i64,
    created_at_us: i64,
) -> PyResult<Bound<'py, PyBytes>> {
    let reqs: Vec<&AppendRequest> = requests.iter().map(|r| &r.get().inner).collect();
    let plan = copy_in::plan(&reqs, &first_versions, first_position).map_err(value_error)?;
    PyBytes::new_with(py, plan.len, |buf| {
        // The new bytes object is not visible to any other code yet, so filling it without
        // the GIL is safe.
        maybe_allow_threads(py, plan.len >= RELEASE_GIL_AT, || {
            copy_in::write(&reqs, &first_versions, first_position, created_at_us, buf);
        });
        Ok(())
    })
}

/// `INSERT INTO events … VALUES …;` storing every event of `requests` (a small batch).
#[pyfunction]
#[allow(clippy::needless_pass_by_value)] // PyO3 can only extract a list into an owned Vec.
fn insert_sql(
    requests: Vec<Bound<'_, PyAppendRequest>>,
    first_versions: Vec<i64>,
    first_position: i64,
    created_at: &str,
) -> PyResult<String> {
    let reqs: Vec<&AppendRequest> = requests.iter().map(|r| &r.get().inner).collect();
    crate::insert_sql::insert_sql(&reqs, &first_versions, first_position, created_at)
        .map_err(value_error)
}

/// `query` with each `%s` replaced by the SQL literal of the next of `params` (`%%` is `%`):
/// an int (within int8), a str (no NUL), an aware datetime, None, or a list or tuple of those.
#[pyfunction]
#[allow(clippy::needless_pass_by_value)] // PyO3 can only extract a sequence into an owned Vec.
fn bind_sql(py: Python<'_>, query: &str, params: Vec<Bound<'_, PyAny>>) -> PyResult<String> {
    let pieces = literals::pieces(query).map_err(value_error)?;
    literals::check_count(&pieces, params.len()).map_err(value_error)?;
    let datetime = DATETIME
        .get_or_try_init(py, || -> PyResult<Py<PyType>> {
            Ok(py
                .import("datetime")?
                .getattr("datetime")?
                .downcast_into::<PyType>()?
                .unbind())
        })?
        .bind(py);
    let mut sql = String::with_capacity(query.len() + 32 * params.len());
    sql.push_str(&pieces[0]);
    for (param, piece) in params.iter().zip(&pieces[1..]) {
        put_param(&mut sql, param, datetime)?;
        sql.push_str(piece);
    }
    Ok(sql)
}

static DATETIME: GILOnceCell<Py<PyType>> = GILOnceCell::new();

fn put_param(
    sql: &mut String,
    value: &Bound<'_, PyAny>,
    datetime: &Bound<'_, PyType>,
) -> PyResult<()> {
    if value.is_none() {
        literals::put_null(sql);
    } else if value.is_instance_of::<PyBool>() {
        return Err(PyTypeError::new_err("no booleans here"));
    } else if let Ok(int) = value.downcast::<PyInt>() {
        literals::put_int(sql, int.extract()?);
    } else if let Ok(text) = value.downcast::<PyString>() {
        literals::put_text(sql, text.to_str()?).map_err(value_error)?;
    } else if value.is_instance(datetime)? {
        if value.getattr("tzinfo")?.is_none() {
            return Err(PyValueError::new_err(
                "a timestamptz needs an aware datetime",
            ));
        }
        let iso = value.call_method0("isoformat")?;
        literals::put_timestamp(sql, iso.downcast::<PyString>()?.to_str()?).map_err(value_error)?;
    } else if value.is_instance_of::<PyList>() || value.is_instance_of::<PyTuple>() {
        if literals::open_array(sql, value.len()?) {
            for (i, item) in value.try_iter()?.enumerate() {
                literals::put_separator(sql, i);
                put_param(sql, &item?, datetime)?;
            }
            literals::close_array(sql);
        }
    } else {
        return Err(PyTypeError::new_err(format!(
            "cannot bind a {} as an SQL literal",
            value.get_type().name()?
        )));
    }
    Ok(())
}

/// A page of events from binary COPY output, as repeated field-1 `Event`s.
#[pyfunction]
fn encode_events<'py>(
    py: Python<'py>,
    copy_out: &[u8],
    max_count: i64,
    max_bytes: i64,
) -> PyResult<(Bound<'py, PyBytes>, usize, i64, i64, bool)> {
    let max_count = limit("max_count", max_count, 1)?;
    let max_bytes = limit("max_bytes", max_bytes, 0)?;
    // `bytes` are immutable, so reading `copy_out` without the GIL is safe.
    let release = copy_out.len() >= RELEASE_GIL_AT;
    let page = maybe_allow_threads(py, release, || {
        copy_out::plan_page(copy_out, max_count, max_bytes)
    })
    .map_err(value_error)?;
    let bytes = PyBytes::new_with(py, page.len, |buf| {
        maybe_allow_threads(py, release, || copy_out::write_page(copy_out, &page, buf))
            .map_err(value_error)
    })?;
    Ok((
        bytes,
        page.rows,
        page.last_version,
        page.last_position,
        page.more,
    ))
}

/// (position, version, stream_id, stream_type, event_type, serialized Event) per row: what
/// live delivery needs to filter and send an event without decoding it again.
type LiveEvent<'py> = (
    i64,
    i64,
    String,
    String,
    String,
    Bound<'py, PyBytes>,
    Bound<'py, PyBytes>,
);

/// Every row of binary COPY output as a `LiveEvent`.
#[pyfunction]
fn encode_event_list<'py>(py: Python<'py>, copy_out: &[u8]) -> PyResult<Vec<LiveEvent<'py>>> {
    let rows = maybe_allow_threads(py, copy_out.len() >= RELEASE_GIL_AT, || {
        copy_out::all_rows(copy_out)
    })
    .map_err(value_error)?;
    rows.iter()
        .map(|row| {
            let ev = row.event();
            let bytes = PyBytes::new_with(py, ev.encoded_len(), |buf| {
                ev.write_into(buf);
                Ok(())
            })?;
            // The EventNotification carrying it alone (`event = 1`): framed here once, not
            // in Python for every event a subscriber is sent.
            let notification = PyBytes::new_with(py, ev.encoded_len_as_field_1(), |buf| {
                let mut out = crate::out::Out::new(buf);
                ev.write_as_field_1(&mut out);
                Ok(())
            })?;
            Ok((
                row.position,
                row.version,
                uuids::to_text(&row.stream_id),
                row.stream_type.to_owned(),
                row.event_type.to_owned(),
                bytes,
                notification,
            ))
        })
        .collect()
}

/// The inbound half of an HTTP/2 server connection: see `crate::http2`.
#[pyclass(name = "FrameReader", module = "eventstore._es_codec")]
pub struct PyFrameReader {
    inner: http2::FrameReader,
}

/// `Http2Error`, or an exception raised while building a frame's Python objects.
enum FeedError {
    Connection(http2::ConnectionError),
    Python(PyErr),
}

impl From<http2::ConnectionError> for FeedError {
    fn from(e: http2::ConnectionError) -> Self {
        FeedError::Connection(e)
    }
}

impl From<PyErr> for FeedError {
    fn from(e: PyErr) -> Self {
        FeedError::Python(e)
    }
}

#[pymethods]
impl PyFrameReader {
    #[new]
    fn new(max_frame_size: usize, header_table_size: usize, max_header_list_size: usize) -> Self {
        Self {
            inner: http2::FrameReader::new(max_frame_size, header_table_size, max_header_list_size),
        }
    }

    /// The frames completed by `data`, as tuples:
    /// DATA `(0, stream_id, end_stream, data, flow_controlled_length)`;
    /// HEADERS `(1, stream_id, end_stream, [(name, value)], problem or None, has_pseudo)`;
    /// other frames `(type, stream_id, flags, payload)`.
    fn feed<'py>(&mut self, py: Python<'py>, data: &[u8]) -> PyResult<Vec<Bound<'py, PyTuple>>> {
        let mut frames = Vec::new();
        let result = self
            .inner
            .feed(data, |frame: http2::Frame<'_>| -> Result<(), FeedError> {
                let tuple = match frame {
                    http2::Frame::Data {
                        stream_id,
                        end_stream,
                        data,
                        flow_len,
                    } => (
                        http2::DATA,
                        stream_id,
                        end_stream,
                        PyBytes::new(py, data),
                        flow_len,
                    )
                        .into_pyobject(py)?,
                    http2::Frame::Headers {
                        stream_id,
                        end_stream,
                        headers,
                        problem,
                        has_pseudo,
                    } => (
                        http2::HEADERS,
                        stream_id,
                        end_stream,
                        headers,
                        problem,
                        has_pseudo,
                    )
                        .into_pyobject(py)?,
                    http2::Frame::Control {
                        kind,
                        stream_id,
                        flags,
                        payload,
                    } => (kind, stream_id, flags, PyBytes::new(py, payload)).into_pyobject(py)?,
                };
                frames.push(tuple);
                Ok(())
            });
        match result {
            Ok(()) => Ok(frames),
            Err(FeedError::Connection(e)) => Err(Http2Error::new_err((e.code, e.message))),
            Err(FeedError::Python(e)) => Err(e),
        }
    }
}

/// The libpq psycopg loaded, for reading a COPY TO STDOUT's rows without the GIL.
#[pyclass(frozen, name = "Libpq", module = "eventstore._es_codec")]
struct PyLibpq(libpq::Libpq);

/// `Libpq.copy_out`'s status when the connection was lost while waiting for rows.
const COPY_LOST: i32 = -3;

#[pymethods]
impl PyLibpq {
    #[new]
    fn new(path: &str) -> PyResult<Self> {
        libpq::Libpq::loaded(path)
            .map(Self)
            .map_err(PyOSError::new_err)
    }

    fn copy_out<'py>(
        &self,
        py: Python<'py>,
        pgconn_ptr: usize,
    ) -> PyResult<(Bound<'py, PyBytes>, i32)> {
        let mut rows = Vec::new();
        let end = py.allow_threads(|| {
            // SAFETY: the caller's contract (see the stub): a live PGconn of this libpq in
            // COPY_OUT, used by no one else until this returns.
            #[allow(unsafe_code)]
            unsafe {
                self.0
                    .copy_out(pgconn_ptr as *mut std::ffi::c_void, &mut rows)
            }
        });
        let status = match end {
            libpq::CopyEnd::Status(status) => status,
            libpq::CopyEnd::Lost => COPY_LOST,
            libpq::CopyEnd::WaitFailed(error) => return Err(error.into()),
        };
        Ok((PyBytes::new(py, &rows), status))
    }
}

#[pymodule]
#[pyo3(name = "_es_codec")]
fn es_codec_module(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("InvalidRequest", py.get_type::<InvalidRequest>())?;
    m.add("RequestTooLarge", py.get_type::<RequestTooLarge>())?;
    m.add("Http2Error", py.get_type::<Http2Error>())?;
    m.add_class::<PyFrameReader>()?;
    m.add_class::<PyAppendRequest>()?;
    m.add_class::<PyLibpq>()?;
    m.add("COPY_LOST", COPY_LOST)?;
    m.add_function(wrap_pyfunction!(check_json, m)?)?;
    m.add_function(wrap_pyfunction!(check_versions, m)?)?;
    m.add_function(wrap_pyfunction!(encode_copy, m)?)?;
    m.add_function(wrap_pyfunction!(insert_sql, m)?)?;
    m.add_function(wrap_pyfunction!(bind_sql, m)?)?;
    m.add_function(wrap_pyfunction!(encode_events, m)?)?;
    m.add_function(wrap_pyfunction!(encode_event_list, m)?)?;
    Ok(())
}
