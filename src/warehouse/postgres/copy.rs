//! The binary `COPY` stream, written directly from cells: one buffer per stream sent in large
//! messages, each value encoded by its cell's variant. (`postgres`' `BinaryCopyInWriter` sends
//! a 4 KiB message per few rows through a type-checked `ToSql` call per value, and its jiff
//! conversion rounds every timestamp through a `Span`; on a large load that was a fifth of the
//! loading thread's time.)

use bytes::{BufMut, BytesMut};
use jiff::Timestamp;

use crate::warehouse::{Cell, Column, ColumnType};

/// The signature, flags and header-extension length that open a binary COPY stream.
pub const HEADER: &[u8] = b"PGCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0";

/// The trailer that ends the stream (a field count of -1).
pub const TRAILER: &[u8] = &[0xff, 0xff];

/// COPY data sent per message: large enough that the server and both network stacks handle a
/// few messages per chunk rather than one per row.
pub const MESSAGE_BYTES: usize = 256 * 1024;

/// A binary COPY stream on a connection whose `COPY … FROM STDIN (FORMAT binary)` has started:
/// rows are encoded into [`CopySink::buf`] (which opens with the header), sent in messages of
/// [`MESSAGE_BYTES`] as they fill one ([`CopySink::row_done`]), and the stream ended with
/// [`CopySink::finish`]. Dropped unfinished, the COPY is aborted. The sync's loads and the
/// store's writes both COPY through it.
pub struct CopySink<'c> {
    sink: postgres::CopyInWriter<'c>,
    /// The rows not yet sent.
    pub buf: BytesMut,
}

/// Why a COPY stream failed.
pub enum SinkError {
    /// The driver's error: the server's (with its SQLSTATE, from [`CopySink::finish`]) or a
    /// closed connection.
    Driver(postgres::Error),
    /// An I/O error of the stream that wraps no driver error.
    Stream(std::io::Error),
}

