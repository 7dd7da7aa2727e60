//! Reading an operator's topology file: every command and the controller's first import go
//! through [`read`], so every reader has the same size limit and text rule.

use std::io::{ErrorKind, Read};
use std::path::Path;

use topology::MAX_DOCUMENT_BYTES;

/// Reads a topology file's text. The size limit is enforced while reading, so a huge or endless
/// file (a FIFO, /dev/zero) is never read whole. A file over the limit or not UTF-8 is an
/// [`ErrorKind::InvalidData`] error that says so.
pub fn read(path: &Path) -> std::io::Result<String> {
    let mut bytes = Vec::new();
    std::fs::File::open(path)?
        .take(MAX_DOCUMENT_BYTES as u64 + 1)
        .read_to_end(&mut bytes)?;
    if bytes.len() > MAX_DOCUMENT_BYTES {
        return Err(std::io::Error::new(
            ErrorKind::InvalidData,
            format!(
                "over the size limit of {MAX_DOCUMENT_BYTES} bytes ({} MiB)",
                MAX_DOCUMENT_BYTES / (1024 * 1024)
            ),
        ));
    }
    String::from_utf8(bytes).map_err(|e| {
        std::io::Error::new(
            ErrorKind::InvalidData,
            format!(
                "not UTF-8 text (invalid byte at offset {})",
                e.utf8_error().valid_up_to()
            ),
        )
    })
}
