//! The inbound half of an HTTP/2 server connection (RFC 9113): the client's connection
//! preface, frames cut from the byte stream, header blocks joined across CONTINUATION frames
//! and decoded with HPACK ([`crate::hpack`]), and a gRPC request's header list checked against
//! HTTP/2's rules for a well-formed request (§8.2, §8.3).
//!
//! What each frame means for the connection's state — streams, flow-control windows,
//! settings — is the caller's: this layer only checks what a frame can be checked for on its
//! own (its size, its stream id being zero or not, its padding) and the order of frames that
//! HPACK makes a matter of the connection as a whole (a header block is not interrupted, and is
//! decoded even for a stream that is refused, so the decoder stays in step with the client's
//! encoder).

use crate::hpack::{Decoder, HpackErrorKind};

/// What a client sends first (§3.4).
pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

pub const DATA: u8 = 0x0;
pub const HEADERS: u8 = 0x1;
pub const PRIORITY: u8 = 0x2;
pub const RST_STREAM: u8 = 0x3;
pub const SETTINGS: u8 = 0x4;
pub const PUSH_PROMISE: u8 = 0x5;
pub const PING: u8 = 0x6;
pub const GOAWAY: u8 = 0x7;
pub const WINDOW_UPDATE: u8 = 0x8;
pub const CONTINUATION: u8 = 0x9;

const FLAG_END_STREAM: u8 = 0x1;
const FLAG_ACK: u8 = 0x1;
const FLAG_END_HEADERS: u8 = 0x4;
const FLAG_PADDED: u8 = 0x8;
const FLAG_PRIORITY: u8 = 0x20;

/// Error codes (§7) this layer raises.
pub const PROTOCOL_ERROR: u32 = 0x1;
pub const FRAME_SIZE_ERROR: u32 = 0x6;
pub const COMPRESSION_ERROR: u32 = 0x9;
pub const ENHANCE_YOUR_CALM: u32 = 0xb;

const FRAME_HEADER_LEN: usize = 9;

/// A connection error: the connection ends with GOAWAY carrying `code`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionError {
    pub code: u32,
    pub message: String,
}

impl ConnectionError {
    fn new(code: u32, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

/// One frame as the caller sees it. Slices borrow from the reader's input.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame<'a> {
    /// DATA without its padding; `flow_len` is what it counts against flow control (the whole
    /// frame payload).
    Data {
        stream_id: u32,
        end_stream: bool,
        data: &'a [u8],
        flow_len: u32,
    },
    /// A complete header block, decoded. `problem` says why the header list is not a
    /// well-formed request (or trailers: the caller knows which it expects and checks
    /// `has_pseudo` for the latter); `headers` is empty when the list was over the size limit.
    Headers {
        stream_id: u32,
        end_stream: bool,
        headers: Vec<(String, String)>,
        problem: Option<&'static str>,
        has_pseudo: bool,
    },
    /// Any other frame the caller acts on: RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE,
    /// checked for size and stream id.
    Control {
        kind: u8,
        stream_id: u32,
        flags: u8,
        payload: &'a [u8],
    },
}

/// A header block being received across HEADERS and CONTINUATION frames.
struct PendingBlock {
    stream_id: u32,
    end_stream: bool,
    block: Vec<u8>,
}

pub struct FrameReader {
    preface_seen: bool,
    /// Bytes of an incomplete frame (or preface) from earlier reads.
    buffer: Vec<u8>,
    pending: Option<PendingBlock>,
    decoder: Decoder,
    max_frame_size: usize,
    max_block_size: usize,
}

impl FrameReader {
    /// `max_frame_size` and `header_table_size` are what this side advertised
    /// (SETTINGS_MAX_FRAME_SIZE, SETTINGS_HEADER_TABLE_SIZE); a decoded header list over
    /// `max_header_list_size` makes a `Headers` frame with the problem "too large", and an
    /// encoded block over four times that ends the connection (ENHANCE_YOUR_CALM).
    pub fn new(
        max_frame_size: usize,
        header_table_size: usize,
        max_header_list_size: usize,
    ) -> Self {
        Self {
            preface_seen: false,
            buffer: Vec::new(),
            pending: None,
            decoder: Decoder::new(header_table_size, max_header_list_size),
            max_frame_size,
            max_block_size: max_header_list_size.saturating_mul(4),
        }
    }

