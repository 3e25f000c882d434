//! Hand-rolled protobuf wire format for the messages on the hot path of
//! `proto/eventstore/v1/eventstore.proto` (field numbers below are that file's).
//!
//! Hand-rolled rather than generated because decoding only needs to find byte ranges in the
//! request (no copies, no per-field allocation), and encoding writes straight into a buffer
//! sized in advance. Encoding follows what the reference implementations emit for proto3:
//! fields in field-number order, scalars equal to their default omitted, a set sub-message
//! always present (even when empty) — so the bytes are identical to Python's
//! `SerializeToString()`.

use crate::out::Out;
use crate::uuids;

const WIRE_VARINT: u8 = 0;
const WIRE_I64: u8 = 1;
const WIRE_LEN: u8 = 2;
const WIRE_START_GROUP: u8 = 3;
const WIRE_END_GROUP: u8 = 4;
const WIRE_I32: u8 = 5;

/// Deepest nesting of (deprecated) groups we skip in unknown fields; the reference parsers
/// stop at about 100 levels too.
const MAX_GROUP_DEPTH: u32 = 100;

/// Bytes of `v` as a base-128 varint (1..=10).
#[inline]
pub const fn varint_len(v: u64) -> usize {
    // 7 bits per byte; 0 still takes one byte.
    (64 - (v | 1).leading_zeros() as usize).div_ceil(7)
}

/// Bytes of a length-delimited field with a one-byte tag (field numbers 1-15) holding `len`.
#[inline]
pub const fn len_field_size(len: usize) -> usize {
    1 + varint_len(len as u64) + len
}

/// Bytes of an `int64` field with a one-byte tag; 0 when `v` is the default and so omitted.
#[inline]
#[allow(clippy::cast_sign_loss)] // int64 is encoded as its two's complement bits.
const fn int64_field_size(v: i64) -> usize {
    if v == 0 {
        0
    } else {
        1 + varint_len(v as u64)
    }
}

#[inline]
const fn tag(field: u8, wire: u8) -> u8 {
    (field << 3) | wire
}

#[inline]
#[allow(clippy::cast_sign_loss)] // int64 is encoded as its two's complement bits.
fn put_int64_field(out: &mut Out<'_>, field: u8, v: i64) {
    if v != 0 {
        out.put_u8(tag(field, WIRE_VARINT));
        out.put_varint(v as u64);
    }
}

#[inline]
fn put_len_field(out: &mut Out<'_>, field: u8, bytes: &[u8]) {
    out.put_u8(tag(field, WIRE_LEN));
    out.put_varint(bytes.len() as u64);
    out.put_slice(bytes);
}

/// A proto3 string/bytes field: omitted when empty.
#[inline]
fn put_nonempty_len_field(out: &mut Out<'_>, field: u8, bytes: &[u8]) {
    if !bytes.is_empty() {
        put_len_field(out, field, bytes);
    }
}

#[inline]
fn nonempty_len_field_size(len: usize) -> usize {
    if len == 0 {
        0
    } else {
        len_field_size(len)
    }
}

#[inline]
fn put_uuid_text_field(out: &mut Out<'_>, field: u8, id: &[u8; 16]) {
    let mut text = [0u8; uuids::TEXT_LEN];
    uuids::write_text(id, &mut text);
    put_len_field(out, field, &text);
}

const UUID_TEXT_FIELD_SIZE: usize = len_field_size(uuids::TEXT_LEN);

// ---------------------------------------------------------------------------------------------
// Decoding AppendEventsRequest

/// A byte range of the decoded message.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Span {
    pub start: usize,
    pub end: usize,
}

impl Span {
    /// The bytes of this span in `buf` (the buffer it was decoded from; empty if it is not).
    #[inline]
    pub fn get(self, buf: &[u8]) -> &[u8] {
        buf.get(self.start..self.end).unwrap_or_default()
    }

    #[inline]
    pub fn len(self) -> usize {
        self.end - self.start
    }

    #[inline]
    pub fn is_empty(self) -> bool {
        self.end == self.start
    }
}

