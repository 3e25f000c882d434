//! `AppendEventsRequest`: decoding and validation, and the `AppendEventsResponse` for it.
//!
//! Validation runs cheapest first, so a bad request costs little: the wire structure, then
//! the stream fields and the event count, then each event's small fields and sizes, then
//! duplicate ids, and only then the JSON documents, which are the only part proportional to
//! the payload. Messages name the field in the API's own words (`events[2].data`) and never
//! echo more than a short prefix of what the client sent.

use std::fmt::{self, Write as _};

use crate::json::{self, TopLevel};
use crate::proto::{self, AppendResponse, NewEventFields, Span};
use crate::uuids;

/// PostgreSQL `VARCHAR(255)`: the limit counts characters, not bytes.
const MAX_NAME_CHARS: usize = 255;
/// The top-level metadata key under which the server records who appended an event. Clients
/// may not send it (that would forge the record).
pub const CALLER_KEY: &str = "$eventstore.caller";
/// How much of a rejected value an error message echoes back.
const MAX_ECHO_CHARS: usize = 64;

/// Caller-configured limits (the service's settings).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Most events in one request.
    pub max_events: usize,
    /// Most bytes of data + metadata in one event.
    pub max_event_bytes: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The client sent something invalid (`INVALID_ARGUMENT`).
    Invalid,
    /// The client sent too much (`RESOURCE_EXHAUSTED`).
    TooLarge,
    /// Not the client's fault: the OS would not give us random bytes for new ids.
    Internal,
}

/// A rejected request; `message` is meant for the client as it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestError {
    pub kind: ErrorKind,
    pub message: String,
}

impl fmt::Display for RequestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

fn invalid(message: String) -> RequestError {
    RequestError {
        kind: ErrorKind::Invalid,
        message,
    }
}

fn too_large(message: String) -> RequestError {
    RequestError {
        kind: ErrorKind::TooLarge,
        message,
    }
}

#[derive(Debug, Clone, Copy)]
struct StoredEvent {
    id: [u8; 16],
    /// Whether the client supplied `id` (otherwise we generated it).
    client_id: bool,
    fields: NewEventFields,
}

/// A decoded, fully validated `AppendEventsRequest`, immutable from here on.
///
/// Keeps one copy of the request bytes and byte ranges into it, rather than a buffer per
/// field: two allocations per request whatever its number of events.
#[derive(Debug)]
pub struct AppendRequest {
    buf: Box<[u8]>,
    stream_id: [u8; 16],
    stream_type: Span,
    expected_version: Option<i64>,
    events: Box<[StoredEvent]>,
    payload_bytes: usize,
    client_id_count: usize,
}

/// One event of an [`AppendRequest`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventView<'a> {
    pub id: [u8; 16],
    pub client_id: bool,
    pub event_type: &'a str,
    pub data: &'a [u8],
    pub metadata: Option<&'a [u8]>,
}

/// An argument of [`AppendRequest::response`] out of range: a bug in the caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArgumentError(pub String);

impl AppendRequest {
    /// Decodes and validates a serialized `AppendEventsRequest`.
    pub fn parse(raw: &[u8], limits: Limits) -> Result<AppendRequest, RequestError> {
        Self::parse_with_caller(raw, limits, None)
    }

