//! HPACK (RFC 7541) header-block decoding for the HTTP/2 server.
//!
//! A [`Decoder`] belongs to one connection: its dynamic table mirrors the one the peer's
//! encoder keeps, so every header block of the connection must go through it, in order —
//! including blocks whose header lists are then rejected. Decoding is strict: whatever RFC
//! 7541 calls a decoding error is a [`HpackErrorKind::Compression`] error, which RFC 7540
//! §4.3 makes a connection error of type COMPRESSION_ERROR.
//!
//! Huffman-coded strings (Appendix B) are decoded a code at a time, not a bit at a time:
//! the next 11 bits index a table that holds every code up to 11 bits long (all of printable
//! ASCII but a few punctuation marks), and a binary search over the longer codes does the
//! rest. Both tables are built at compile time from the RFC's code table.

use std::borrow::Cow;
use std::collections::VecDeque;
use std::fmt;

#[path = "hpack_huffman.rs"]
mod huffman;

use huffman::CODES;

/// Why a header block was rejected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HpackErrorKind {
    /// The block is not valid HPACK: the decoder can no longer follow the peer's encoder, so
    /// the connection is lost (COMPRESSION_ERROR).
    Compression,
    /// The block was decoded, and the dynamic table is in sync, but its header list is larger
    /// than `max_list_size`: only the stream needs to be refused.
    TooLarge,
}

/// A rejected header block; `message` says what was wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HpackError {
    pub kind: HpackErrorKind,
    pub message: String,
}

impl HpackError {
    fn compression(message: impl Into<String>) -> Self {
        Self {
            kind: HpackErrorKind::Compression,
            message: message.into(),
        }
    }
}

impl fmt::Display for HpackError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "HPACK: {}", self.message)
    }
}

/// A header field as the server sees it: name and value, raw bytes.
type Field = (Vec<u8>, Vec<u8>);

/// Decodes the header blocks of one connection.
pub struct Decoder {
    table: DynamicTable,
    /// The SETTINGS_HEADER_TABLE_SIZE this side advertised: no size update may go above it.
    max_table_size: usize,
    /// The largest header list accepted (SETTINGS_MAX_HEADER_LIST_SIZE's measure).
    max_list_size: usize,
}

impl Decoder {
    /// `max_table_size`: the SETTINGS_HEADER_TABLE_SIZE this side advertised (4096 by
    /// default), which is also the dynamic table's size until the peer's encoder changes it.
    /// `max_list_size`: the largest decoded header list accepted, measured as RFC 7540 §6.5.2
    /// does (the sum over fields of name length + value length + 32).
    pub fn new(max_table_size: usize, max_list_size: usize) -> Self {
        Self {
            table: DynamicTable {
                entries: VecDeque::new(),
                size: 0,
                capacity: max_table_size,
            },
            max_table_size,
            max_list_size,
        }
    }

    /// Decodes one complete header block (a HEADERS payload and its CONTINUATIONs, joined),
    /// appending its fields in order to `out`.
    ///
    /// On error, `out` is left as it was. A list over `max_list_size` is still decoded to the
    /// end, so the dynamic table stays in sync with the peer, before [`HpackErrorKind::TooLarge`]
    /// is returned; its fields are dropped as soon as the limit is passed.
    pub fn decode(
        &mut self,
        block: &[u8],
        out: &mut Vec<(Vec<u8>, Vec<u8>)>,
    ) -> Result<(), HpackError> {
        let start = out.len();
        let result = self.decode_block(block, out, start);
        if result.is_err() {
            out.truncate(start);
        }
        result
    }

    fn decode_block(
        &mut self,
        block: &[u8],
        out: &mut Vec<Field>,
        start: usize,
    ) -> Result<(), HpackError> {
        let mut input = block;
        let mut list_size = 0_usize;
        let mut at_start = true;
        while let Some((&first, rest)) = input.split_first() {
            input = rest;
            let (name, value) = match first {
                // Indexed field (§6.1).
                0x80..=0xff => {
                    let (name, value) = self.table.field(read_int(&mut input, first, 0x7f)?)?;
                    (Cow::Borrowed(name), Cow::Borrowed(value))
                }
                // Literal with incremental indexing (§6.2.1). The name is copied out before
                // the insertion, which may evict the entry it was taken from (§4.4).
                0x40..=0x7f => {
                    let (name, value) = self.table.read_literal(&mut input, first, 0x3f)?;
                    let name = name.into_owned();
                    self.table.insert(&name, &value);
                    (Cow::Owned(name), Cow::Owned(value))
                }
                // Dynamic table size update (§6.3); only before the first field (§4.2).
                0x20..=0x3f => {
                    if !at_start {
                        return Err(HpackError::compression(
                            "dynamic table size update after a header field",
                        ));
                    }
                    let size = read_int(&mut input, first, 0x1f)?;
                    if size > self.max_table_size {
                        return Err(HpackError::compression(format!(
                            "dynamic table size update to {size}, above the {} advertised",
                            self.max_table_size
                        )));
                    }
                    self.table.set_capacity(size);
                    continue;
                }
                // Literal without indexing (0000xxxx, §6.2.2) or never indexed (0001xxxx,
                // §6.2.3): the same thing to a decoder that does not forward fields.
                0x00..=0x1f => {
                    let (name, value) = self.table.read_literal(&mut input, first, 0x0f)?;
                    (name, Cow::Owned(value))
                }
            };
            at_start = false;
            list_size = list_size.saturating_add(entry_size(&name, &value));
            if list_size <= self.max_list_size {
                out.push((name.into_owned(), value.into_owned()));
            } else {
                out.truncate(start);
            }
        }
        if list_size > self.max_list_size {
            return Err(HpackError {
                kind: HpackErrorKind::TooLarge,
                message: format!(
                    "header list of {list_size} bytes, above the limit of {}",
                    self.max_list_size
                ),
            });
        }
        Ok(())
    }
}