/// The bytes are not a valid protobuf encoding of the expected message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WireError;

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    end: usize,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8], span: Span) -> Self {
        Reader {
            buf,
            pos: span.start,
            end: span.end.min(buf.len()),
        }
    }

    fn at_end(&self) -> bool {
        self.pos >= self.end
    }

    fn byte(&mut self) -> Result<u8, WireError> {
        if self.pos >= self.end {
            return Err(WireError);
        }
        let b = *self.buf.get(self.pos).ok_or(WireError)?;
        self.pos += 1;
        Ok(b)
    }

    fn varint(&mut self) -> Result<u64, WireError> {
        let mut v = 0u64;
        for i in 0..10 {
            let b = self.byte()?;
            // Bits beyond 64 in the tenth byte are dropped, as the reference parsers do.
            v |= u64::from(b & 0x7f) << (7 * i);
            if b < 0x80 {
                return Ok(v);
            }
        }
        Err(WireError)
    }

    fn tag(&mut self) -> Result<(u32, u8), WireError> {
        let key = self.varint()?;
        let field = u32::try_from(key >> 3).map_err(|_| WireError)?;
        // Field numbers are 1..=2^29-1.
        if field == 0 || field >= 1 << 29 {
            return Err(WireError);
        }
        #[allow(clippy::cast_possible_truncation)] // masked to 3 bits
        Ok((field, (key & 7) as u8))
    }

    fn advance(&mut self, n: usize) -> Result<(), WireError> {
        let end = self.pos.checked_add(n).ok_or(WireError)?;
        if end > self.end {
            return Err(WireError);
        }
        self.pos = end;
        Ok(())
    }

    fn len_delimited(&mut self) -> Result<Span, WireError> {
        let len = usize::try_from(self.varint()?).map_err(|_| WireError)?;
        let start = self.pos;
        self.advance(len)?;
        Ok(Span {
            start,
            end: self.pos,
        })
    }

    /// Skips the value of an unknown field.
    fn skip(&mut self, field: u32, wire: u8, depth: u32) -> Result<(), WireError> {
        match wire {
            WIRE_VARINT => self.varint().map(drop),
            WIRE_I64 => self.advance(8),
            WIRE_LEN => self.len_delimited().map(drop),
            WIRE_I32 => self.advance(4),
            WIRE_START_GROUP => {
                if depth >= MAX_GROUP_DEPTH {
                    return Err(WireError);
                }
                loop {
                    let (f, w) = self.tag()?;
                    if w == WIRE_END_GROUP {
                        return if f == field { Ok(()) } else { Err(WireError) };
                    }
                    self.skip(f, w, depth + 1)?;
                }
            }
            // An end-group without a start, or wire types 6 and 7, which do not exist.
            _ => Err(WireError),
        }
    }
}

/// The top-level fields of an `AppendEventsRequest`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RequestFields {
    /// Field 1, `string stream_id`.
    pub stream_id: Span,
    /// Field 2, `string stream_type`.
    pub stream_type: Span,
    /// Field 4, `optional int64 expected_version`; `None` when absent (absent ≠ 0).
    pub expected_version: Option<i64>,
    /// How many field-3 (`repeated NewEvent events`) entries there are.
    pub event_count: usize,
}

/// One `NewEvent`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NewEventFields {
    /// Field 1, `string event_id`.
    pub event_id: Span,
    /// Field 2, `string event_type`.
    pub event_type: Span,
    /// Field 3, `bytes data`.
    pub data: Span,
    /// Field 4, `bytes metadata`.
    pub metadata: Span,
}

/// Decodes an `AppendEventsRequest`, calling `on_event` for each `NewEvent` in order.
///
/// Unknown fields are skipped. A known field with the wrong wire type is an error rather
/// than (as in some parsers) an unknown field: an `expected_version` silently read as absent
/// would turn an optimistic-concurrency check into "any version". A field given twice keeps
/// its last value, as protobuf specifies.
pub fn decode_append_request(
    buf: &[u8],
    mut on_event: impl FnMut(NewEventFields),
) -> Result<RequestFields, WireError> {
    let mut r = Reader::new(
        buf,
        Span {
            start: 0,
            end: buf.len(),
        },
    );
    let mut fields = RequestFields::default();
    while !r.at_end() {
        let (field, wire) = r.tag()?;
        match (field, wire) {
            (1, WIRE_LEN) => fields.stream_id = r.len_delimited()?,
            (2, WIRE_LEN) => fields.stream_type = r.len_delimited()?,
            (3, WIRE_LEN) => {
                let span = r.len_delimited()?;
                on_event(decode_new_event(buf, span)?);
                fields.event_count += 1;
            }
            #[allow(clippy::cast_possible_wrap)] // int64 travels as its two's complement bits.
            (4, WIRE_VARINT) => fields.expected_version = Some(r.varint()? as i64),
            (1..=4, _) => return Err(WireError),
            _ => r.skip(field, wire, 0)?,
        }
    }
    Ok(fields)
}