    /// Like [`parse`](Self::parse), and when `caller` (a JSON value) is given, every event's
    /// metadata gets it under [`CALLER_KEY`] (events without metadata get an object with just
    /// that key). A client's own use of the key is refused either way.
    pub fn parse_with_caller(
        raw: &[u8],
        limits: Limits,
        caller: Option<&[u8]>,
    ) -> Result<AppendRequest, RequestError> {
        let fields = proto::decode_append_request(raw, |_| {})
            .map_err(|_| invalid("request: not a valid AppendEventsRequest message".to_owned()))?;

        let stream_id = uuids::parse(fields.stream_id.get(raw)).ok_or_else(|| {
            invalid(format!(
                "stream_id: not a UUID: {}",
                quote(fields.stream_id.get(raw))
            ))
        })?;
        check_name(fields.stream_type.get(raw)).map_err(|p| p.error("stream_type"))?;
        if let Some(v) = fields.expected_version {
            if v < -1 {
                return Err(invalid(format!(
                    "expected_version: must be -1, 0 or a positive version, got {v}"
                )));
            }
        }
        let count = fields.event_count;
        if count == 0 {
            return Err(invalid("events: at least one event is required".to_owned()));
        }
        if count > limits.max_events {
            return Err(too_large(format!(
                "events: {count} events, over the limit of {}",
                limits.max_events
            )));
        }

        // Second pass, now that the count is known to be acceptable: one exact allocation.
        let mut events = Vec::with_capacity(count);
        proto::decode_append_request(raw, |event_fields| {
            events.push(StoredEvent {
                id: [0; 16],
                client_id: false,
                fields: event_fields,
            });
        })
        .map_err(|_| invalid("request: not a valid AppendEventsRequest message".to_owned()))?;

        let mut payload_bytes = 0usize;
        let mut client_id_count = 0usize;
        for (i, ev) in events.iter_mut().enumerate() {
            let f = ev.fields;
            if !f.event_id.is_empty() {
                ev.id = uuids::parse(f.event_id.get(raw)).ok_or_else(|| {
                    invalid(format!(
                        "events[{i}].event_id: not a UUID: {}",
                        quote(f.event_id.get(raw))
                    ))
                })?;
                ev.client_id = true;
                client_id_count += 1;
            }
            check_name(f.event_type.get(raw))
                .map_err(|p| p.error(format_args!("events[{i}].event_type")))?;
            if f.data.is_empty() {
                return Err(invalid(format!(
                    "events[{i}].data: must not be empty (a JSON value is required)"
                )));
            }
            let size = f.data.len() + f.metadata.len();
            if size > limits.max_event_bytes {
                return Err(too_large(format!(
                    "events[{i}]: data and metadata are {size} bytes, over the limit of {}",
                    limits.max_event_bytes
                )));
            }
            payload_bytes += size;
        }

        if client_id_count > 1 {
            check_duplicate_ids(&events, client_id_count)?;
        }

        check_json(raw, &events)?;

        // Ids are generated last so a rejected request consumes no randomness.
        if client_id_count < count {
            assign_random_ids(&mut events)?;
        }

        let mut buf = raw.to_vec();
        if let Some(caller) = caller {
            let (old, new) = record_caller(&mut buf, raw.len(), &mut events, caller);
            // `old` is part of `payload_bytes` (metadata lengths were summed above).
            payload_bytes = payload_bytes - old + new;
        }

        Ok(AppendRequest {
            buf: buf.into_boxed_slice(),
            stream_id,
            stream_type: fields.stream_type,
            expected_version: fields.expected_version,
            events: events.into_boxed_slice(),
            payload_bytes,
            client_id_count,
        })
    }

    /// The stream id, as 16 bytes.
    pub fn stream_id(&self) -> &[u8; 16] {
        &self.stream_id
    }

    pub fn stream_type(&self) -> &str {
        // Validated as UTF-8 in `parse`; the fallback is unreachable.
        std::str::from_utf8(self.stream_type.get(&self.buf)).unwrap_or_default()
    }

    /// `None` when the client did not set it (append whatever the version).
    pub fn expected_version(&self) -> Option<i64> {
        self.expected_version
    }

    pub fn event_count(&self) -> usize {
        self.events.len()
    }

    /// Sum of the data and metadata lengths of all events.
    pub fn payload_bytes(&self) -> usize {
        self.payload_bytes
    }

    pub fn has_client_ids(&self) -> bool {
        self.client_id_count > 0
    }

    /// Every event's id in order, generated ones included.
    pub fn event_ids(&self) -> impl ExactSizeIterator<Item = &[u8; 16]> + Clone {
        self.events.iter().map(|e| &e.id)
    }

    /// Only the ids the client supplied, in order.
    pub fn client_event_ids(&self) -> impl Iterator<Item = &[u8; 16]> + Clone {
        self.events.iter().filter(|e| e.client_id).map(|e| &e.id)
    }

