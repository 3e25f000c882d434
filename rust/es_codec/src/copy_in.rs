//! The PostgreSQL binary COPY payload for
//! `COPY events (event_id, stream_id, stream_type, version, event_type, data, metadata,
//! created_at, position) FROM STDIN (FORMAT BINARY)`.
//!
//! Binary COPY is the cheapest way to insert a batch: no SQL text to parse, no per-value
//! text conversion on the server. Layout (all integers big-endian): the 11-byte signature,
//! int32 flags, int32 header-extension length, then per row an int16 column count and per
//! column an int32 byte length (-1: NULL) followed by the value in the type's binary send
//! format, and finally an int16 -1.

use std::fmt;

use crate::out::Out;
use crate::request::AppendRequest;

pub const SIGNATURE: &[u8; 11] = b"PGCOPY\n\xff\r\n\0";
/// Signature, flags, header-extension length.
pub const HEADER_LEN: usize = 11 + 4 + 4;
pub const TRAILER_LEN: usize = 2;
pub const COLUMNS: i16 = 9;
/// jsonb's binary format: a version byte (1), then the JSON text.
pub const JSONB_VERSION: u8 = 1;

/// Bytes of a row apart from the variable-length values: the column count, nine lengths,
/// two uuids, three int8s (version, created_at, position) and the jsonb version of data.
const ROW_FIXED_LEN: usize = 2 + 9 * 4 + 16 + 16 + 8 + 8 + 8 + 1;

/// Arguments that cannot be encoded: a bug in the caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyInError(pub String);

impl fmt::Display for CopyInError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A validated plan: what [`write`] will produce and how long it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    pub len: usize,
    pub rows: usize,
}

/// Checks the arguments and computes the exact payload size.
///
/// Request `i`'s events get versions `first_versions[i]..` and all events get consecutive
/// positions from `first_position`, in order.
pub fn plan(
    requests: &[&AppendRequest],
    first_versions: &[i64],
    first_position: i64,
) -> Result<Plan, CopyInError> {
    if requests.len() != first_versions.len() {
        return Err(CopyInError(format!(
            "requests and first_versions must have the same length, got {} and {}",
            requests.len(),
            first_versions.len()
        )));
    }
    if first_position < 1 {
        return Err(CopyInError(format!(
            "first_position: must be at least 1, got {first_position}"
        )));
    }
    let mut len = HEADER_LEN + TRAILER_LEN;
    let mut rows = 0usize;
    for (i, (req, &first_version)) in requests.iter().zip(first_versions).enumerate() {
        if first_version < 1 {
            return Err(CopyInError(format!(
                "first_versions[{i}]: must be at least 1, got {first_version}"
            )));
        }
        let count = req.event_count();
        if to_i64(count)
            .and_then(|c| first_version.checked_add(c - 1))
            .is_none()
        {
            return Err(CopyInError(format!(
                "first_versions[{i}]: {first_version} + {count} events overflows"
            )));
        }
        let per_row = ROW_FIXED_LEN + req.stream_type().len();
        for ev in req.events() {
            let meta_len = ev.metadata.map_or(0, |m| 1 + m.len());
            // Every value's length travels as an int32.
            if i32::try_from(1 + ev.data.len().max(meta_len)).is_err() {
                return Err(CopyInError(format!(
                    "requests[{i}]: an event is too large for a COPY field"
                )));
            }
            len += per_row + ev.event_type.len() + ev.data.len() + meta_len;
        }
        rows += count;
    }
    if to_i64(rows)
        .and_then(|r| first_position.checked_add(r - 1))
        .is_none()
    {
        return Err(CopyInError(format!(
            "first_position: {first_position} + {rows} events overflows"
        )));
    }
    Ok(Plan { len, rows })
}

fn to_i64(n: usize) -> Option<i64> {
    i64::try_from(n).ok()
}

/// Writes the payload into `buf`, which must be exactly [`plan`]`(..).len` bytes; the
/// arguments must be the ones `plan` accepted.
pub fn write(
    requests: &[&AppendRequest],
    first_versions: &[i64],
    first_position: i64,
    created_at_us: i64,
    buf: &mut [u8],
) {
    let mut out = Out::new(buf);
    out.put_slice(SIGNATURE);
    out.put_i32_be(0); // flags: no OIDs
    out.put_i32_be(0); // no header extension
    let mut position = first_position;
    for (req, &first_version) in requests.iter().zip(first_versions) {
        let stream_id = req.stream_id();
        let stream_type = req.stream_type().as_bytes();
        let mut version = first_version;
        for ev in req.events() {
            out.put_i16_be(COLUMNS);
            put_field(&mut out, &ev.id);
            put_field(&mut out, stream_id);
            put_field(&mut out, stream_type);
            put_i64_field(&mut out, version);
            put_field(&mut out, ev.event_type.as_bytes());
            put_jsonb_field(&mut out, ev.data);
            match ev.metadata {
                Some(m) => put_jsonb_field(&mut out, m),
                None => out.put_i32_be(-1),
            }
            put_i64_field(&mut out, created_at_us);
            put_i64_field(&mut out, position);
            // `plan` proved neither sequence overflows.
            version = version.wrapping_add(1);
            position = position.wrapping_add(1);
        }
    }
    out.put_i16_be(-1);
    debug_assert!(out.is_full(), "COPY size computed wrongly");
}

