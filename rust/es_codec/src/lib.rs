//! `es_codec`: the event store's hot-path codecs, exposed to Python as the private module
//! `eventstore._es_codec` (see `src/eventstore/_es_codec.pyi` for the Python API).
//!
//! The plain Rust modules below know nothing of Python, so they are unit-tested with
//! `cargo test`; `py` is the only boundary, where their errors become Python exceptions.
//!
//! * [`request`]: decode and validate `AppendEventsRequest`, build `AppendEventsResponse`;
//! * [`json`]: JSON validation by PostgreSQL jsonb's rules;
//! * [`uuids`]: UUID text in and out;
//! * [`proto`]: the protobuf wire format of the messages on the hot path;
//! * [`versions`]: the optimistic-concurrency check of a batch of appends;
//! * [`copy_in`]: the binary COPY payload that inserts a batch of events;
//! * [`insert_sql`]: the same as one `INSERT … VALUES` (a small batch, in one round trip);
//! * [`literals`]: the writer's other parameters, bound client-side as SQL literals;
//! * [`copy_out`]: binary COPY output of the events query to serialized `Event`s;
//! * [`hpack`], [`http2`]: the inbound half of the gRPC server's HTTP/2 connection;
//! * [`libpq`]: a COPY TO STDOUT's rows read from libpq without Python (the only `unsafe`).

// `unsafe` only in `libpq` (calls into the libpq psycopg loaded), which allows it for itself,
// and at the one call into it in `py`.
#![deny(unsafe_code)]
#![warn(clippy::pedantic)]
// Pedantic allow-list, each for a reason:
// - missing_errors_doc / missing_panics_doc: the crate's API is internal to the project and its
//   errors are described on the error types; per-function sections would repeat them.
// - doc_markdown: the prose names PostgreSQL, serde_json and protobuf messages as words; in
//   backticks they would read as code.
// - module_name_repetitions: names like `copy_in::CopyInError` read better at use sites.
// - must_use_candidate: most candidates are trivial getters; the attribute would be noise.
#![allow(
    clippy::doc_markdown,
    clippy::missing_errors_doc,
    clippy::missing_panics_doc,
    clippy::module_name_repetitions,
    clippy::must_use_candidate
)]

pub mod copy_in;
pub mod copy_out;
pub mod hpack;
pub mod http2;
pub mod insert_sql;
pub mod json;
pub mod libpq;
pub mod literals;
pub mod out;
pub mod proto;
mod py;
pub mod request;
pub mod uuids;
pub mod versions;

#[cfg(test)]
mod testutil;