    pub fn event(&self, i: usize) -> Option<EventView<'_>> {
        self.events.get(i).map(|ev| self.view(ev))
    }

    pub fn events(&self) -> impl ExactSizeIterator<Item = EventView<'_>> + Clone {
        self.events.iter().map(|ev| self.view(ev))
    }

    fn view(&self, ev: &StoredEvent) -> EventView<'_> {
        let f = &ev.fields;
        EventView {
            id: ev.id,
            client_id: ev.client_id,
            // Validated as UTF-8 in `parse`; the fallback is unreachable.
            event_type: std::str::from_utf8(f.event_type.get(&self.buf)).unwrap_or_default(),
            data: f.data.get(&self.buf),
            metadata: (!f.metadata.is_empty()).then(|| f.metadata.get(&self.buf)),
        }
    }

    /// The `AppendEventsResponse` for this request stored at versions `first_version..` and
    /// global positions `first_position..`. A snapshot is due when the appended versions
    /// cross a multiple of `snapshot_threshold` (never when it is 0 or less).
    pub fn response(
        &self,
        first_version: i64,
        first_position: i64,
        snapshot_threshold: i64,
    ) -> Result<AppendResponse<impl ExactSizeIterator<Item = &[u8; 16]> + Clone>, ArgumentError>
    {
        if first_version < 1 {
            return Err(ArgumentError(format!(
                "first_version: must be at least 1, got {first_version}"
            )));
        }
        if first_position < 1 {
            return Err(ArgumentError(format!(
                "first_position: must be at least 1, got {first_position}"
            )));
        }
        let count = i64::try_from(self.events.len()).unwrap_or(i64::MAX);
        let last_version = first_version.checked_add(count - 1).ok_or_else(|| {
            ArgumentError(format!(
                "first_version: {first_version} + {count} events overflows"
            ))
        })?;
        let last_position = first_position.checked_add(count - 1).ok_or_else(|| {
            ArgumentError(format!(
                "first_position: {first_position} + {count} events overflows"
            ))
        })?;
        // (first_version - 1) // t < (last_version) // t, in non-negative integers.
        let snapshot_due = snapshot_threshold > 0
            && (first_version - 1) / snapshot_threshold < last_version / snapshot_threshold;
        Ok(AppendResponse {
            next_expected_version: last_version,
            first_position,
            last_position,
            event_ids: self.event_ids(),
            snapshot_due,
        })
    }
}

/// Rejects a client id used twice, naming the first repetition in request order.
fn check_duplicate_ids(events: &[StoredEvent], client_id_count: usize) -> Result<(), RequestError> {
    let mut ids: Vec<([u8; 16], usize)> = Vec::with_capacity(client_id_count);
    ids.extend(
        events
            .iter()
            .enumerate()
            .filter(|(_, e)| e.client_id)
            .map(|(i, e)| (e.id, i)),
    );
    ids.sort_unstable();
    // Within a run of equal ids the indexes are ascending: run[1] repeats run[0]. The earliest
    // such repetition over all runs is the one a sequential scan would meet first.
    let first_dup = ids
        .windows(2)
        .enumerate()
        .filter(|(k, w)| w[0].0 == w[1].0 && (*k == 0 || ids[k - 1].0 != w[0].0))
        .map(|(_, w)| (w[1].1, w[0].1))
        .min();
    match first_dup {
        Some((later, first)) => Err(invalid(format!(
            "events[{later}].event_id: duplicate of events[{first}].event_id"
        ))),
        None => Ok(()),
    }
}

fn assign_random_ids(events: &mut [StoredEvent]) -> Result<(), RequestError> {
    for chunk in events.chunks_mut(64) {
        let mut ids = [[0u8; 16]; 64];
        let missing = chunk.iter().filter(|e| !e.client_id).count();
        uuids::fill_v4(&mut ids[..missing]).map_err(|e| RequestError {
            kind: ErrorKind::Internal,
            message: format!("could not generate event ids: {e}"),
        })?;
        for (ev, id) in chunk.iter_mut().filter(|e| !e.client_id).zip(ids) {
            ev.id = id;
        }
    }
    Ok(())
}

enum NameProblem {
    NotUtf8,
    Length(usize),
    Nul,
}

impl NameProblem {
    fn error(self, field: impl fmt::Display) -> RequestError {
        invalid(match self {
            NameProblem::NotUtf8 => format!("{field}: not valid UTF-8"),
            NameProblem::Length(n) => {
                format!("{field}: must be 1-{MAX_NAME_CHARS} characters, got {n}")
            }
            NameProblem::Nul => format!("{field}: must not contain U+0000"),
        })
    }
}