fn decode_new_event(buf: &[u8], span: Span) -> Result<NewEventFields, WireError> {
    let mut r = Reader::new(buf, span);
    let mut ev = NewEventFields::default();
    while !r.at_end() {
        let (field, wire) = r.tag()?;
        match (field, wire) {
            (1, WIRE_LEN) => ev.event_id = r.len_delimited()?,
            (2, WIRE_LEN) => ev.event_type = r.len_delimited()?,
            (3, WIRE_LEN) => ev.data = r.len_delimited()?,
            (4, WIRE_LEN) => ev.metadata = r.len_delimited()?,
            (1..=4, _) => return Err(WireError),
            _ => r.skip(field, wire, 0)?,
        }
    }
    Ok(ev)
}

// ---------------------------------------------------------------------------------------------
// Encoding AppendEventsResponse

/// The fields of an `AppendEventsResponse`.
pub struct AppendResponse<I> {
    pub next_expected_version: i64,
    pub first_position: i64,
    pub last_position: i64,
    /// `repeated string event_ids`, written as canonical UUID text.
    pub event_ids: I,
    pub snapshot_due: bool,
}

impl<'a, I> AppendResponse<I>
where
    I: Iterator<Item = &'a [u8; 16]> + ExactSizeIterator + Clone,
{
    pub fn encoded_len(&self) -> usize {
        int64_field_size(self.next_expected_version)
            + int64_field_size(self.first_position)
            + int64_field_size(self.last_position)
            + self.event_ids.len() * UUID_TEXT_FIELD_SIZE
            + if self.snapshot_due { 2 } else { 0 }
    }

    pub fn write(&self, out: &mut Out<'_>) {
        put_int64_field(out, 1, self.next_expected_version);
        put_int64_field(out, 2, self.first_position);
        put_int64_field(out, 3, self.last_position);
        for id in self.event_ids.clone() {
            put_uuid_text_field(out, 4, id);
        }
        if self.snapshot_due {
            out.put_u8(tag(5, WIRE_VARINT));
            out.put_u8(1);
        }
    }

    /// Writes into `buf`, which must be exactly [`Self::encoded_len`] bytes.
    pub fn write_into(&self, buf: &mut [u8]) {
        let mut out = Out::new(buf);
        self.write(&mut out);
        debug_assert!(out.is_full(), "response size computed wrongly");
    }

    pub fn to_vec(&self) -> Vec<u8> {
        let mut buf = vec![0; self.encoded_len()];
        self.write_into(&mut buf);
        buf
    }
}

// ---------------------------------------------------------------------------------------------
// Encoding Event

/// `google.protobuf.Timestamp`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Timestamp {
    pub seconds: i64,
    pub nanos: i32,
}

/// Seconds from 1970-01-01 to 2000-01-01, PostgreSQL's timestamp epoch.
const PG_EPOCH_UNIX_SECONDS: i64 = 946_684_800;

impl Timestamp {
    /// From PostgreSQL's binary `timestamptz`: microseconds since 2000-01-01 00:00 UTC.
    /// Seconds are floored, so `nanos` is never negative, as `Timestamp` requires.
    pub fn from_pg_micros(us: i64) -> Timestamp {
        // |us / 10^6| < 2^44, so adding the epoch offset cannot overflow, and the remainder
        // times 1000 is below 10^9 < 2^31.
        let seconds = us.div_euclid(1_000_000) + PG_EPOCH_UNIX_SECONDS;
        #[allow(clippy::cast_possible_truncation)]
        let nanos = (us.rem_euclid(1_000_000) * 1000) as i32;
        Timestamp { seconds, nanos }
    }