/// Per-entry overhead counted in table sizes (§4.1) and header list sizes (RFC 7540 §6.5.2).
const ENTRY_OVERHEAD: usize = 32;

fn entry_size(name: &[u8], value: &[u8]) -> usize {
    name.len()
        .saturating_add(value.len())
        .saturating_add(ENTRY_OVERHEAD)
}

/// A dynamic table entry: name and value, boxed to the exact size.
type Entry = (Box<[u8]>, Box<[u8]>);

/// The dynamic table (§2.3.2), with the static table in front of it for indexing (§2.3.3).
struct DynamicTable {
    /// Newest first, as indexes count them.
    entries: VecDeque<Entry>,
    /// The sum of the entries' sizes.
    size: usize,
    /// The maximum size, as the peer's encoder last set it.
    capacity: usize,
}

impl DynamicTable {
    /// The field at `index` of the combined index space: 1-61 static, 62 on dynamic.
    fn field(&self, index: usize) -> Result<(&[u8], &[u8]), HpackError> {
        if let Some(&(name, value)) = index.checked_sub(1).and_then(|i| STATIC_TABLE.get(i)) {
            return Ok((name, value));
        }
        index
            .checked_sub(STATIC_TABLE.len() + 1)
            .and_then(|i| self.entries.get(i))
            .map(|(name, value)| (&**name, &**value))
            .ok_or_else(|| {
                HpackError::compression(format!(
                    "index {index} is not in the tables (dynamic entries: {})",
                    self.entries.len()
                ))
            })
    }

    /// Reads the rest of a literal field (§6.2) whose first byte is `first`: its name, as an
    /// index (with a prefix of `mask`'s bits) or, at index 0, a string; then its value.
    fn read_literal(
        &self,
        input: &mut &[u8],
        first: u8,
        mask: u8,
    ) -> Result<(Cow<'_, [u8]>, Vec<u8>), HpackError> {
        let name = match read_int(input, first, mask)? {
            0 => Cow::Owned(read_string(input)?),
            index => Cow::Borrowed(self.field(index)?.0),
        };
        Ok((name, read_string(input)?))
    }

    /// Adds an entry, evicting the oldest ones to make room (§4.4); an entry larger than the
    /// whole table empties it and is not added.
    fn insert(&mut self, name: &[u8], value: &[u8]) {
        let size = entry_size(name, value);
        if size > self.capacity {
            self.entries.clear();
            self.size = 0;
            return;
        }
        self.evict_to(self.capacity - size);
        self.entries.push_front((name.into(), value.into()));
        self.size += size;
    }

    /// Applies a size update (§4.3): eviction down to the new size.
    fn set_capacity(&mut self, capacity: usize) {
        self.capacity = capacity;
        self.evict_to(capacity);
    }

    fn evict_to(&mut self, limit: usize) {
        while self.size > limit {
            let Some((name, value)) = self.entries.pop_back() else {
                break;
            };
            self.size -= entry_size(&name, &value);
        }
    }
}

/// Reads an integer (§5.1) with an N-bit prefix: `first` is the byte holding the prefix and
/// `mask` its N low bits set. Values must fit in a u32, in at most 5 continuation bytes.
fn read_int(input: &mut &[u8], first: u8, mask: u8) -> Result<usize, HpackError> {
    let prefix = first & mask;
    if prefix < mask {
        return Ok(usize::from(prefix));
    }
    let mut value = u64::from(mask);
    for shift in [0, 7, 14, 21, 28] {
        let (&byte, rest) = input
            .split_first()
            .ok_or_else(|| HpackError::compression("truncated integer"))?;
        *input = rest;
        value += u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return u32::try_from(value)
                .ok()
                .and_then(|value| usize::try_from(value).ok())
                .ok_or_else(|| HpackError::compression(format!("integer {value} too large")));
        }
    }
    Err(HpackError::compression(
        "integer with more than 5 continuation bytes",
    ))
}

