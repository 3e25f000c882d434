//! The rows of a `COPY … TO STDOUT` in progress, read from libpq in one call that needs no
//! Python: the reads' largest cost in the server was a Python call per row (psycopg's
//! `PGconn.get_copy_data`, a bytes object each, a list and a join), holding the GIL against
//! the event loop.
//!
//! This is the crate's only `unsafe` code: it calls the libpq that psycopg has already loaded
//! into the process, on a `PGconn` that psycopg owns. The functions are looked up through
//! psycopg's own extension module (opened by its path, never loaded here: `RTLD_NOLOAD`), and
//! a lookup through a handle searches that object and its dependencies: it finds the libpq
//! psycopg calls, whatever else the process has loaded. The caller keeps the connection alive
//! and unused by anyone else meanwhile, as for any libpq call (the reader's connections each
//! serve one worker thread at a time).
#![allow(unsafe_code)]

use std::ffi::{c_char, c_int, c_void, CStr, CString};

type GetCopyData = unsafe extern "C" fn(*mut c_void, *mut *mut c_char, c_int) -> c_int;
type FreeMem = unsafe extern "C" fn(*mut c_void);
type ConsumeInput = unsafe extern "C" fn(*mut c_void) -> c_int;
type Socket = unsafe extern "C" fn(*const c_void) -> c_int;

/// The libpq functions a COPY TO STDOUT's reading needs.
pub struct Libpq {
    get_copy_data: GetCopyData,
    freemem: FreeMem,
    consume_input: ConsumeInput,
    socket: Socket,
}

/// How reading a COPY's output ended.
#[derive(Debug)]
pub enum CopyEnd {
    /// `PQgetCopyData`'s last answer: -1 when the COPY is done (its result follows), -2 when
    /// it failed.
    Status(i32),
    /// The connection was lost while waiting for rows (`PQconsumeInput` failed, or libpq has
    /// no socket any more): libpq's error message says why.
    Lost,
    /// Waiting for the socket failed (`poll`'s error).
    WaitFailed(std::io::Error),
}

impl Libpq {
    /// The libpq functions as seen from the shared object loaded into this process from
    /// `path` (psycopg's extension module, or a libpq itself); an error if it is not loaded,
    /// or a function is not found.
    pub fn loaded(path: &str) -> Result<Self, String> {
        let name = CString::new(path).map_err(|e| e.to_string())?;
        // SAFETY: dlopen with RTLD_NOLOAD only looks the library up; the handle is kept (the
        // library is never unloaded: psycopg holds it too).
        let handle = unsafe { libc::dlopen(name.as_ptr(), libc::RTLD_NOW | libc::RTLD_NOLOAD) };
        if handle.is_null() {
            return Err(format!("{path} is not loaded"));
        }
        let symbol = |symbol: &CStr| -> Result<*mut c_void, String> {
            // SAFETY: a lookup in a valid handle.
            let address = unsafe { libc::dlsym(handle, symbol.as_ptr()) };
            if address.is_null() {
                Err(format!("{path} has no {}", symbol.to_string_lossy()))
            } else {
                Ok(address)
            }
        };
        // SAFETY: each symbol is libpq's function of that name, whose C signature the type
        // spells out (libpq-fe.h).
        unsafe {
            Ok(Self {
                get_copy_data: std::mem::transmute::<*mut c_void, GetCopyData>(symbol(
                    c"PQgetCopyData",
                )?),
                freemem: std::mem::transmute::<*mut c_void, FreeMem>(symbol(c"PQfreemem")?),
                consume_input: std::mem::transmute::<*mut c_void, ConsumeInput>(symbol(
                    c"PQconsumeInput",
                )?),
                socket: std::mem::transmute::<*mut c_void, Socket>(symbol(c"PQsocket")?),
            })
        }
    }

    /// Append every row of the COPY TO STDOUT in progress on `conn` to `out`, waiting for the
    /// socket (in `poll`) whenever libpq has no whole row buffered.
    ///
    /// # Safety
    /// `conn` is a live `PGconn` of this libpq, in the COPY_OUT state, that no other thread
    /// uses until this returns.
    pub unsafe fn copy_out(&self, conn: *mut c_void, out: &mut Vec<u8>) -> CopyEnd {
        loop {
            let mut row: *mut c_char = std::ptr::null_mut();
            let size = (self.get_copy_data)(conn, &raw mut row, 1);
            match usize::try_from(size) {
                Ok(0) => match self.wait_readable(conn) {
                    Ok(true) if (self.consume_input)(conn) != 0 => {}
                    Ok(_) => return CopyEnd::Lost,
                    Err(error) => return CopyEnd::WaitFailed(error),
                },
                Ok(length) => {
                    // SAFETY: libpq returned `length` bytes at `row`, ours to free.
                    out.extend_from_slice(std::slice::from_raw_parts(row.cast::<u8>(), length));
                    (self.freemem)(row.cast::<c_void>());
                }
                Err(_) => return CopyEnd::Status(size),
            }
        }
    }

    /// Block until the connection's socket has input (or an error to read); false when libpq
    /// has no socket (it closed it on a lost connection).
    unsafe fn wait_readable(&self, conn: *mut c_void) -> std::io::Result<bool> {
        let fd = (self.socket)(conn);
        if fd < 0 {
            return Ok(false);
        }
        let mut poll = libc::pollfd {
            fd,
            events: libc::POLLIN | libc::POLLPRI,
            revents: 0,
        };
        loop {
            if libc::poll(&raw mut poll, 1, -1) >= 0 {
                return Ok(true);
            }
            let error = std::io::Error::last_os_error();
            if error.kind() != std::io::ErrorKind::Interrupted {
                return Err(error);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Libpq;

    #[test]
    fn a_library_that_is_not_loaded_is_not_loaded_here() {
        let error = Libpq::loaded("/nonexistent/libpq.so.5").err().unwrap();
        assert!(error.contains("is not loaded"), "{error}");
        assert!(Libpq::loaded("nul\0inside").is_err());
    }
}
