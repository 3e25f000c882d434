//! Decoding the binary `COPY (SELECT event_id, stream_id, stream_type, version, event_type,
//! data, metadata, created_at, position ...) TO STDOUT (FORMAT BINARY)` output, and turning
//! its rows into serialized protobuf `Event`s.
//!
//! Reading events this way skips both psycopg's per-value Python objects and protobuf's
//! Python message objects: the bytes PostgreSQL sends become the bytes gRPC sends. The input
//! comes from our own query, but it is still parsed defensively — every length is checked
//! against what is left, and anything unexpected is an error, never a panic.

use std::fmt;

use crate::copy_in::{COLUMNS, JSONB_VERSION, SIGNATURE};
use crate::out::Out;
use crate::proto::{EventFields, Timestamp};

const COLUMN_NAMES: [&str; 9] = [
    "event_id",
    "stream_id",
    "stream_type",
    "version",
    "event_type",
    "data",
    "metadata",
    "created_at",
    "position",
];

/// Flag bits 16-31 of the COPY header are "critical": a reader must stop if it finds one it
/// does not know (bit 16 is "rows carry OIDs", which PostgreSQL 12+ never sets).
const CRITICAL_FLAGS: u32 = 0xFFFF_0000;

/// The input is not the COPY output we expect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyOutError(pub String);

impl fmt::Display for CopyOutError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn error(msg: impl Into<String>) -> CopyOutError {
    CopyOutError(format!("COPY data: {}", msg.into()))
}

/// One row of the events query, borrowed from the COPY buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Row<'a> {
    pub event_id: [u8; 16],
    pub stream_id: [u8; 16],
    pub stream_type: &'a str,
    pub version: i64,
    pub event_type: &'a str,
    /// The JSON text, without jsonb's version byte.
    pub data: &'a [u8],
    /// The JSON text, without jsonb's version byte; `None` for SQL NULL.
    pub metadata: Option<&'a [u8]>,
    /// Microseconds since 2000-01-01 00:00 UTC.
    pub created_at_us: i64,
    pub position: i64,
}

impl<'a> Row<'a> {
    /// The row as a protobuf `Event`.
    pub fn event(&self) -> EventFields<'a> {
        EventFields {
            event_id: self.event_id,
            stream_id: self.stream_id,
            stream_type: self.stream_type,
            version: self.version,
            event_type: self.event_type,
            data: self.data,
            metadata: self.metadata.unwrap_or_default(),
            created_at: Timestamp::from_pg_micros(self.created_at_us),
            position: self.position,
        }
    }
}

/// The rows of a COPY buffer, in order. Yields an error (once, then stops) at the first
/// malformed byte, including a missing end-of-data marker or bytes after it.
pub struct Rows<'a> {
    buf: &'a [u8],
    pos: usize,
    row: usize,
    done: bool,
}

/// Checks the header and returns an iterator over the rows.
pub fn rows(buf: &[u8]) -> Result<Rows<'_>, CopyOutError> {
    if buf.len() < SIGNATURE.len() || &buf[..SIGNATURE.len()] != SIGNATURE {
        return Err(error("missing the binary COPY signature"));
    }
    let mut rows = Rows {
        buf,
        pos: SIGNATURE.len(),
        row: 0,
        done: false,
    };
    let flags = rows
        .bytes(4)
        .map_err(|_| error("header truncated"))
        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))?;
    if flags & CRITICAL_FLAGS != 0 {
        return Err(error(format!("unsupported header flags {flags:#010x}")));
    }
    let ext_len = rows.i32().map_err(|_| error("header truncated"))?;
    let ext_len = usize::try_from(ext_len)
        .map_err(|_| error(format!("invalid header extension length {ext_len}")))?;
    rows.bytes(ext_len)
        .map_err(|_| error("header extension truncated"))?;
    Ok(rows)
}