/// Reads a string literal (§5.2), Huffman-decoding it if its H bit is set.
fn read_string(input: &mut &[u8]) -> Result<Vec<u8>, HpackError> {
    let (&first, rest) = input
        .split_first()
        .ok_or_else(|| HpackError::compression("truncated header field"))?;
    *input = rest;
    let len = read_int(input, first, 0x7f)?;
    let (raw, rest) = input.split_at_checked(len).ok_or_else(|| {
        HpackError::compression(format!(
            "string of {len} bytes, only {} left in the block",
            input.len()
        ))
    })?;
    *input = rest;
    if first & 0x80 == 0 {
        Ok(raw.to_vec())
    } else {
        decode_huffman(raw)
    }
}

/// The longest code (EOS's): while input lasts, at least this many bits are kept ready.
const MAX_CODE_BITS: u32 = 30;

/// Bits looked up at once in [`FAST`].
const FAST_BITS: u32 = 11;

/// Indexed by the next [`FAST_BITS`] bits of input: `bit length << 9 | symbol` of the code
/// they begin with, or 0 where they begin a code longer than that (see [`LONG`]).
static FAST: [u16; 1 << FAST_BITS] = fast_table();

/// How many codes are longer than [`FAST_BITS`].
const LONG_CODES: usize = long_code_count();

/// The codes longer than [`FAST_BITS`] as (code left-aligned in 32 bits, bit length, symbol),
/// in increasing order of code: the one a 32-bit window begins with is the last one not above
/// the window (the codes' ranges of windows are disjoint and, the code being complete, cover
/// every window).
static LONG: [(u32, u32, u16); LONG_CODES] = long_table();

// The `as` casts of the table builders are not truncations: symbols are below 257 and code
// lengths at most 30 (`From` is not usable in const fns).
#[allow(clippy::cast_possible_truncation)]
const fn fast_table() -> [u16; 1 << FAST_BITS] {
    let mut table = [0; 1 << FAST_BITS];
    let mut symbol = 0;
    while symbol < CODES.len() {
        let (code, len) = CODES[symbol];
        if len <= FAST_BITS {
            let first = (code << (FAST_BITS - len)) as usize;
            let mut i = 0;
            while i < 1 << (FAST_BITS - len) {
                table[first + i] = (len << 9 | symbol as u32) as u16;
                i += 1;
            }
        }
        symbol += 1;
    }
    table
}

const fn long_code_count() -> usize {
    let mut count = 0;
    let mut symbol = 0;
    while symbol < CODES.len() {
        if CODES[symbol].1 > FAST_BITS {
            count += 1;
        }
        symbol += 1;
    }
    count
}

#[allow(clippy::cast_possible_truncation)]
const fn long_table() -> [(u32, u32, u16); LONG_CODES] {
    let mut table = [(0, 0, 0); LONG_CODES];
    let mut filled = 0;
    let mut symbol = 0;
    while symbol < CODES.len() {
        let (code, len) = CODES[symbol];
        if len > FAST_BITS {
            // Insertion sort: symbol order is not code order.
            let key = code << (32 - len);
            let mut i = filled;
            while i > 0 && table[i - 1].0 > key {
                table[i] = table[i - 1];
                i -= 1;
            }
            table[i] = (key, len, symbol as u16);
            filled += 1;
        }
        symbol += 1;
    }
    table
}

/// The symbol and bit length of the long code that `bits` (left-aligned) begins with.
fn long_code(bits: u64) -> Option<(u16, u32)> {
    let window = (bits >> 32) as u32;
    let after = LONG.partition_point(|&(code, _, _)| code <= window);
    let &(_, len, symbol) = LONG.get(after.checked_sub(1)?)?;
    Some((symbol, len))
}

/// Decodes a Huffman-coded string (§5.2, Appendix B). It must end with fewer than 8 bits of
/// padding, all ones (the start of EOS), and must not contain EOS.
fn decode_huffman(src: &[u8]) -> Result<Vec<u8>, HpackError> {
    // No code is shorter than 5 bits: at most 8 symbols per 5 bytes.
    let mut out = Vec::with_capacity(src.len() / 5 * 8 + 7);
    // The unread bits, left-aligned in `bits` (the bits below them are zero), `count` of them.
    let mut bits = 0_u64;
    let mut count = 0_u32;
    let mut rest = src;
    loop {
        if count < MAX_CODE_BITS {
            while count <= 56 {
                let Some((&byte, tail)) = rest.split_first() else {
                    break;
                };
                bits |= u64::from(byte) << (56 - count);
                count += 8;
                rest = tail;
            }
            if count == 0 {
                return Ok(out);
            }
        }
        let entry = FAST[(bits >> (64 - FAST_BITS)) as usize];
        let (symbol, len) = if entry == 0 {
            long_code(bits).ok_or_else(|| HpackError::compression("invalid Huffman code"))?
        } else {
            (entry & 0x1ff, u32::from(entry >> 9))
        };
        if len > count {
            // The input ends inside a code: what is left must be padding.
            if count < 8 && bits == u64::MAX << (64 - count) {
                return Ok(out);
            }
            return Err(HpackError::compression(format!(
                "invalid Huffman padding ({count} bits left)"
            )));
        }
        let Ok(byte) = u8::try_from(symbol) else {
            return Err(HpackError::compression("EOS in a Huffman-coded string"));
        };
        out.push(byte);
        bits <<= len;
        count -= len;
    }
}

