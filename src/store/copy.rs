//! Binary `COPY` of the append-only rows of a write (events and change logs), and of the
//! profiles and identifiers it creates, into a PostgreSQL store. The server inserts COPY rows a
//! page at a time (one WAL record per page rather than per row) and reads no parameter arrays:
//! the engine bench's `events` inserts took a third less time than through
//! `INSERT … SELECT FROM unnest(…)`. Not so into `profiles` and `identifiers`: a table with a
//! `BEFORE INSERT` row trigger (their `updated_seq` stamps, even with a false `WHEN`) has its
//! COPY rows inserted one at a time; there COPY saves the upsert's conflict check and arrays.

use bytes::{BufMut, BytesMut};
use postgres::GenericClient;

use super::codec::micros;
use super::{StoreError, Trigger};
use crate::warehouse::postgres::copy::{CopySink, SinkError};

/// The values of one row of a binary COPY stream.
pub(super) struct CopyRow<'b> {
    buf: &'b mut BytesMut,
    fields: i16,
    /// A text longer than the format's 2 GiB field, which ends the COPY with an error.
    too_long: bool,
}

impl CopyRow<'_> {
    /// A 64-bit integer (`BIGINT`).
    pub(super) fn int(&mut self, v: i64) {
        self.fields += 1;
        self.buf.put_i32(8);
        self.buf.put_i64(v);
    }

    /// A `TEXT` value.
    pub(super) fn text(&mut self, s: &str) {
        self.fields += 1;
        match i32::try_from(s.len()) {
            Ok(len) => {
                self.buf.put_i32(len);
                self.buf.put_slice(s.as_bytes());
            }
            Err(_) => {
                self.too_long = true;
                self.buf.put_i32(-1);
            }
        }
    }

    /// A nullable `TEXT` value.
    pub(super) fn opt_text(&mut self, s: Option<&str>) {
        match s {
            Some(s) => self.text(s),
            None => {
                self.fields += 1;
                self.buf.put_i32(-1);
            }
        }
    }

    /// The six trigger columns of a change log ([`super::schema::TRIGGER_COLUMNS`]).
    pub(super) fn trigger(&mut self, t: &Trigger) {
        self.text(t.event_type.as_str());
        self.text(&t.event_id);
        self.opt_text(t.event_name.as_deref());
        self.text(&t.source_id);
        self.int(micros(t.timestamp));
        self.int(micros(t.received_at));
    }
}

/// A binary `COPY` into one table, open on the connection inside its transaction
/// ([`CopySink`]: the server inserts each message of rows as it arrives). Dropped without
/// [`CopyIn::finish`], the COPY is aborted (and with it the transaction).
struct CopyIn<'c> {
    sink: CopySink<'c>,
    table: &'static str,
}

/// A COPY stream's error as the store's: the server's keep their SQLSTATE, so a refused value
/// is still told from a broken connection.
fn store_error(e: SinkError) -> StoreError {
    match e {
        SinkError::Driver(e) => StoreError::Postgres(e),
        SinkError::Stream(e) => StoreError::CopyStream(e),
    }
}

impl<'c> CopyIn<'c> {
    /// Starts a COPY of `columns` (in the order each row writes its values) into `table`.
    fn start(
        client: &'c mut impl GenericClient,
        table: &'static str,
        columns: &str,
    ) -> Result<CopyIn<'c>, StoreError> {
        let sink = client.copy_in(&format!(
            "COPY {table} ({columns}) FROM STDIN (FORMAT binary)"
        ))?;
        Ok(CopyIn {
            sink: CopySink::new(sink),
            table,
        })
    }

    /// Adds the row `encode` writes, sending the rows so far once they fill a message.
    fn row(&mut self, encode: impl FnOnce(&mut CopyRow<'_>)) -> Result<(), StoreError> {
        let buf = &mut self.sink.buf;
        let start = buf.len();
        // The field count, written once the row's values are.
        buf.put_i16(0);
        let mut row = CopyRow {
            buf,
            fields: 0,
            too_long: false,
        };
        encode(&mut row);
        let (fields, too_long) = (row.fields, row.too_long);
        if too_long {
            return Err(StoreError::CopyStream(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!(
                    "a value of {} is over the 2 GiB a field can hold",
                    self.table
                ),
            )));
        }
        self.sink.buf[start..start + 2].copy_from_slice(&fields.to_be_bytes());
        self.sink.row_done().map_err(store_error)
    }

    /// Sends the last rows and ends the COPY: the rows are written once this returns.
    fn finish(self) -> Result<(), StoreError> {
        self.sink.finish().map_err(store_error)
    }
}

/// COPYs `rows` into `table` (`columns` in the order `encode` writes each row's values) inside
/// the connection's open transaction; nothing when there are none.
pub(super) fn copy_rows<R>(
    client: &mut impl GenericClient,
    table: &'static str,
    columns: &str,
    rows: &[R],
    mut encode: impl FnMut(&mut CopyRow<'_>, &R),
) -> Result<(), StoreError> {
    if rows.is_empty() {
        return Ok(());
    }
    let mut copy = CopyIn::start(client, table, columns)?;
    for r in rows {
        copy.row(|row| encode(row, r))?;
    }
    copy.finish()
}