/// A `VARCHAR(255)` name: 1-255 Unicode scalar values, none of them NUL (PostgreSQL text
/// cannot hold it).
fn check_name(bytes: &[u8]) -> Result<(), NameProblem> {
    let text = std::str::from_utf8(bytes).map_err(|_| NameProblem::NotUtf8)?;
    let chars = text.chars().count();
    if chars == 0 || chars > MAX_NAME_CHARS {
        return Err(NameProblem::Length(chars));
    }
    if bytes.contains(&0) {
        return Err(NameProblem::Nul);
    }
    Ok(())
}

/// Every event's data is valid JSON, its metadata (if any) a valid JSON object without the
/// reserved key: the only checks proportional to the payload, so they run last.
fn check_json(raw: &[u8], events: &[StoredEvent]) -> Result<(), RequestError> {
    for (i, ev) in events.iter().enumerate() {
        json::validate(ev.fields.data.get(raw))
            .map_err(|e| invalid(format!("events[{i}].data: invalid JSON: {e}")))?;
        if !ev.fields.metadata.is_empty() {
            let doc = ev.fields.metadata.get(raw);
            match json::validate(doc) {
                Ok(TopLevel::Object) => {
                    if json::object_has_key(doc, CALLER_KEY) {
                        return Err(invalid(format!(
                            "events[{i}].metadata: the key \"{CALLER_KEY}\" is reserved: \
                             the server records the caller there"
                        )));
                    }
                }
                Ok(TopLevel::Other) => {
                    return Err(invalid(format!(
                        "events[{i}].metadata: must be a JSON object"
                    )))
                }
                Err(e) => return Err(invalid(format!("events[{i}].metadata: invalid JSON: {e}"))),
            }
        }
    }
    Ok(())
}

/// Gives every event of `events` (decoded from `buf[..raw_len]`) new metadata, appended to
/// `buf`, that records `caller`; returns the metadata bytes before and after.
fn record_caller(
    buf: &mut Vec<u8>,
    raw_len: usize,
    events: &mut [StoredEvent],
    caller: &[u8],
) -> (usize, usize) {
    let (mut old_total, mut new_total) = (0, 0);
    for ev in events {
        let start = buf.len();
        let old = ev.fields.metadata;
        let mut doc = Vec::new();
        let metadata = (!old.is_empty()).then(|| old.get(&buf[..raw_len]));
        with_caller(metadata, caller, &mut doc);
        old_total += old.len();
        new_total += doc.len();
        buf.extend_from_slice(&doc);
        ev.fields.metadata = Span {
            start,
            end: buf.len(),
        };
    }
    (old_total, new_total)
}

/// Appends to `out` the metadata object `metadata` (a validated JSON object, or none) with
/// `"$eventstore.caller": caller` as its first member.
fn with_caller(metadata: Option<&[u8]>, caller: &[u8], out: &mut Vec<u8>) {
    out.push(b'{');
    out.extend_from_slice(
        serde_json::to_string(CALLER_KEY)
            .unwrap_or_default()
            .as_bytes(),
    );
    out.push(b':');
    out.extend_from_slice(caller);
    // A valid object's first non-blank byte is its `{`; what follows it is its members and
    // the closing `}`.
    let rest = metadata
        .and_then(|doc| {
            doc.iter()
                .position(|&b| b == b'{')
                .map(|open| &doc[open + 1..])
        })
        .unwrap_or(b"}");
    let empty = rest
        .iter()
        .find(|b| !matches!(b, b' ' | b'\t' | b'\n' | b'\r'))
        .is_none_or(|&b| b == b'}');
    if !empty {
        out.push(b',');
    }
    out.extend_from_slice(rest);
}

/// A client value for an error message: quoted, control characters escaped, cut to
/// [`MAX_ECHO_CHARS`] characters, invalid UTF-8 shown as U+FFFD.
pub fn quote(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let mut out = String::with_capacity(text.len().min(4 * MAX_ECHO_CHARS) + 24);
    out.push('"');
    for (n, c) in text.chars().enumerate() {
        if n == MAX_ECHO_CHARS {
            let _ = write!(out, "\"… ({} bytes)", bytes.len());
            return out;
        }
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04x}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests;