    #[allow(clippy::cast_sign_loss)] // int32 negatives are sign-extended to 64 bits on the wire.
    fn encoded_len(self) -> usize {
        int64_field_size(self.seconds)
            + if self.nanos == 0 {
                0
            } else {
                1 + varint_len(i64::from(self.nanos) as u64)
            }
    }

    #[allow(clippy::cast_sign_loss)]
    fn write(self, out: &mut Out<'_>) {
        put_int64_field(out, 1, self.seconds);
        if self.nanos != 0 {
            out.put_u8(tag(2, WIRE_VARINT));
            out.put_varint(i64::from(self.nanos) as u64);
        }
    }
}

/// The fields of an `Event`, borrowed from wherever they were decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventFields<'a> {
    pub event_id: [u8; 16],
    pub stream_id: [u8; 16],
    pub stream_type: &'a str,
    pub version: i64,
    pub event_type: &'a str,
    pub data: &'a [u8],
    /// Empty when the event has none.
    pub metadata: &'a [u8],
    pub created_at: Timestamp,
    pub position: i64,
}

impl EventFields<'_> {
    /// Size of the serialized `Event` message.
    pub fn encoded_len(&self) -> usize {
        2 * UUID_TEXT_FIELD_SIZE
            + nonempty_len_field_size(self.stream_type.len())
            + int64_field_size(self.version)
            + nonempty_len_field_size(self.event_type.len())
            + nonempty_len_field_size(self.data.len())
            + nonempty_len_field_size(self.metadata.len())
            + len_field_size(self.created_at.encoded_len())
            + int64_field_size(self.position)
    }

    /// Size of the `Event` as a length-delimited field 1 of an enclosing message.
    pub fn encoded_len_as_field_1(&self) -> usize {
        len_field_size(self.encoded_len())
    }

    /// Writes the serialized `Event` message.
    pub fn write(&self, out: &mut Out<'_>) {
        put_uuid_text_field(out, 1, &self.event_id);
        put_uuid_text_field(out, 2, &self.stream_id);
        put_nonempty_len_field(out, 3, self.stream_type.as_bytes());
        put_int64_field(out, 4, self.version);
        put_nonempty_len_field(out, 5, self.event_type.as_bytes());
        put_nonempty_len_field(out, 6, self.data);
        put_nonempty_len_field(out, 7, self.metadata);
        out.put_u8(tag(8, WIRE_LEN));
        out.put_varint(self.created_at.encoded_len() as u64);
        self.created_at.write(out);
        put_int64_field(out, 9, self.position);
    }

    /// Writes the serialized `Event` into `buf`, which must be exactly
    /// [`Self::encoded_len`] bytes.
    pub fn write_into(&self, buf: &mut [u8]) {
        let mut out = Out::new(buf);
        self.write(&mut out);
        debug_assert!(out.is_full(), "event size computed wrongly");
    }

    /// Writes the `Event` as a length-delimited field 1 (`repeated Event events = 1` of
    /// `GetEventsResponse`/`ReadAllResponse`/`EventBatch`, `Event event = 1` of
    /// `EventNotification`).
    pub fn write_as_field_1(&self, out: &mut Out<'_>) {
        out.put_u8(tag(1, WIRE_LEN));
        out.put_varint(self.encoded_len() as u64);
        self.write(out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varint_lengths() {
        for (v, n) in [
            (0u64, 1),
            (1, 1),
            (127, 1),
            (128, 2),
            (16_383, 2),
            (16_384, 3),
            (u64::from(u32::MAX), 5),
            (1 << 63, 10),
            (u64::MAX, 10),
        ] {
            assert_eq!(varint_len(v), n, "{v}");
            let mut buf = [0u8; 10];
            let mut out = Out::new(&mut buf);
            out.put_varint(v);
            assert_eq!(out.written(), n);
            let mut r = Reader::new(&buf, Span { start: 0, end: n });
            assert_eq!(r.varint(), Ok(v));
        }
    }

    #[test]
    fn varint_decoding_limits() {
        // Eleven bytes: too long.
        let long = [0xffu8; 10];
        let mut r = Reader::new(&long, Span { start: 0, end: 10 });
        assert_eq!(r.varint(), Err(WireError));
        // Truncated.
        let cut = [0x80u8, 0x80];
        let mut r = Reader::new(&cut, Span { start: 0, end: 2 });
        assert_eq!(r.varint(), Err(WireError));
        // -1 as int64.
        let minus_one = [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01];
        let mut r = Reader::new(&minus_one, Span { start: 0, end: 10 });
        assert_eq!(r.varint(), Ok(u64::MAX));
    }

    #[test]
    fn timestamps_from_pg_micros() {
        assert_eq!(
            Timestamp::from_pg_micros(0),
            Timestamp {
                seconds: 946_684_800,
                nanos: 0
            }
        );
        assert_eq!(
            Timestamp::from_pg_micros(1_500_001),
            Timestamp {
                seconds: 946_684_801,
                nanos: 500_001_000
            }
        );
        // Before 2000: floor, never negative nanos.
        assert_eq!(
            Timestamp::from_pg_micros(-1),
            Timestamp {
                seconds: 946_684_799,
                nanos: 999_999_000
            }
        );
        assert_eq!(
            Timestamp::from_pg_micros(-946_684_800_000_000),
            Timestamp {
                seconds: 0,
                nanos: 0
            }
        );
        assert_eq!(
            Timestamp::from_pg_micros(-946_684_800_000_001),
            Timestamp {
                seconds: -1,
                nanos: 999_999_000
            }
        );
        // PostgreSQL's ±infinity do not overflow.
        let _ = Timestamp::from_pg_micros(i64::MAX);
        let _ = Timestamp::from_pg_micros(i64::MIN);
    }

    #[test]
    fn skips_unknown_fields_of_every_wire_type() {
        // field 9 varint, field 10 fixed64, field 11 len, field 12 fixed32,
        // field 13 group containing field 1 varint and a nested group 2, then field 1 string.
        let mut msg = vec![0x48, 0x96, 0x01, 0x51];
        msg.extend_from_slice(&[0; 8]);
        msg.extend_from_slice(&[0x5a, 0x02, b'h', b'i', 0x65, 1, 2, 3, 4]);
        msg.extend_from_slice(&[0x6b, 0x08, 0x01, 0x13, 0x14, 0x6c]);
        msg.extend_from_slice(&[0x0a, 0x01, b'x']);
        let f = decode_append_request(&msg, |_| {}).unwrap();
        assert_eq!(f.stream_id.get(&msg), b"x");
    }

    #[test]
    fn rejects_malformed_wire_data() {
        for bad in [
            &[0x0a, 0x05, b'a'][..],                         // length past the end
            &[0x0a][..],                                     // missing length
            &[0x00, 0x01][..],                               // field number 0
            &[0x0f][..],                                     // wire type 7
            &[0x0e][..],                                     // wire type 6
            &[0x6c][..],                                     // end group without start
            &[0x6b, 0x08, 0x01][..],                         // unterminated group
            &[0x6b, 0x74][..],             // group closed by the wrong field number
            &[0x08, 0x01][..],             // stream_id as a varint
            &[0x22, 0x00][..],             // expected_version as bytes
            &[0x1a, 0x02, 0x08, 0x01][..], // NewEvent.event_id as a varint
            &[0x1a, 0x02, 0x0a, 0x05][..], // NewEvent field past its own end
            &[0x20, 0x80][..],             // truncated varint
            &[0xf8, 0xff, 0xff, 0xff, 0xff, 0x01, 0x00][..], // field number 2^32-1
        ] {
            assert_eq!(
                decode_append_request(bad, |_| {}),
                Err(WireError),
                "{bad:x?}"
            );
        }
        // Groups nested deeper than the limit.
        let mut deep = vec![0x6b; 200];
        deep.extend(vec![0x6c; 200]);
        assert_eq!(decode_append_request(&deep, |_| {}), Err(WireError));
    }

    #[test]
    fn later_field_wins_and_presence_is_kept() {
        let msg = [0x0a, 0x01, b'a', 0x0a, 0x01, b'b', 0x20, 0x00];
        let f = decode_append_request(&msg, |_| {}).unwrap();
        assert_eq!(f.stream_id.get(&msg), b"b");
        assert_eq!(f.expected_version, Some(0));
        let f = decode_append_request(&[], |_| {}).unwrap();
        assert_eq!(f.expected_version, None);
        assert_eq!(f.event_count, 0);
    }
}