impl<'a> Rows<'a> {
    fn bytes(&mut self, n: usize) -> Result<&'a [u8], usize> {
        let left = self.buf.len() - self.pos;
        if n > left {
            return Err(left);
        }
        let bytes = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(bytes)
    }

    fn i16(&mut self) -> Result<i16, usize> {
        self.bytes(2).map(|b| i16::from_be_bytes([b[0], b[1]]))
    }

    fn i32(&mut self) -> Result<i32, usize> {
        self.bytes(4)
            .map(|b| i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn column_error(&self, col: usize, what: impl fmt::Display) -> CopyOutError {
        error(format!(
            "row {}, column {}: {what}",
            self.row,
            COLUMN_NAMES.get(col).unwrap_or(&"?")
        ))
    }

    /// The next column's value; `None` for NULL.
    fn field(&mut self, col: usize) -> Result<Option<&'a [u8]>, CopyOutError> {
        let len = self
            .i32()
            .map_err(|_| self.column_error(col, "truncated before its length"))?;
        if len == -1 {
            return Ok(None);
        }
        let Ok(n) = usize::try_from(len) else {
            return Err(self.column_error(col, format!("invalid length {len}")));
        };
        self.bytes(n).map(Some).map_err(|left| {
            self.column_error(col, format!("truncated: {n} bytes announced, {left} left"))
        })
    }

    fn non_null(&mut self, col: usize) -> Result<&'a [u8], CopyOutError> {
        self.field(col)?
            .ok_or_else(|| self.column_error(col, "unexpected NULL"))
    }

    fn uuid(&mut self, col: usize) -> Result<[u8; 16], CopyOutError> {
        let v = self.non_null(col)?;
        <[u8; 16]>::try_from(v)
            .map_err(|_| self.column_error(col, format!("a uuid is 16 bytes, got {}", v.len())))
    }

    fn int8(&mut self, col: usize) -> Result<i64, CopyOutError> {
        let v = self.non_null(col)?;
        <[u8; 8]>::try_from(v)
            .map(i64::from_be_bytes)
            .map_err(|_| self.column_error(col, format!("an int8 is 8 bytes, got {}", v.len())))
    }

    fn text(&mut self, col: usize) -> Result<&'a str, CopyOutError> {
        let v = self.non_null(col)?;
        std::str::from_utf8(v).map_err(|_| self.column_error(col, "not valid UTF-8"))
    }

    fn jsonb(&mut self, col: usize) -> Result<Option<&'a [u8]>, CopyOutError> {
        match self.field(col)? {
            None => Ok(None),
            Some([JSONB_VERSION, json @ ..]) => Ok(Some(json)),
            Some([]) => Err(self.column_error(col, "empty jsonb value")),
            Some([v, ..]) => Err(self.column_error(col, format!("unknown jsonb version {v}"))),
        }
    }

    fn row(&mut self) -> Result<Option<Row<'a>>, CopyOutError> {
        let count = self.i16().map_err(|_| {
            error(format!(
                "input ends after {} rows without the end-of-data marker",
                self.row
            ))
        })?;
        if count == -1 {
            let extra = self.buf.len() - self.pos;
            if extra != 0 {
                return Err(error(format!("{extra} bytes after the end-of-data marker")));
            }
            return Ok(None);
        }
        if count != COLUMNS {
            return Err(error(format!(
                "row {}: expected {COLUMNS} columns, got {count}",
                self.row
            )));
        }
        let row = Row {
            event_id: self.uuid(0)?,
            stream_id: self.uuid(1)?,
            stream_type: self.text(2)?,
            version: self.int8(3)?,
            event_type: self.text(4)?,
            data: self
                .jsonb(5)?
                .ok_or_else(|| self.column_error(5, "unexpected NULL"))?,
            metadata: self.jsonb(6)?,
            created_at_us: self.int8(7)?,
            position: self.int8(8)?,
        };
        self.row += 1;
        Ok(Some(row))
    }
}

impl<'a> Iterator for Rows<'a> {
    type Item = Result<Row<'a>, CopyOutError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let r = self.row().transpose();
        if !matches!(r, Some(Ok(_))) {
            self.done = true;
        }
        r
    }
}

/// What [`write_page`] will encode.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Page {
    /// Rows to encode, from the first.
    pub rows: usize,
    /// Exact size of the encoding.
    pub len: usize,
    /// Version and position of the last row encoded (0 if none).
    pub last_version: i64,
    pub last_position: i64,
    /// Whether rows remain after the page.
    pub more: bool,
}

/// Validates the whole input and decides how many rows fit: at most `max_count`, and no row
/// that would take the output over `max_bytes` — except the first, so a page always makes
/// progress.
pub fn plan_page(buf: &[u8], max_count: usize, max_bytes: usize) -> Result<Page, CopyOutError> {
    let mut page = Page::default();
    for row in rows(buf)? {
        let row = row?;
        if page.more {
            continue; // still validate the rest
        }
        let size = row.event().encoded_len_as_field_1();
        if page.rows == max_count || (page.rows > 0 && page.len + size > max_bytes) {
            page.more = true;
            continue;
        }
        page.rows += 1;
        page.len += size;
        page.last_version = row.version;
        page.last_position = row.position;
    }
    Ok(page)
}

/// Writes the first `page.rows` rows of `buf` (already validated by [`plan_page`]) as a
/// sequence of length-delimited field-1 `Event`s into `out`, exactly `page.len` bytes.
pub fn write_page(buf: &[u8], page: &Page, out: &mut [u8]) -> Result<(), CopyOutError> {
    let mut out = Out::new(out);
    for row in rows(buf)?.take(page.rows) {
        row?.event().write_as_field_1(&mut out);
    }
    debug_assert!(out.is_full(), "page size computed wrongly");
    Ok(())
}

/// [`plan_page`] then [`write_page`] into a new vector.
pub fn encode_page(
    buf: &[u8],
    max_count: usize,
    max_bytes: usize,
) -> Result<(Vec<u8>, Page), CopyOutError> {
    let page = plan_page(buf, max_count, max_bytes)?;
    let mut out = vec![0; page.len];
    write_page(buf, &page, &mut out)?;
    Ok((out, page))
}

/// Every row, validated.
pub fn all_rows(buf: &[u8]) -> Result<Vec<Row<'_>>, CopyOutError> {
    rows(buf)?.collect()
}

/// One row's serialized `Event` message (without a field wrapper).
pub fn encode_event(row: &Row<'_>) -> Vec<u8> {
    let ev = row.event();
    let mut out = vec![0; ev.encoded_len()];
    ev.write_into(&mut out);
    out
}

#[cfg(test)]
mod tests;