/// Length of a value `plan` has bounded, as the int32 COPY wants.
fn field_len(len: usize) -> i32 {
    i32::try_from(len).unwrap_or(i32::MAX)
}

fn put_field(out: &mut Out<'_>, value: &[u8]) {
    out.put_i32_be(field_len(value.len()));
    out.put_slice(value);
}

fn put_i64_field(out: &mut Out<'_>, v: i64) {
    out.put_i32_be(8);
    out.put_i64_be(v);
}

fn put_jsonb_field(out: &mut Out<'_>, json: &[u8]) {
    out.put_i32_be(field_len(1 + json.len()));
    out.put_u8(JSONB_VERSION);
    out.put_slice(json);
}

/// [`plan`] then [`write`] into a new vector (tests and non-Python callers).
pub fn encode(
    requests: &[&AppendRequest],
    first_versions: &[i64],
    first_position: i64,
    created_at_us: i64,
) -> Result<Vec<u8>, CopyInError> {
    let plan = plan(requests, first_versions, first_position)?;
    let mut buf = vec![0; plan.len];
    write(
        requests,
        first_versions,
        first_position,
        created_at_us,
        &mut buf,
    );
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::parsed_request;

    fn request(events: &[(&str, &str, &str)]) -> AppendRequest {
        let events: Vec<_> = events.iter().map(|&(t, d, m)| ("", t, d, m)).collect();
        parsed_request("order", &events)
    }

    #[test]
    fn empty_batch_is_header_and_trailer() {
        let bytes = encode(&[], &[], 1, 0).unwrap();
        assert_eq!(bytes, b"PGCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0\xff\xff");
    }

    #[test]
    fn exact_layout_of_one_row() {
        let req = request(&[("created", "{\"a\":1}", "")]);
        let bytes = encode(&[&req], &[7], 42, 0x0102_0304_0506_0708).unwrap();
        let mut expected = Vec::new();
        expected.extend_from_slice(b"PGCOPY\n\xff\r\n\0");
        expected.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0]);
        expected.extend_from_slice(&[0, 9]);
        expected.extend_from_slice(&[0, 0, 0, 16]);
        expected.extend_from_slice(req.event(0).unwrap().id.as_slice());
        expected.extend_from_slice(&[0, 0, 0, 16]);
        expected.extend_from_slice(req.stream_id());
        expected.extend_from_slice(&[0, 0, 0, 5]);
        expected.extend_from_slice(b"order");
        expected.extend_from_slice(&[0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 7]);
        expected.extend_from_slice(&[0, 0, 0, 7]);
        expected.extend_from_slice(b"created");
        expected.extend_from_slice(&[0, 0, 0, 8, 1]);
        expected.extend_from_slice(b"{\"a\":1}");
        expected.extend_from_slice(&[0xff, 0xff, 0xff, 0xff]);
        expected.extend_from_slice(&[0, 0, 0, 8, 1, 2, 3, 4, 5, 6, 7, 8]);
        expected.extend_from_slice(&[0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 42]);
        expected.extend_from_slice(&[0xff, 0xff]);
        assert_eq!(bytes, expected);
    }

    #[test]
    fn argument_errors() {
        let req = request(&[("t", "1", ""), ("t", "2", "")]);
        let err = |fv: &[i64], fp: i64| plan(&[&req], fv, fp).unwrap_err().0;
        assert_eq!(
            err(&[], 1),
            "requests and first_versions must have the same length, got 1 and 0"
        );
        assert_eq!(err(&[0], 1), "first_versions[0]: must be at least 1, got 0");
        assert_eq!(
            err(&[-3], 1),
            "first_versions[0]: must be at least 1, got -3"
        );
        assert_eq!(err(&[1], 0), "first_position: must be at least 1, got 0");
        assert_eq!(
            err(&[i64::MAX], 1),
            format!("first_versions[0]: {} + 2 events overflows", i64::MAX)
        );
        assert_eq!(
            err(&[1], i64::MAX),
            format!("first_position: {} + 2 events overflows", i64::MAX)
        );
        assert!(plan(&[&req], &[i64::MAX - 1], i64::MAX - 1).is_ok());
    }
}