/// The static table (Appendix A), index 1 first.
static STATIC_TABLE: [(&[u8], &[u8]); 61] = [
    (b":authority", b""),
    (b":method", b"GET"),
    (b":method", b"POST"),
    (b":path", b"/"),
    (b":path", b"/index.html"),
    (b":scheme", b"http"),
    (b":scheme", b"https"),
    (b":status", b"200"),
    (b":status", b"204"),
    (b":status", b"206"),
    (b":status", b"304"),
    (b":status", b"400"),
    (b":status", b"404"),
    (b":status", b"500"),
    (b"accept-charset", b""),
    (b"accept-encoding", b"gzip, deflate"),
    (b"accept-language", b""),
    (b"accept-ranges", b""),
    (b"accept", b""),
    (b"access-control-allow-origin", b""),
    (b"age", b""),
    (b"allow", b""),
    (b"authorization", b""),
    (b"cache-control", b""),
    (b"content-disposition", b""),
    (b"content-encoding", b""),
    (b"content-language", b""),
    (b"content-length", b""),
    (b"content-location", b""),
    (b"content-range", b""),
    (b"content-type", b""),
    (b"cookie", b""),
    (b"date", b""),
    (b"etag", b""),
    (b"expect", b""),
    (b"expires", b""),
    (b"from", b""),
    (b"host", b""),
    (b"if-match", b""),
    (b"if-modified-since", b""),
    (b"if-none-match", b""),
    (b"if-range", b""),
    (b"if-unmodified-since", b""),
    (b"last-modified", b""),
    (b"link", b""),
    (b"location", b""),
    (b"max-forwards", b""),
    (b"proxy-authenticate", b""),
    (b"proxy-authorization", b""),
    (b"range", b""),
    (b"referer", b""),
    (b"refresh", b""),
    (b"retry-after", b""),
    (b"server", b""),
    (b"set-cookie", b""),
    (b"strict-transport-security", b""),
    (b"transfer-encoding", b""),
    (b"user-agent", b""),
    (b"vary", b""),
    (b"via", b""),
    (b"www-authenticate", b""),
];

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn hex(text: &str) -> Vec<u8> {
        let digits: Vec<u8> = text.bytes().filter(u8::is_ascii_hexdigit).collect();
        digits
            .chunks(2)
            .map(|pair| u8::from_str_radix(std::str::from_utf8(pair).unwrap(), 16).unwrap())
            .collect()
    }

    fn fields(pairs: &[(&str, &str)]) -> Vec<Field> {
        pairs
            .iter()
            .map(|(name, value)| (name.as_bytes().to_vec(), value.as_bytes().to_vec()))
            .collect()
    }

    /// Decodes `block` into a fresh list.
    fn decode(decoder: &mut Decoder, block: &[u8]) -> Result<Vec<Field>, HpackError> {
        let mut out = Vec::new();
        decoder.decode(block, &mut out).map(|()| out)
    }

    fn kind(result: Result<Vec<Field>, HpackError>) -> HpackErrorKind {
        result.expect_err("the block must be rejected").kind
    }

    /// Checks the dynamic table, newest entry first, and its size.
    fn assert_table(decoder: &Decoder, entries: &[(&str, &str)], size: usize) {
        let actual: Vec<Field> = decoder
            .table
            .entries
            .iter()
            .map(|(name, value)| (name.to_vec(), value.to_vec()))
            .collect();
        assert_eq!(actual, fields(entries));
        assert_eq!(decoder.table.size, size);
    }

    /// Test-only Huffman encoder, from the same code table, padding with ones.
    fn huffman_encode(text: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let (mut bits, mut count) = (0_u64, 0_u32);
        for &byte in text {
            let (code, len) = CODES[usize::from(byte)];
            bits = bits << len | u64::from(code);
            count += len;
            while count >= 8 {
                count -= 8;
                out.push(u8::try_from(bits >> count & 0xff).unwrap());
            }
        }
        if count > 0 {
            out.push(u8::try_from((bits << (8 - count) | 0xff >> count) & 0xff).unwrap());
        }
        out
    }

    /// A string literal (§5.2) of `text`, Huffman-coded or not, for lengths below 127.
    fn string(text: &[u8], huffman: bool) -> Vec<u8> {
        let body = if huffman {
            huffman_encode(text)
        } else {
            text.to_vec()
        };
        let len = u8::try_from(body.len()).unwrap();
        assert!(len < 0x7f);
        let mut out = vec![if huffman { 0x80 | len } else { len }];
        out.extend(body);
        out
    }

    // RFC 7541 Appendix C.2: one representation per block, each on a fresh decoder.

    #[test]
    fn c_2_1_literal_with_indexing() {
        let mut decoder = Decoder::new(4096, 65536);
        let block = hex("400a 6375 7374 6f6d 2d6b 6579 0d63 7573 746f 6d2d 6865 6164 6572");
        let out = decode(&mut decoder, &block).unwrap();
        assert_eq!(out, fields(&[("custom-key", "custom-header")]));
        assert_table(&decoder, &[("custom-key", "custom-header")], 55);
    }

    #[test]
    fn c_2_2_literal_without_indexing() {
        let mut decoder = Decoder::new(4096, 65536);
        let out = decode(&mut decoder, &hex("040c 2f73 616d 706c 652f 7061 7468")).unwrap();
        assert_eq!(out, fields(&[(":path", "/sample/path")]));
        assert_table(&decoder, &[], 0);
    }

    #[test]
    fn c_2_3_literal_never_indexed() {
        let mut decoder = Decoder::new(4096, 65536);
        let block = hex("1008 7061 7373 776f 7264 0673 6563 7265 74");
        let out = decode(&mut decoder, &block).unwrap();
        assert_eq!(out, fields(&[("password", "secret")]));
        assert_table(&decoder, &[], 0);
    }

    #[test]
    fn c_2_4_indexed() {
        let mut decoder = Decoder::new(4096, 65536);
        let out = decode(&mut decoder, &hex("82")).unwrap();
        assert_eq!(out, fields(&[(":method", "GET")]));
        assert_table(&decoder, &[], 0);
    }

    /// C.3 and C.4: the same three requests, without and with Huffman coding.
    fn requests(blocks: [&str; 3]) {
        let mut decoder = Decoder::new(4096, 65536);
        let out = decode(&mut decoder, &hex(blocks[0])).unwrap();
        let first = [
            (":method", "GET"),
            (":scheme", "http"),
            (":path", "/"),
            (":authority", "www.example.com"),
        ];
        assert_eq!(out, fields(&first));
        assert_table(&decoder, &[(":authority", "www.example.com")], 57);

        let out = decode(&mut decoder, &hex(blocks[1])).unwrap();
        let mut second = first.to_vec();
        second.push(("cache-control", "no-cache"));
        assert_eq!(out, fields(&second));
        let table = [
            ("cache-control", "no-cache"),
            (":authority", "www.example.com"),
        ];
        assert_table(&decoder, &table, 110);

        let out = decode(&mut decoder, &hex(blocks[2])).unwrap();
        let third = [
            (":method", "GET"),
            (":scheme", "https"),
            (":path", "/index.html"),
            (":authority", "www.example.com"),
            ("custom-key", "custom-value"),
        ];
        assert_eq!(out, fields(&third));
        let table = [
            ("custom-key", "custom-value"),
            ("cache-control", "no-cache"),
            (":authority", "www.example.com"),
        ];
        assert_table(&decoder, &table, 164);
    }

    #[test]
    fn c_3_requests_without_huffman() {
        requests([
            "8286 8441 0f77 7777 2e65 7861 6d70 6c65 2e63 6f6d",
            "8286 84be 5808 6e6f 2d63 6163 6865",
            "8287 85bf 400a 6375 7374 6f6d 2d6b 6579 0c63 7573 746f 6d2d 7661 6c75 65",
        ]);
    }

    #[test]
    fn c_4_requests_with_huffman() {
        requests([
            "8286 8441 8cf1 e3c2 e5f2 3a6b a0ab 90f4 ff",
            "8286 84be 5886 a8eb 1064 9cbf",
            "8287 85bf 4088 25a8 49e9 5ba9 7d7f 8925 a849 e95b b8e8 b4bf",
        ]);
    }

    /// C.5 and C.6: three responses through a 256-byte table, which evicts.
    fn responses(blocks: [&str; 3]) {
        let mut decoder = Decoder::new(256, 65536);
        let date1 = "Mon, 21 Oct 2013 20:13:21 GMT";
        let location = "https://www.example.com";
        let out = decode(&mut decoder, &hex(blocks[0])).unwrap();
        let first = [
            (":status", "302"),
            ("cache-control", "private"),
            ("date", date1),
            ("location", location),
        ];
        assert_eq!(out, fields(&first));
        let table = [
            ("location", location),
            ("date", date1),
            ("cache-control", "private"),
            (":status", "302"),
        ];
        assert_table(&decoder, &table, 222);

        let out = decode(&mut decoder, &hex(blocks[1])).unwrap();
        let mut second = first;
        second[0] = (":status", "307");
        assert_eq!(out, fields(&second));
        let table = [
            (":status", "307"),
            ("location", location),
            ("date", date1),
            ("cache-control", "private"),
        ];
        assert_table(&decoder, &table, 222);

        let out = decode(&mut decoder, &hex(blocks[2])).unwrap();
        let date2 = "Mon, 21 Oct 2013 20:13:22 GMT";
        let cookie = "foo=ASDJKHQKBZXOQWEOPIUAXQWEOIU; max-age=3600; version=1";
        let third = [
            (":status", "200"),
            ("cache-control", "private"),
            ("date", date2),
            ("location", location),
            ("content-encoding", "gzip"),
            ("set-cookie", cookie),
        ];
        assert_eq!(out, fields(&third));
        let table = [
            ("set-cookie", cookie),
            ("content-encoding", "gzip"),
            ("date", date2),
        ];
        assert_table(&decoder, &table, 215);
    }

    #[test]
    fn c_5_responses_without_huffman() {
        responses([
            "4803 3330 3258 0770 7269 7661 7465 611d 4d6f 6e2c 2032 3120 4f63 7420 3230 3133
             2032 303a 3133 3a32 3120 474d 546e 1768 7474 7073 3a2f 2f77 7777 2e65 7861 6d70
             6c65 2e63 6f6d",
            "4803 3330 37c1 c0bf",
            "88c1 611d 4d6f 6e2c 2032 3120 4f63 7420 3230 3133 2032 303a 3133 3a32 3220 474d
             54c0 5a04 677a 6970 7738 666f 6f3d 4153 444a 4b48 514b 425a 584f 5157 454f 5049
             5541 5851 5745 4f49 553b 206d 6178 2d61 6765 3d33 3630 303b 2076 6572 7369 6f6e
             3d31",
        ]);
    }

    #[test]
    fn c_6_responses_with_huffman() {
        responses([
            "4882 6402 5885 aec3 771a 4b61 96d0 7abe 9410 54d4 44a8 2005 9504 0b81 66e0 82a6
             2d1b ff6e 919d 29ad 1718 63c7 8f0b 97c8 e9ae 82ae 43d3",
            "4883 640e ffc1 c0bf",
            "88c1 6196 d07a be94 1054 d444 a820 0595 040b 8166 e084 a62d 1bff c05a 839b d9ab
             77ad 94e7 821d d7f2 e6c7 b335 dfdf cd5b 3960 d5af 2708 7f36 72c1 ab27 0fb5 291f
             9587 3160 65c0 03ed 4ee5 b106 3d50 07",
        ]);
    }

    #[test]
    fn every_byte_value_round_trips_through_huffman() {
        let all: Vec<u8> = (0..=255).collect();
        assert_eq!(decode_huffman(&huffman_encode(&all)).unwrap(), all);
    }

    #[test]
    fn the_last_static_entry_and_the_dynamic_ones_after_it() {
        let mut decoder = Decoder::new(4096, 65536);
        let mut block = vec![0x80 + 61, 0x40];
        block.extend(string(b"a", false));
        block.extend(string(b"b", true));
        block.extend([0x80 + 62, 0x40 + 62]);
        block.extend(string(b"c", false));
        let out = decode(&mut decoder, &block).unwrap();
        let expected = [("www-authenticate", ""), ("a", "b"), ("a", "b"), ("a", "c")];
        assert_eq!(out, fields(&expected));
        assert_table(&decoder, &[("a", "c"), ("a", "b")], 68);
    }

    #[test]
    fn appends_to_the_list_it_is_given() {
        let mut decoder = Decoder::new(4096, 65536);
        let mut out = fields(&[("x", "y")]);
        decoder.decode(&hex("82 84"), &mut out).unwrap();
        assert_eq!(
            out,
            fields(&[("x", "y"), (":method", "GET"), (":path", "/")])
        );
        decoder.decode(&[], &mut out).unwrap();
        assert_eq!(out.len(), 3);
    }

    #[test]
    fn rejects_indexes_outside_the_tables() {
        let mut decoder = Decoder::new(4096, 65536);
        let cases = [
            "80",                // index 0
            "be",                // 62, with the dynamic table empty
            "ff 00",             // 127
            "ff ff ff ff ff 07", // 2^31 + 126
            "7e 01 61",          // literal with indexing, name index 62
            "7f 00 01 61",       // the same, name index 63
            "0f 2f 01 61",       // literal without indexing, name index 62
            "1f 2f 01 61",       // never indexed, name index 62
        ];
        for block in cases {
            let result = decode(&mut decoder, &hex(block));
            assert_eq!(kind(result), HpackErrorKind::Compression, "{block}");
        }
    }

    #[test]
    fn integers_must_fit_in_u32_and_5_continuation_bytes() {
        let max = usize::try_from(u32::MAX).unwrap();
        let mut decoder = Decoder::new(max, usize::MAX);
        // 31 + 0xffff_ffe0 = u32::MAX: the largest integer accepted.
        decode(&mut decoder, &hex("3f e0 ff ff ff 0f")).unwrap();
        assert_eq!(decoder.table.capacity, max);
        // One more, and redundant zero continuations past the fifth byte.
        for block in [
            "3f e1 ff ff ff 0f",
            "3f 80 80 80 80 80 00",
            "3f ff ff ff ff ff 01",
        ] {
            assert_eq!(
                kind(decode(&mut decoder, &hex(block))),
                HpackErrorKind::Compression,
                "{block}"
            );
        }
        // Zero continuations within the five bytes are only redundant.
        decode(&mut decoder, &hex("3f 80 80 80 80 00")).unwrap();
        assert_eq!(decoder.table.capacity, 31);
    }

    #[test]
    fn rejects_truncated_input() {
        let mut decoder = Decoder::new(4096, 65536);
        let cases = [
            "ff",          // integer missing its continuation
            "ff 80",       // integer missing its last byte
            "40",          // literal missing its name
            "40 01 61",    // literal missing its value
            "40 05 61 62", // name longer than the block
            "00 01 61 7f", // value length missing its continuation
            "04 8a ff",    // Huffman-coded value longer than the block
        ];
        for block in cases {
            assert_eq!(
                kind(decode(&mut decoder, &hex(block))),
                HpackErrorKind::Compression,
                "{block}"
            );
        }
        assert_table(&decoder, &[], 0);
    }

    #[test]
    fn size_updates_only_at_the_start_and_within_the_advertised_size() {
        let mut decoder = Decoder::new(4096, 65536);
        // Two updates in a row (§4.2 allows both a smaller and a final one), then a field.
        let out = decode(&mut decoder, &hex("20 3f e1 1f 82")).unwrap();
        assert_eq!(out, fields(&[(":method", "GET")]));
        assert_eq!(decoder.table.capacity, 4096);
        assert_eq!(
            kind(decode(&mut decoder, &hex("82 20"))),
            HpackErrorKind::Compression
        );
        // 4097.
        assert_eq!(
            kind(decode(&mut decoder, &hex("3f e2 1f"))),
            HpackErrorKind::Compression
        );
        assert_eq!(decoder.table.capacity, 4096);
    }

    #[test]
    fn size_updates_evict() {
        let mut decoder = Decoder::new(4096, 65536);
        let first = hex("400a 6375 7374 6f6d 2d6b 6579 0d63 7573 746f 6d2d 6865 6164 6572");
        decode(&mut decoder, &first).unwrap();
        let mut block = vec![0x40];
        block.extend(string(b"a", false));
        block.extend(string(b"b", false));
        decode(&mut decoder, &block).unwrap();
        assert_table(&decoder, &[("a", "b"), ("custom-key", "custom-header")], 89);
        // Down to 40 bytes: only "a: b" (34) is left; then 0: nothing is.
        decode(&mut decoder, &hex("3f 09")).unwrap();
        assert_table(&decoder, &[("a", "b")], 34);
        decode(&mut decoder, &hex("20")).unwrap();
        assert_table(&decoder, &[], 0);
        assert_eq!(
            kind(decode(&mut decoder, &hex("be"))),
            HpackErrorKind::Compression
        );
        // Entries are indexed again once the size goes back up.
        decode(&mut decoder, &hex("3f e1 1f")).unwrap();
        decode(&mut decoder, &block).unwrap();
        assert_eq!(
            decode(&mut decoder, &hex("be")).unwrap(),
            fields(&[("a", "b")])
        );
    }

    #[test]
    fn an_entry_larger_than_the_table_empties_it() {
        let mut decoder = Decoder::new(100, 65536);
        let mut block = vec![0x40];
        block.extend(string(b"a", false));
        block.extend(string(b"b", false));
        decode(&mut decoder, &block).unwrap();
        assert_table(&decoder, &[("a", "b")], 34);
        let long = "v".repeat(68); // 1 + 68 + 32 = 101 bytes
        let mut block = vec![0x40];
        block.extend(string(b"a", false));
        block.extend(string(long.as_bytes(), false));
        let out = decode(&mut decoder, &block).unwrap();
        assert_eq!(out, fields(&[("a", &long)]));
        assert_table(&decoder, &[], 0);
        // One byte less fits exactly.
        let mut block = vec![0x40];
        block.extend(string(b"a", false));
        block.extend(string(&long.as_bytes()[1..], false));
        decode(&mut decoder, &block).unwrap();
        assert_eq!(decoder.table.size, 100);
    }

    #[test]
    fn a_name_from_the_entry_its_insertion_evicts() {
        // §4.4: "custom-key: custom-header" (55) fills a 64-byte table, and a new entry named
        // after it (index 62) evicts it.
        let mut decoder = Decoder::new(64, 65536);
        let first = hex("400a 6375 7374 6f6d 2d6b 6579 0d63 7573 746f 6d2d 6865 6164 6572");
        decode(&mut decoder, &first).unwrap();
        let mut block = vec![0x40 + 62];
        block.extend(string(b"x", true));
        let out = decode(&mut decoder, &block).unwrap();
        assert_eq!(out, fields(&[("custom-key", "x")]));
        assert_table(&decoder, &[("custom-key", "x")], 43);
    }

    #[test]
    fn rejects_invalid_huffman() {
        let bad = [
            ("ff ff ff ff", "EOS, then 2 bits of padding"),
            ("1f ff ff ff ff", "'a', then EOS"),
            ("1f ff", "'a', then 11 bits of padding"),
            ("ff", "8 bits of padding"),
            ("18", "'a', then padding of zeros"),
            ("1c", "'a', then padding of 1 0 0"),
            ("fe", "8 bits that begin a longer code"),
        ];
        for (text, what) in bad {
            assert_eq!(
                decode_huffman(&hex(text)).map_err(|error| error.kind),
                Err(HpackErrorKind::Compression),
                "{what}"
            );
        }
        // The same through a whole block: a literal value "a" with padding of zeros.
        let mut decoder = Decoder::new(4096, 65536);
        assert_eq!(
            kind(decode(&mut decoder, &hex("00 01 61 81 18"))),
            HpackErrorKind::Compression
        );
    }

    #[test]
    fn accepts_valid_huffman() {
        let good: [(&str, &[u8]); 8] = [
            ("", b""),
            ("1f", b"a"),            // 3 bits of padding
            ("003f", b"00"),         // 6 bits
            ("18c6 31ff", b"aaaaa"), // 7 bits
            ("fe07", b"!a"),         // a 10-bit code, then 1 bit
            ("f81f", b"&a"),         // no padding after the 8-bit '&'
            ("fffe 1f", b"\\"),      // a 19-bit code
            ("ffff fbbf", b"\xff"),  // a 26-bit code
        ];
        for (text, expected) in good {
            assert_eq!(decode_huffman(&hex(text)).unwrap(), expected, "{text}");
        }
    }

    #[test]
    fn oversized_lists_are_decoded_but_rejected() {
        // ":method: GET" is 42 bytes, "custom-key: custom-header" 55.
        let first = hex("400a 6375 7374 6f6d 2d6b 6579 0d63 7573 746f 6d2d 6865 6164 6572");
        let mut block = hex("82");
        block.extend(&first);
        block.extend(hex("82"));
        let mut decoder = Decoder::new(4096, 138);
        let mut out = fields(&[("x", "y")]);
        let error = decoder.decode(&block, &mut out).unwrap_err();
        assert_eq!(error.kind, HpackErrorKind::TooLarge);
        assert_eq!(out, fields(&[("x", "y")]));
        // The table kept up with the encoder anyway.
        assert_table(&decoder, &[("custom-key", "custom-header")], 55);
        // Exactly at the limit is fine; the next block starts from zero.
        let mut decoder = Decoder::new(4096, 139);
        decoder.decode(&block, &mut out).unwrap();
        assert_eq!(out.len(), 4);
        decoder.decode(&hex("be"), &mut out).unwrap();
        // A compression error after the limit was passed wins: the connection is lost.
        let mut decoder = Decoder::new(4096, 50);
        let result = decode(&mut decoder, &hex("82 82 80"));
        assert_eq!(kind(result), HpackErrorKind::Compression);
    }

    #[test]
    fn compression_errors_leave_the_list_as_it_was() {
        let mut decoder = Decoder::new(4096, 65536);
        let mut out = fields(&[("x", "y")]);
        let error = decoder.decode(&hex("82 84 80"), &mut out).unwrap_err();
        assert_eq!(error.kind, HpackErrorKind::Compression);
        assert_eq!(out, fields(&[("x", "y")]));
        assert!(error.to_string().starts_with("HPACK: index 0"), "{error}");
    }

    proptest! {
        #[test]
        fn huffman_round_trips(text in proptest::collection::vec(any::<u8>(), 0..300)) {
            prop_assert_eq!(decode_huffman(&huffman_encode(&text)).unwrap(), text);
        }

        #[test]
        fn huffman_never_panics(raw in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = decode_huffman(&raw);
        }

        #[test]
        fn decode_never_panics(
            blocks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..200), 1..4),
        ) {
            // A small table and list limit, so that eviction and TooLarge are reached too.
            let mut decoder = Decoder::new(128, 256);
            let mut out = Vec::new();
            for block in &blocks {
                if decoder.decode(block, &mut out).is_ok() {
                    let size: usize = out.iter().map(|(n, v)| entry_size(n, v)).sum();
                    prop_assert!(size <= 256);
                }
                out.clear();
                prop_assert!(decoder.table.size <= decoder.table.capacity);
            }
        }

        /// After a block of literals with incremental indexing, the dynamic table holds the
        /// longest run of the newest fields that fits, newest first.
        #[test]
        fn the_table_keeps_the_newest_fields_that_fit(
            pairs in proptest::collection::vec(("[a-z]{1,20}", "[ -~]{0,60}", any::<bool>()), 1..12),
            capacity in 0_usize..400,
        ) {
            let mut decoder = Decoder::new(capacity, usize::MAX);
            let mut block = Vec::new();
            for (name, value, huffman) in &pairs {
                block.push(0x40);
                block.extend(string(name.as_bytes(), *huffman));
                block.extend(string(value.as_bytes(), !*huffman));
            }
            let out = decode(&mut decoder, &block).unwrap();
            let expected: Vec<Field> = pairs
                .iter()
                .map(|(name, value, _)| (name.clone().into_bytes(), value.clone().into_bytes()))
                .collect();
            prop_assert_eq!(&out, &expected);
            let mut kept = Vec::new();
            let mut size = 0;
            for field in expected.iter().rev() {
                let field_size = entry_size(&field.0, &field.1);
                if size + field_size > capacity {
                    break;
                }
                size += field_size;
                kept.push(field.clone());
            }
            prop_assert_eq!(decoder.table.size, size);
            // Indexed back, from 62 on.
            let block: Vec<u8> = (0..kept.len()).map(|i| 0x80 + u8::try_from(62 + i).unwrap()).collect();
            prop_assert_eq!(decode(&mut decoder, &block).unwrap(), kept);
        }
    }
}
