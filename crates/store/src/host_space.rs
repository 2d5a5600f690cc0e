//! Host space checks of the store's verbs: an import is refused before it
//! starts when the filesystem holding the pool cannot take its scratch
//! (an archive unpacks under `ROOT/store/tmp`) and the bytes its new
//! layers add to the pool's data file. Blob sizes are what is known up
//! front; compressed blobs unpack larger, so the figure is a lower bound
//! and the error says so.

use std::path::Path;

use thinlayer_pool::Bytes;

use crate::{Result, Store, source::ImageSource};

impl Store {
    /// Before `source::open` (`src` is `None`): room to unpack `path` if it
    /// is an archive. After it: room for the blobs of the layers the pool
    /// does not hold yet.
    ///
    /// # Errors
    /// [`thinlayer_pool::Error::HostNoSpace`] (exit 6) with the bytes
    /// needed; I/O errors.
    pub(crate) fn require_import_space(
        &mut self,
        path: &Path,
        src: Option<&ImageSource>,
    ) -> Result<()> {
        let Some(src) = src else {
            let Ok(meta) = std::fs::metadata(path) else {
                return Ok(()); // source::open says what is wrong with it
            };
            if meta.is_file() {
                self.pool.require_host_space(
                    &format!(
                        "unpacking the image archive {} ({}) into scratch",
                        path.display(),
                        Bytes(meta.len())
                    ),
                    Bytes(meta.len()),
                )?;
            }
            return Ok(());
        };
        let diff_ids: Vec<String> = src.layers.iter().map(|l| l.diff_id.clone()).collect();
        let chain = crate::source::chain_ids(&diff_ids);
        let layout = self.pool.layout().clone();
        let (mut n, mut bytes) = (0usize, 0u64);
        for (blob, id) in src.layers.iter().zip(&chain) {
            if !layout.layer_record(id).exists() {
                n += 1;
                bytes = bytes.saturating_add(blob.size);
            }
        }
        if n == 0 {
            return Ok(());
        }
        self.pool.require_host_space(
            &format!(
                "importing {} ({n} new layer(s), {} of blobs; compressed sizes, so a lower bound of what the layers take in the pool)",
                path.display(),
                Bytes(bytes)
            ),
            Bytes(bytes),
        )?;
        Ok(())
    }
}
