//! A cursor over a buffer whose exact size was computed beforehand.
//!
//! Every encoder here works in two steps: compute the exact output length, allocate once (in
//! Python, straight into the `bytes` object), then write. Writing past the end is a bug in the
//! length computation, never a property of the input, so it panics (`PyO3` turns that into a
//! `PanicException`) rather than silently truncating.

pub struct Out<'a> {
    buf: &'a mut [u8],
    pos: usize,
}

impl<'a> Out<'a> {
    pub fn new(buf: &'a mut [u8]) -> Self {
        Out { buf, pos: 0 }
    }

    /// Bytes written so far.
    pub fn written(&self) -> usize {
        self.pos
    }

    /// Whether the buffer is exactly full: the length computation and the writer agreed.
    pub fn is_full(&self) -> bool {
        self.pos == self.buf.len()
    }

    #[inline]
    pub fn put_slice(&mut self, bytes: &[u8]) {
        let end = self.pos + bytes.len();
        self.buf[self.pos..end].copy_from_slice(bytes);
        self.pos = end;
    }

    #[inline]
    pub fn put_u8(&mut self, byte: u8) {
        self.buf[self.pos] = byte;
        self.pos += 1;
    }

    #[inline]
    pub fn put_i16_be(&mut self, v: i16) {
        self.put_slice(&v.to_be_bytes());
    }

    #[inline]
    pub fn put_i32_be(&mut self, v: i32) {
        self.put_slice(&v.to_be_bytes());
    }

    #[inline]
    pub fn put_i64_be(&mut self, v: i64) {
        self.put_slice(&v.to_be_bytes());
    }

    /// A protobuf base-128 varint.
    #[inline]
    pub fn put_varint(&mut self, mut v: u64) {
        while v >= 0x80 {
            // Truncation is the point: the low 7 bits, with the continuation bit set.
            #[allow(clippy::cast_possible_truncation)]
            self.put_u8((v as u8) | 0x80);
            v >>= 7;
        }
        #[allow(clippy::cast_possible_truncation)]
        self.put_u8(v as u8);
    }
}