impl<'c> CopySink<'c> {
    /// The stream of a started COPY, its buffer opened with the header.
    pub fn new(sink: postgres::CopyInWriter<'c>) -> CopySink<'c> {
        let mut buf = BytesMut::with_capacity(MESSAGE_BYTES + 64 * 1024);
        buf.put_slice(HEADER);
        CopySink { sink, buf }
    }

    /// After a row was encoded into the buffer: sends the rows so far once they fill a message.
    pub fn row_done(&mut self) -> Result<(), SinkError> {
        if self.buf.len() >= MESSAGE_BYTES {
            self.send()?;
        }
        Ok(())
    }

    /// Sends the last rows and ends the COPY: the rows are written once this returns.
    pub fn finish(mut self) -> Result<(), SinkError> {
        self.buf.put_slice(TRAILER);
        self.send()?;
        self.sink.finish().map_err(SinkError::Driver)?;
        Ok(())
    }

    fn send(&mut self) -> Result<(), SinkError> {
        use std::io::Write;
        // The sink reports the driver's errors as I/O errors wrapping them.
        self.sink
            .write_all(&self.buf)
            .map_err(|e| match driver_error(e) {
                Ok(e) => SinkError::Driver(e),
                Err(e) => SinkError::Stream(e),
            })?;
        self.buf.clear();
        Ok(())
    }
}

/// The driver's error inside an error of a COPY sink's `write`; the I/O error itself when it
/// wraps none.
fn driver_error(e: std::io::Error) -> Result<postgres::Error, std::io::Error> {
    if e.get_ref().is_none() {
        return Err(e);
    }
    let kind = e.kind();
    match e.into_inner() {
        Some(inner) => inner
            .downcast::<postgres::Error>()
            .map(|e| *e)
            .map_err(|other| std::io::Error::new(kind, other)),
        None => Err(kind.into()),
    }
}

/// Seconds from the Unix epoch to PostgreSQL's, 2000-01-01T00:00:00Z.
const PG_EPOCH_S: i64 = 946_684_800;

/// A timestamp as PostgreSQL's `timestamptz` holds it: whole microseconds since 2000-01-01,
/// sub-microsecond digits dropped toward zero (as the driver's jiff conversion does). In
/// 64-bit arithmetic: 128-bit division took a tenth of the writing thread.
pub fn pg_micros(t: Timestamp) -> i64 {
    // jiff's range (years -9999 to 9999) keeps every product below 2^63.
    let secs = t.as_second() - PG_EPOCH_S;
    // Carries the seconds' sign in jiff (or is 0).
    let sub = i64::from(t.subsec_nanosecond());
    let whole = secs * 1_000_000 + sub / 1000;
    // `whole` plus a fraction of a microsecond with the sign of `sub % 1000`: truncated
    // toward zero, a fraction of the other sign than `whole` moves it one step to zero.
    match (whole.signum(), (sub % 1000).signum()) {
        (-1, 1) => whole + 1,
        (1, -1) => whole - 1,
        _ => whole,
    }
}

/// `t` cut to the microseconds PostgreSQL keeps ([`pg_micros`]): the other warehouses hold the
/// same instant.
pub fn as_postgres_holds_it(t: Timestamp) -> Timestamp {
    Timestamp::from_microsecond(pg_micros(t) + PG_EPOCH_S * 1_000_000).unwrap_or(t)
}

/// Appends one tuple: the field count, then each field's length (-1 for NULL) and its binary
/// value, as the server's receive function of the column's type reads it. A cell of another
/// type than its column's is an error (the sync casts every value to its column's type first).
pub fn encode_row(buf: &mut BytesMut, row: &[Cell], columns: &[Column]) -> Result<(), String> {
    if row.len() != columns.len() {
        return Err(format!(
            "a row of {} values for {} columns",
            row.len(),
            columns.len()
        ));
    }
    let count = i16::try_from(row.len()).map_err(|_| format!("{} columns in a row", row.len()))?;
    buf.put_i16(count);
    for (cell, column) in row.iter().zip(columns) {
        match (cell, column.ty) {
            (Cell::Null, _) => buf.put_i32(-1),
            (Cell::Int(i), ColumnType::Integer) => {
                buf.put_i32(8);
                buf.put_i64(*i);
            }
            (Cell::Float(f), ColumnType::Float) => {
                buf.put_i32(8);
                buf.put_f64(*f);
            }
            (Cell::Bool(b), ColumnType::Boolean) => {
                buf.put_i32(1);
                buf.put_u8(u8::from(*b));
            }
            (Cell::Text(s), ColumnType::Varchar) => {
                let len = i32::try_from(s.len())
                    .map_err(|_| format!("a value of {} over 2 GiB", column.name))?;
                buf.put_i32(len);
                buf.put_slice(s.as_bytes());
            }
            (Cell::Timestamp(t), ColumnType::Timestamp) => {
                buf.put_i32(8);
                buf.put_i64(pg_micros(*t));
            }
            (cell, ty) => {
                return Err(format!(
                    "column {} is {} but the value is {cell:?}",
                    column.name,
                    ty.as_str()
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use postgres::types::{ToSql, Type};
    use proptest::prelude::*;

    proptest! {
        /// Every timestamp jiff holds encodes as the driver's own conversion encodes it.
        #[test]
        fn timestamps_encode_as_the_driver_encodes_them(
            s in -377_705_116_800i64..253_402_207_199i64,
            ns in -999_999_999i32..1_000_000_000,
        ) {
            // jiff wants the nanoseconds' sign to agree with the seconds'.
            let Ok(t) = Timestamp::new(s, ns) else { return Ok(()) };
            let mut driver = BytesMut::new();
            t.to_sql(&Type::TIMESTAMPTZ, &mut driver).expect("driver");
            prop_assert_eq!(&driver[..], &pg_micros(t).to_be_bytes()[..]);
        }
    }

    #[test]
    fn sub_microsecond_digits_are_dropped_as_the_driver_drops_them() {
        for (s, ns) in [
            (0, 500),
            (0, 499),
            (-1, 999_999_500),
            (-1, 999_999_499),
            (946_684_800, 1_500),
        ] {
            let t = Timestamp::new(s, ns).expect("in range");
            let mut driver = BytesMut::new();
            t.to_sql(&Type::TIMESTAMPTZ, &mut driver).expect("driver");
            assert_eq!(&driver[..], &pg_micros(t).to_be_bytes()[..], "{t}");
        }
    }

    proptest! {
        /// Every value is framed as its length and the bytes the driver's own `ToSql` writes.
        #[test]
        fn values_encode_as_the_driver_encodes_them(
            text in "\\PC{0,40}",
            int in any::<i64>(),
            float in any::<f64>(),
            flag in any::<bool>(),
        ) {
            let cases: Vec<(Cell, ColumnType, Box<dyn ToSql>)> = vec![
                (Cell::Text(text.clone()), ColumnType::Varchar, Box::new(text.clone())),
                (Cell::Int(int), ColumnType::Integer, Box::new(int)),
                (Cell::Float(float), ColumnType::Float, Box::new(float)),
                (Cell::Bool(flag), ColumnType::Boolean, Box::new(flag)),
            ];
            for (cell, ty, driver_value) in cases {
                let pg = match ty {
                    ColumnType::Varchar => Type::TEXT,
                    ColumnType::Integer => Type::INT8,
                    ColumnType::Float => Type::FLOAT8,
                    _ => Type::BOOL,
                };
                let mut driver = BytesMut::new();
                driver_value.to_sql_checked(&pg, &mut driver).expect("driver");
                let mut ours = BytesMut::new();
                encode_row(&mut ours, &[cell, Cell::Null], &[Column::new("v", ty), Column::new("n", ty)])
                    .expect("encodes");
                let mut want = vec![0u8, 2];
                want.extend_from_slice(&i32::try_from(driver.len()).expect("small").to_be_bytes());
                want.extend_from_slice(&driver);
                want.extend_from_slice(&(-1i32).to_be_bytes());
                prop_assert_eq!(&ours[..], &want[..]);
            }
        }
    }

    #[test]
    fn a_row_of_another_width_than_its_columns_is_refused() {
        let mut buf = BytesMut::new();
        let err = encode_row(&mut buf, &[Cell::Null], &[]).expect_err("width");
        assert!(err.contains("1 values for 0 columns"), "{err}");
    }

    #[test]
    fn a_cell_of_another_type_than_its_column_is_refused() {
        let mut buf = BytesMut::new();
        let err = encode_row(
            &mut buf,
            &[Cell::Text("x".into())],
            &[Column::new("total", ColumnType::Float)],
        )
        .expect_err("mismatch");
        assert!(err.contains("total") && err.contains("float"), "{err}");
    }
}