    /// Cut `data` (and what was left over) into frames, handing each to `sink` in order. An
    /// error from `sink` stops the reading and is returned as is.
    pub fn feed<E, F>(&mut self, data: &[u8], mut sink: F) -> Result<(), E>
    where
        E: From<ConnectionError>,
        F: FnMut(Frame<'_>) -> Result<(), E>,
    {
        if self.buffer.is_empty() {
            let used = self.read_frames(data, &mut sink)?;
            self.buffer.extend_from_slice(&data[used..]);
        } else {
            let mut buffer = std::mem::take(&mut self.buffer);
            buffer.extend_from_slice(data);
            let used = self.read_frames(&buffer, &mut sink)?;
            buffer.drain(..used);
            self.buffer = buffer;
        }
        Ok(())
    }

    /// Frames from the start of `input`; returns how many bytes were complete frames.
    fn read_frames<E, F>(&mut self, input: &[u8], sink: &mut F) -> Result<usize, E>
    where
        E: From<ConnectionError>,
        F: FnMut(Frame<'_>) -> Result<(), E>,
    {
        let mut at = 0;
        if !self.preface_seen {
            let have = input.len().min(PREFACE.len());
            if input[..have] != PREFACE[..have] {
                return Err(ConnectionError::new(
                    PROTOCOL_ERROR,
                    "not an HTTP/2 connection preface",
                )
                .into());
            }
            if have < PREFACE.len() {
                return Ok(0);
            }
            self.preface_seen = true;
            at = PREFACE.len();
        }
        while let Some(header) = input.get(at..at + FRAME_HEADER_LEN) {
            let length =
                usize::from(header[0]) << 16 | usize::from(header[1]) << 8 | usize::from(header[2]);
            if length > self.max_frame_size {
                return Err(ConnectionError::new(
                    FRAME_SIZE_ERROR,
                    format!("a frame of {length} bytes, over SETTINGS_MAX_FRAME_SIZE"),
                )
                .into());
            }
            let Some(payload) = input.get(at + FRAME_HEADER_LEN..at + FRAME_HEADER_LEN + length)
            else {
                break;
            };
            let stream_id =
                u32::from_be_bytes([header[5], header[6], header[7], header[8]]) & 0x7fff_ffff;
            self.frame(header[3], header[4], stream_id, payload, sink)?;
            at += FRAME_HEADER_LEN + length;
        }
        Ok(at)
    }

    fn frame<E, F>(
        &mut self,
        kind: u8,
        flags: u8,
        stream_id: u32,
        payload: &[u8],
        sink: &mut F,
    ) -> Result<(), E>
    where
        E: From<ConnectionError>,
        F: FnMut(Frame<'_>) -> Result<(), E>,
    {
        if self.pending.is_some() && kind != CONTINUATION {
            return Err(protocol("a header block was interrupted by another frame").into());
        }
        let length = payload.len();
        match kind {
            DATA => {
                if stream_id == 0 {
                    return Err(protocol("DATA on stream 0").into());
                }
                let data = unpad(flags, payload)?;
                sink(Frame::Data {
                    stream_id,
                    end_stream: flags & FLAG_END_STREAM != 0,
                    data,
                    // At most SETTINGS_MAX_FRAME_SIZE, itself at most 2^24 - 1.
                    flow_len: u32::try_from(length).unwrap_or(u32::MAX),
                })
            }
            HEADERS => {
                if stream_id == 0 {
                    return Err(protocol("HEADERS on stream 0").into());
                }
                let mut fragment = unpad(flags, payload)?;
                if flags & FLAG_PRIORITY != 0 {
                    fragment = fragment
                        .get(5..)
                        .ok_or_else(|| protocol("HEADERS too short for its priority"))?;
                }
                let pending = PendingBlock {
                    stream_id,
                    end_stream: flags & FLAG_END_STREAM != 0,
                    block: fragment.to_vec(),
                };
                self.block_fragment(pending, flags, sink)
            }
            CONTINUATION => {
                let Some(mut pending) = self.pending.take() else {
                    return Err(protocol("CONTINUATION without a header block").into());
                };
                if pending.stream_id != stream_id {
                    return Err(protocol("CONTINUATION on another stream").into());
                }
                pending.block.extend_from_slice(payload);
                self.block_fragment(pending, flags, sink)
            }
            // Priorities are not used. One of the wrong size is a stream error (§6.3): it goes
            // up so that the connection resets that stream; one on stream 0 ends the connection.
            PRIORITY if length != 5 && stream_id != 0 => sink(Frame::Control {
                kind,
                stream_id,
                flags,
                payload,
            }),
            PRIORITY => check_control(kind, stream_id, flags, length).map_err(E::from),
            RST_STREAM | WINDOW_UPDATE | SETTINGS | PING | GOAWAY => {
                check_control(kind, stream_id, flags, length)?;
                sink(Frame::Control {
                    kind,
                    stream_id,
                    flags,
                    payload,
                })
            }
            PUSH_PROMISE => Err(protocol("PUSH_PROMISE from a client").into()),
            // Unknown frame types are ignored (§5.5).
            _ => Ok(()),
        }
    }

    /// A header block that has grown by a fragment: decoded if END_HEADERS ends it, kept
    /// for the CONTINUATION frames otherwise.
    fn block_fragment<E, F>(
        &mut self,
        pending: PendingBlock,
        flags: u8,
        sink: &mut F,
    ) -> Result<(), E>
    where
        E: From<ConnectionError>,
        F: FnMut(Frame<'_>) -> Result<(), E>,
    {
        if pending.block.len() > self.max_block_size {
            return Err(ConnectionError::new(
                ENHANCE_YOUR_CALM,
                format!("a header block over {} bytes", self.max_block_size),
            )
            .into());
        }
        if flags & FLAG_END_HEADERS != 0 {
            self.headers(&pending, sink)
        } else {
            self.pending = Some(pending);
            Ok(())
        }
    }

    fn headers<E, F>(&mut self, pending: &PendingBlock, sink: &mut F) -> Result<(), E>
    where
        E: From<ConnectionError>,
        F: FnMut(Frame<'_>) -> Result<(), E>,
    {
        let mut raw = Vec::new();
        let (headers, problem, has_pseudo) = match self.decoder.decode(&pending.block, &mut raw) {
            Ok(()) => check_request(raw),
            Err(e) if e.kind == HpackErrorKind::TooLarge => (
                Vec::new(),
                Some("the header list is over SETTINGS_MAX_HEADER_LIST_SIZE"),
                false,
            ),
            Err(e) => return Err(ConnectionError::new(COMPRESSION_ERROR, e.message).into()),
        };
        sink(Frame::Headers {
            stream_id: pending.stream_id,
            end_stream: pending.end_stream,
            headers,
            problem,
            has_pseudo,
        })
    }
}

/// The size and stream id of a frame that is not DATA, HEADERS or CONTINUATION (§6).
fn check_control(
    kind: u8,
    stream_id: u32,
    flags: u8,
    length: usize,
) -> Result<(), ConnectionError> {
    let (name, on_stream, size_ok) = match kind {
        PRIORITY => ("PRIORITY", true, length == 5),
        RST_STREAM => ("RST_STREAM", true, length == 4),
        // WINDOW_UPDATE is both: for the connection on stream 0, for a stream on its own.
        WINDOW_UPDATE => {
            return if length == 4 {
                Ok(())
            } else {
                Err(frame_size("WINDOW_UPDATE"))
            }
        }
        SETTINGS => (
            "SETTINGS",
            false,
            length.is_multiple_of(6) && (flags & FLAG_ACK == 0 || length == 0),
        ),
        PING => ("PING", false, length == 8),
        _ => ("GOAWAY", false, length >= 8),
    };
    if on_stream != (stream_id != 0) {
        let place = if on_stream {
            "on stream 0"
        } else {
            "on a stream"
        };
        return Err(ConnectionError::new(
            PROTOCOL_ERROR,
            format!("{name} {place}"),
        ));
    }
    if !size_ok {
        return Err(frame_size(name));
    }
    Ok(())
}

fn protocol(message: &str) -> ConnectionError {
    ConnectionError::new(PROTOCOL_ERROR, message)
}

fn frame_size(kind: &str) -> ConnectionError {
    ConnectionError::new(FRAME_SIZE_ERROR, format!("{kind} of the wrong size"))
}

/// A DATA or HEADERS payload without its padding (§6.1).
fn unpad(flags: u8, payload: &[u8]) -> Result<&[u8], ConnectionError> {
    if flags & FLAG_PADDED == 0 {
        return Ok(payload);
    }
    let Some((&pad, rest)) = payload.split_first() else {
        return Err(protocol("a padded frame without its pad length"));
    };
    let pad = usize::from(pad);
    if pad > rest.len() {
        return Err(protocol("padding longer than the frame"));
    }
    Ok(&rest[..rest.len() - pad])
}

const CONNECTION_SPECIFIC: [&[u8]; 5] = [
    b"connection",
    b"keep-alive",
    b"proxy-connection",
    b"transfer-encoding",
    b"upgrade",
];

/// The header list as text, and why it is not a well-formed request if it is not (§8.2, §8.3):
/// names in lowercase, no connection-specific fields, `te` only "trailers", pseudo-header
/// fields first, each at most once, only a request's, with `:method`, `:scheme` and a
/// non-empty `:path`. A list without pseudo-header fields is left for the caller to judge
/// (trailers have none); its problem is only about the fields themselves.
fn check_request(
    raw: Vec<(Vec<u8>, Vec<u8>)>,
) -> (Vec<(String, String)>, Option<&'static str>, bool) {
    let mut problem = None;
    let mut seen = [false; 4]; // :method, :scheme, :path, :authority
    let mut regular_seen = false;
    let mut has_pseudo = false;
    let mut headers = Vec::with_capacity(raw.len());
    for (name, value) in raw {
        if problem.is_none() {
            problem = check_field(&name, &value, &mut seen, &mut regular_seen, &mut has_pseudo);
        }
        match (String::from_utf8(name), String::from_utf8(value)) {
            (Ok(name), Ok(value)) => headers.push((name, value)),
            _ => {
                problem.get_or_insert("a header field that is not UTF-8");
            }
        }
    }
    if has_pseudo && problem.is_none() && !(seen[0] && seen[1] && seen[2]) {
        problem = Some("a request without :method, :scheme or :path");
    }
    (headers, problem, has_pseudo)
}

fn check_field(
    name: &[u8],
    value: &[u8],
    seen: &mut [bool; 4],
    regular_seen: &mut bool,
    has_pseudo: &mut bool,
) -> Option<&'static str> {
    if name.is_empty() {
        return Some("an empty header name");
    }
    if name.iter().any(u8::is_ascii_uppercase) {
        return Some("an uppercase header name");
    }
    // §8.2.1: no controls, spaces or non-ASCII in names (past a pseudo-header's colon), and
    // values without NUL, CR or LF, not starting or ending with a space or tab.
    let bare = name.strip_prefix(b":").unwrap_or(name);
    if bare.iter().any(|&b| b <= 0x20 || b >= 0x7f || b == b':') {
        return Some("a header name with a character not allowed in it");
    }
    if value.iter().any(|&b| matches!(b, 0 | b'\r' | b'\n'))
        || value.first().is_some_and(|&b| b == b' ' || b == b'\t')
        || value.last().is_some_and(|&b| b == b' ' || b == b'\t')
    {
        return Some("a header value with NUL, CR, LF or surrounding whitespace");
    }
    if let Some(pseudo) = name.strip_prefix(b":") {
        *has_pseudo = true;
        if *regular_seen {
            return Some("a pseudo-header field after a regular one");
        }
        let slot = match pseudo {
            b"method" => 0,
            b"scheme" => 1,
            b"path" => 2,
            b"authority" => 3,
            _ => return Some("a pseudo-header field that is not a request's"),
        };
        if seen[slot] {
            return Some("a pseudo-header field given twice");
        }
        seen[slot] = true;
        if slot == 2 && value.is_empty() {
            return Some("an empty :path");
        }
        return None;
    }
    *regular_seen = true;
    if CONNECTION_SPECIFIC.contains(&name) {
        return Some("a connection-specific header field");
    }
    if name == b"te" && value != b"trailers" {
        return Some("te other than \"trailers\"");
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, flags: u8, stream_id: u32, payload: &[u8]) -> Vec<u8> {
        let len = u32::try_from(payload.len()).unwrap();
        let mut out = len.to_be_bytes()[1..].to_vec();
        out.push(kind);
        out.push(flags);
        out.extend_from_slice(&stream_id.to_be_bytes());
        out.extend_from_slice(payload);
        out
    }

    /// A header block of literals without indexing, not Huffman-coded.
    fn block(headers: &[(&str, &str)]) -> Vec<u8> {
        let mut out = Vec::new();
        for (name, value) in headers {
            out.push(0);
            out.push(u8::try_from(name.len()).unwrap());
            out.extend_from_slice(name.as_bytes());
            out.push(u8::try_from(value.len()).unwrap());
            out.extend_from_slice(value.as_bytes());
        }
        out
    }

    const REQUEST: [(&str, &str); 5] = [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", "/s/M"),
        ("te", "trailers"),
        ("content-type", "application/grpc"),
    ];

    #[derive(Debug, PartialEq)]
    enum Seen {
        Data(u32, bool, Vec<u8>, u32),
        Headers(u32, bool, Vec<(String, String)>, Option<&'static str>),
        Control(u8, u32, u8, Vec<u8>),
    }

    fn read(reader: &mut FrameReader, input: &[u8]) -> Result<Vec<Seen>, ConnectionError> {
        let mut seen = Vec::new();
        reader.feed(input, |f: Frame<'_>| {
            seen.push(match f {
                Frame::Data {
                    stream_id,
                    end_stream,
                    data,
                    flow_len,
                } => Seen::Data(stream_id, end_stream, data.to_vec(), flow_len),
                Frame::Headers {
                    stream_id,
                    end_stream,
                    headers,
                    problem,
                    ..
                } => Seen::Headers(stream_id, end_stream, headers, problem),
                Frame::Control {
                    kind,
                    stream_id,
                    flags,
                    payload,
                } => Seen::Control(kind, stream_id, flags, payload.to_vec()),
            });
            Ok::<(), ConnectionError>(())
        })?;
        Ok(seen)
    }

    fn reader() -> FrameReader {
        let mut r = FrameReader::new(16384, 4096, 8192);
        assert_eq!(read(&mut r, PREFACE).unwrap(), vec![]);
        r
    }

    fn owned(headers: &[(&str, &str)]) -> Vec<(String, String)> {
        headers
            .iter()
            .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn a_request_in_one_read() {
        let mut r = FrameReader::new(16384, 4096, 8192);
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, FLAG_END_HEADERS, 1, &block(&REQUEST)));
        input.extend(frame(DATA, FLAG_END_STREAM, 1, b"hello"));
        let seen = read(&mut r, &input).unwrap();
        assert_eq!(
            seen,
            vec![
                Seen::Headers(1, false, owned(&REQUEST), None),
                Seen::Data(1, true, b"hello".to_vec(), 5)
            ]
        );
    }

    #[test]
    fn frames_split_anywhere_are_joined() {
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, FLAG_END_HEADERS, 1, &block(&REQUEST)));
        input.extend(frame(DATA, FLAG_PADDED | FLAG_END_STREAM, 1, b"\x02ab\0\0"));
        input.extend(frame(PING, 0, 0, b"12345678"));
        for cut in 0..input.len() {
            let mut r = FrameReader::new(16384, 4096, 8192);
            let mut seen = read(&mut r, &input[..cut]).unwrap();
            seen.extend(read(&mut r, &input[cut..]).unwrap());
            assert_eq!(
                seen,
                vec![
                    Seen::Headers(1, false, owned(&REQUEST), None),
                    Seen::Data(1, true, b"ab".to_vec(), 5),
                    Seen::Control(PING, 0, 0, b"12345678".to_vec()),
                ],
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn continuation_frames_complete_a_block() {
        let mut r = reader();
        let b = block(&REQUEST);
        let (first, rest) = b.split_at(7);
        let mut input = frame(
            HEADERS,
            FLAG_PRIORITY | FLAG_END_STREAM,
            3,
            &[&[0, 0, 0, 1, 9][..], first].concat(),
        );
        input.extend(frame(CONTINUATION, FLAG_END_HEADERS, 3, rest));
        assert_eq!(
            read(&mut r, &input).unwrap(),
            vec![Seen::Headers(3, true, owned(&REQUEST), None)]
        );
    }

    #[test]
    fn an_interrupted_block_ends_the_connection() {
        let mut r = reader();
        let mut input = frame(HEADERS, 0, 1, &block(&REQUEST));
        input.extend(frame(PING, 0, 0, b"12345678"));
        assert_eq!(read(&mut r, &input).unwrap_err().code, PROTOCOL_ERROR);
        let mut r = reader();
        let mut input = frame(HEADERS, 0, 1, &block(&REQUEST));
        input.extend(frame(CONTINUATION, FLAG_END_HEADERS, 3, b""));
        assert_eq!(read(&mut r, &input).unwrap_err().code, PROTOCOL_ERROR);
        let mut r = reader();
        assert_eq!(
            read(&mut r, &frame(CONTINUATION, FLAG_END_HEADERS, 1, b""))
                .unwrap_err()
                .code,
            PROTOCOL_ERROR
        );
    }

    #[test]
    fn bad_frames_are_connection_errors() {
        let cases: [(Vec<u8>, u32); 12] = [
            (frame(DATA, 0, 0, b"x"), PROTOCOL_ERROR),
            (frame(HEADERS, FLAG_END_HEADERS, 0, b""), PROTOCOL_ERROR),
            (frame(DATA, FLAG_PADDED, 1, b"\x05ab"), PROTOCOL_ERROR),
            (frame(DATA, FLAG_PADDED, 1, b""), PROTOCOL_ERROR),
            (
                frame(HEADERS, FLAG_PRIORITY | FLAG_END_HEADERS, 1, b"\0\0"),
                PROTOCOL_ERROR,
            ),
            (frame(PING, 0, 0, b"1234"), FRAME_SIZE_ERROR),
            (frame(PING, 0, 1, b"12345678"), PROTOCOL_ERROR),
            (frame(SETTINGS, 0, 0, b"12345"), FRAME_SIZE_ERROR),
            (frame(SETTINGS, FLAG_ACK, 0, b"123456"), FRAME_SIZE_ERROR),
            (frame(WINDOW_UPDATE, 0, 0, b"123"), FRAME_SIZE_ERROR),
            (frame(RST_STREAM, 0, 0, b"1234"), PROTOCOL_ERROR),
            (
                frame(PUSH_PROMISE, FLAG_END_HEADERS, 1, b"\0\0\0\x02"),
                PROTOCOL_ERROR,
            ),
        ];
        for (input, code) in cases {
            let mut r = reader();
            assert_eq!(read(&mut r, &input).unwrap_err().code, code, "{input:?}");
        }
        let mut r = reader();
        assert_eq!(
            read(&mut r, &frame(DATA, 0, 1, &vec![0; 16385]))
                .unwrap_err()
                .code,
            FRAME_SIZE_ERROR
        );
        let mut r = FrameReader::new(16384, 4096, 8192);
        assert_eq!(
            read(&mut r, b"GET / HTTP/1.1\r\n").unwrap_err().code,
            PROTOCOL_ERROR
        );
        let mut r = reader();
        assert_eq!(
            read(&mut r, &frame(HEADERS, FLAG_END_HEADERS, 1, b"\x80"))
                .unwrap_err()
                .code,
            COMPRESSION_ERROR
        );
    }

    #[test]
    fn unknown_frames_and_priority_are_skipped() {
        let mut r = reader();
        let mut input = frame(0x42, 0xff, 7, b"whatever");
        input.extend(frame(PRIORITY, 0, 1, &[0, 0, 0, 0, 1]));
        assert_eq!(read(&mut r, &input).unwrap(), vec![]);
    }

    #[test]
    fn a_priority_of_the_wrong_size_is_the_streams_error_not_the_connections() {
        let mut r = reader();
        let seen = read(&mut r, &frame(PRIORITY, 0, 3, &[0, 0, 0, 1])).unwrap();
        assert_eq!(seen, vec![Seen::Control(PRIORITY, 3, 0, vec![0, 0, 0, 1])]);
        let err = read(&mut reader(), &frame(PRIORITY, 0, 0, &[0, 0, 0, 0, 1])).unwrap_err();
        assert_eq!(err.code, PROTOCOL_ERROR);
    }

    #[test]
    fn malformed_requests_are_reported_not_fatal() {
        let cases: [(&[(&str, &str)], &str); 11] = [
            (
                &[(":method", "POST"), ("x y", "1")],
                "a header name with a character not allowed in it",
            ),
            (
                &[(":method", "POST"), ("x", "a\r\nb")],
                "a header value with NUL, CR, LF or surrounding whitespace",
            ),
            (
                &[(":method", "POST"), ("x", " a")],
                "a header value with NUL, CR, LF or surrounding whitespace",
            ),
            (
                &[(":method", "POST"), (":Path", "/a/b")],
                "an uppercase header name",
            ),
            (
                &[
                    (":method", "POST"),
                    (":scheme", "http"),
                    ("te", "trailers"),
                    (":path", "/a/b"),
                ],
                "a pseudo-header field after a regular one",
            ),
            (
                &[(":method", "POST"), (":status", "200")],
                "a pseudo-header field that is not a request's",
            ),
            (
                &[(":method", "POST"), (":method", "POST")],
                "a pseudo-header field given twice",
            ),
            (
                &[(":method", "POST"), (":scheme", "http"), (":path", "")],
                "an empty :path",
            ),
            (
                &[
                    (":method", "POST"),
                    (":scheme", "http"),
                    (":path", "/a/b"),
                    ("connection", "close"),
                ],
                "a connection-specific header field",
            ),
            (
                &[
                    (":method", "POST"),
                    (":scheme", "http"),
                    (":path", "/a/b"),
                    ("te", "gzip"),
                ],
                "te other than \"trailers\"",
            ),
            (
                &[(":method", "POST"), (":scheme", "http")],
                "a request without :method, :scheme or :path",
            ),
        ];
        for (headers, problem) in cases {
            let mut r = reader();
            let seen = read(
                &mut r,
                &frame(HEADERS, FLAG_END_HEADERS, 1, &block(headers)),
            )
            .unwrap();
            assert_eq!(
                seen,
                vec![Seen::Headers(1, false, owned(headers), Some(problem))]
            );
        }
    }

    #[test]
    fn trailers_pass_and_text_that_is_not_utf8_is_reported() {
        // Trailers: no pseudo-header fields, no problem.
        let mut r = reader();
        let seen = read(
            &mut r,
            &frame(
                HEADERS,
                FLAG_END_HEADERS | FLAG_END_STREAM,
                1,
                &block(&[("x", "y")]),
            ),
        )
        .unwrap();
        assert_eq!(
            seen,
            vec![Seen::Headers(1, true, owned(&[("x", "y")]), None)]
        );
        // Not UTF-8.
        let mut r = reader();
        let seen = read(
            &mut r,
            &frame(HEADERS, FLAG_END_HEADERS, 1, b"\0\x01x\x01\xff"),
        )
        .unwrap();
        assert_eq!(
            seen,
            vec![Seen::Headers(
                1,
                false,
                vec![],
                Some("a header field that is not UTF-8")
            )]
        );
    }

    #[test]
    fn header_lists_over_the_limit_are_reported_and_blocks_over_it_end_the_connection() {
        let big = "v".repeat(100);
        let mut r = FrameReader::new(16384, 4096, 120);
        read(&mut r, PREFACE).unwrap();
        let seen = read(
            &mut r,
            &frame(HEADERS, FLAG_END_HEADERS, 1, &block(&[("a", &big)])),
        )
        .unwrap();
        assert_eq!(
            seen,
            vec![Seen::Headers(
                1,
                false,
                vec![],
                Some("the header list is over SETTINGS_MAX_HEADER_LIST_SIZE")
            )]
        );
        let huge = "v".repeat(500);
        let mut r = FrameReader::new(16384, 4096, 120);
        read(&mut r, PREFACE).unwrap();
        let input = frame(
            HEADERS,
            0,
            1,
            &block(&[("a", &huge[..250]), ("b", &huge[..250])]),
        );
        assert_eq!(read(&mut r, &input).unwrap_err().code, ENHANCE_YOUR_CALM);
    }
}
