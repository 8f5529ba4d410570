//! Reading a file under a size cap, whatever the file is. A length from
//! `metadata` is no bound: a device (`/dev/zero`), a FIFO, a file in
//! `/proc` or one that grows while it is read all report a size that is
//! not what a read returns. So every file cobbyd reads (the config, a
//! credentials file or standard input, a shop's CA file, the state lock)
//! goes through [`read_file`] or [`read_stream`], which stop one byte past
//! the cap and say so.

use std::io::Read;
use std::path::Path;

/// Why a bounded read failed.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// More than `max` bytes: reading stopped there.
    #[error("more than {max} bytes")]
    TooLarge { max: u64 },
    /// Not UTF-8 text ([`read_text`] only).
    #[error("not UTF-8 text (byte {offset})")]
    NotText { offset: usize },
}

/// At most `max` bytes of `reader`; more is [`ReadError::TooLarge`].
pub fn read_stream(reader: impl Read, max: u64) -> Result<Vec<u8>, ReadError> {
    let mut buf = Vec::new();
    reader.take(max.saturating_add(1)).read_to_end(&mut buf)?;
    if buf.len() as u64 > max {
        return Err(ReadError::TooLarge { max });
    }
    Ok(buf)
}

/// The file at `path`, at most `max` bytes.
pub fn read_file(path: &Path, max: u64) -> Result<Vec<u8>, ReadError> {
    let f = std::fs::File::open(path)?;
    // A regular file that says it is too large is refused without reading.
    if let Ok(meta) = f.metadata()
        && meta.is_file()
        && meta.len() > max
    {
        return Err(ReadError::TooLarge { max });
    }
    read_stream(f, max)
}

/// [`read_file`] as UTF-8 text.
pub fn read_text(path: &Path, max: u64) -> Result<String, ReadError> {
    text(read_file(path, max)?)
}

/// [`read_stream`] as UTF-8 text.
pub fn read_stream_text(reader: impl Read, max: u64) -> Result<String, ReadError> {
    text(read_stream(reader, max)?)
}

fn text(bytes: Vec<u8>) -> Result<String, ReadError> {
    String::from_utf8(bytes).map_err(|e| ReadError::NotText {
        offset: e.utf8_error().valid_up_to(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_are_read_up_to_the_cap() {
        let e = read_file(Path::new("/dev/zero"), 4096).unwrap_err();
        assert!(matches!(e, ReadError::TooLarge { max: 4096 }), "{e}");
        assert_eq!(read_file(Path::new("/dev/null"), 10).unwrap(), b"");
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, "12345").unwrap();
        assert_eq!(read_text(&p, 5).unwrap(), "12345");
        assert!(matches!(
            read_text(&p, 4),
            Err(ReadError::TooLarge { max: 4 })
        ));
        std::fs::write(&p, b"ab\xE9").unwrap();
        assert!(matches!(
            read_text(&p, 5),
            Err(ReadError::NotText { offset: 2 })
        ));
        assert!(matches!(
            read_stream(&b"abc"[..], 2),
            Err(ReadError::TooLarge { max: 2 })
        ));
    }
}
