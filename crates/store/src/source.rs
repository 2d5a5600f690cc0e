//! Reading an image to import: an OCI image layout directory, an OCI
//! layout archive (a tar of one), or a `docker save` archive. The result is
//! the image's name, config digest, and its layers bottom to top, each a
//! blob file with the `diff_id` its config promises (verified when the
//! layer is applied).
//!
//! Every digest and diff_id the image gives (manifest, config and layer
//! digests, the config's `rootfs.diff_ids`) is checked to be
//! `sha256:<64 lowercase hex>` ([`check_digest`]) before it names anything:
//! a blob path, a layer id (the ChainID), a record. An image whose first
//! diff_id is `vol-data`, `web-rw` or `../../x` is refused here, before
//! the pool is touched.
//!
//! Archives are unpacked into a scratch directory under the pool root (the
//! tar crate's unpacker refuses paths outside it); the scratch directory is
//! removed when the [`ImageSource`] is dropped.

use std::{
    fs,
    path::{Path, PathBuf},
};

use oci_spec::image::{ImageConfiguration, ImageIndex, ImageManifest, MediaType};
use serde::Deserialize;

use crate::error::{Error, IoContext, Result};

/// One layer of an image to import.
#[derive(Clone, Debug)]
pub struct LayerBlob {
    /// The blob: a layer tar, plain, gzip or zstd.
    pub path: PathBuf,
    /// `sha256:<hex>` of the uncompressed tar, from the image config.
    pub diff_id: String,
    /// The blob's size in bytes.
    pub size: u64,
}

/// An image ready to import.
#[derive(Debug)]
pub struct ImageSource {
    /// The name the image carries (tag or ref annotation), if any.
    pub name: Option<String>,
    /// The digest of its config.
    pub config_digest: String,
    /// Layers, bottom to top.
    pub layers: Vec<LayerBlob>,
    /// The config's `Volumes`: paths a container of it gets an anonymous
    /// volume at.
    pub volumes: Vec<String>,
    scratch: Option<PathBuf>,
}

impl Drop for ImageSource {
    fn drop(&mut self) {
        if let Some(d) = &self.scratch {
            let _ = fs::remove_dir_all(d);
        }
    }
}

/// Checks that `value`, the image's `field`, is `sha256:` and 64 lowercase
/// hex digits: the only digest form this store lets name a blob or a layer.
///
/// # Errors
/// [`Error::Format`] naming the field (exit 2).
pub fn check_digest(shown: &Path, field: &str, value: &str) -> Result<()> {
    let ok = value.strip_prefix("sha256:").is_some_and(|hex| {
        hex.len() == 64
            && hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    });
    if ok {
        Ok(())
    } else {
        let shown_value: String = value.chars().take(100).collect();
        Err(bad(
            shown,
            format!(
                "{field} `{}` is not a digest of the form sha256:<64 lowercase hex digits>; \
                 the image is refused and nothing was changed",
                shown_value.escape_debug()
            ),
        ))
    }
}

fn bad(path: &Path, reason: impl Into<String>) -> Error {
    Error::Format {
        path: path.to_owned(),
        reason: reason.into(),
    }
}

/// Opens `path`: a directory (OCI layout) or an archive (OCI layout tar or
/// `docker save` tar). Archives unpack into a fresh directory in `scratch`.
///
/// # Errors
/// [`Error::Format`] for anything that is not one of those, or is
/// inconsistent (layer count differs from the config's diff_ids, missing
/// blobs).
pub fn open(path: &Path, scratch: &Path) -> Result<ImageSource> {
    let meta = fs::metadata(path).ctx(|| format!("open {}", path.display()))?;
    if meta.is_dir() {
        return read_layout(path, None);
    }
    fs::create_dir_all(scratch).ctx(|| format!("create {}", scratch.display()))?;
    let dir = scratch.join(format!("import-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).ctx(|| format!("create {}", dir.display()))?;
    let unpacked = fs::File::open(path)
        .and_then(|f| tar::Archive::new(std::io::BufReader::new(f)).unpack(&dir));
    if let Err(e) = unpacked {
        let _ = fs::remove_dir_all(&dir);
        return Err(bad(
            path,
            format!("not a readable image archive (OCI layout or docker save tar): {e}"),
        ));
    }
    let result = read_layout(&dir, Some(path));
    match result {
        Ok(mut src) => {
            src.scratch = Some(dir);
            Ok(src)
        }
        Err(e) => {
            let _ = fs::remove_dir_all(&dir);
            Err(e)
        }
    }
}

/// `docker save`'s manifest.json entries.
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DockerManifest {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

fn read_layout(dir: &Path, archive: Option<&Path>) -> Result<ImageSource> {
    let shown = archive.unwrap_or(dir);
    // docker save (also newer ones, which add an OCI layout beside it).
    let docker = dir.join("manifest.json");
    if docker.is_file() {
        let text = fs::read(&docker).ctx(|| format!("read {}", docker.display()))?;
        let list: Vec<DockerManifest> = serde_json::from_slice(&text).map_err(|e| {
            bad(
                shown,
                format!("manifest.json is not a docker save manifest: {e}"),
            )
        })?;
        let [m] = &list[..] else {
            return Err(bad(
                shown,
                format!("holds {} images; import archives of one image", list.len()),
            ));
        };
        let config_path = inside(dir, &m.config, shown)?;
        let config = ImageConfiguration::from_file(&config_path)
            .map_err(|e| bad(shown, format!("config {}: {e}", m.config)))?;
        let blobs = m
            .layers
            .iter()
            .map(|l| inside(dir, l, shown))
            .collect::<Result<Vec<_>>>()?;
        return Ok(ImageSource {
            name: m.repo_tags.as_ref().and_then(|t| t.first().cloned()),
            config_digest: format!("sha256:{}", file_sha256(&config_path)?),
            layers: pair(shown, blobs, config.rootfs().diff_ids())?,
            volumes: config_volumes(&config),
            scratch: None,
        });
    }
    let index_path = dir.join("index.json");
    if !index_path.is_file() {
        return Err(bad(
            shown,
            "neither an OCI image layout (no index.json) nor a docker save archive (no manifest.json)",
        ));
    }
    let index =
        ImageIndex::from_file(&index_path).map_err(|e| bad(shown, format!("index.json: {e}")))?;
    let (manifest_desc, name) = find_manifest(dir, &index, shown)?;
    let manifest = ImageManifest::from_file(blob_path(
        dir,
        "the manifest digest",
        manifest_desc.digest().to_string().as_str(),
        shown,
    )?)
    .map_err(|e| bad(shown, format!("manifest: {e}")))?;
    let config_digest = manifest.config().digest().to_string();
    let config =
        ImageConfiguration::from_file(blob_path(dir, "the config digest", &config_digest, shown)?)
            .map_err(|e| bad(shown, format!("config: {e}")))?;
    let mut blobs = Vec::new();
    for (i, l) in manifest.layers().iter().enumerate() {
        match l.media_type() {
            MediaType::ImageLayer | MediaType::ImageLayerGzip | MediaType::ImageLayerZstd => {}
            MediaType::Other(t) if t.contains("docker.image.rootfs.diff.tar") => {}
            other => {
                return Err(bad(
                    shown,
                    format!("layer media type {other} is not supported"),
                ));
            }
        }
        let field = format!("the manifest's layer {} digest", i + 1);
        blobs.push(blob_path(dir, &field, l.digest().as_ref(), shown)?);
    }
    Ok(ImageSource {
        name,
        config_digest,
        layers: pair(shown, blobs, config.rootfs().diff_ids())?,
        volumes: config_volumes(&config),
        scratch: None,
    })
}

/// The config's `Volumes` paths (checked when a container is made).
fn config_volumes(config: &ImageConfiguration) -> Vec<String> {
    config
        .config()
        .as_ref()
        .and_then(|c| c.volumes().clone())
        .unwrap_or_default()
}

/// The first image manifest the index leads to (through nested indexes),
/// and its ref-name annotation.
fn find_manifest(
    dir: &Path,
    index: &ImageIndex,
    shown: &Path,
) -> Result<(oci_spec::image::Descriptor, Option<String>)> {
    for d in index.manifests() {
        let name = d
            .annotations()
            .as_ref()
            .and_then(|a| a.get("org.opencontainers.image.ref.name").cloned());
        match d.media_type() {
            MediaType::ImageManifest => return Ok((d.clone(), name)),
            MediaType::ImageIndex => {
                let nested = ImageIndex::from_file(blob_path(
                    dir,
                    "a nested index digest",
                    d.digest().as_ref(),
                    shown,
                )?)
                .map_err(|e| bad(shown, format!("nested index: {e}")))?;
                let (m, inner) = find_manifest(dir, &nested, shown)?;
                return Ok((m, inner.or(name)));
            }
            _ => continue,
        }
    }
    Err(bad(shown, "index.json lists no image manifest"))
}

fn pair(shown: &Path, blobs: Vec<PathBuf>, diff_ids: &[String]) -> Result<Vec<LayerBlob>> {
    if blobs.len() != diff_ids.len() {
        return Err(bad(
            shown,
            format!(
                "the manifest lists {} layers but the config {} diff_ids",
                blobs.len(),
                diff_ids.len()
            ),
        ));
    }
    // Before anything else: a diff_id names a layer (the first one is its
    // ChainID as written).
    for (i, d) in diff_ids.iter().enumerate() {
        check_digest(shown, &format!("the config's rootfs.diff_ids[{i}]"), d)?;
    }
    blobs
        .into_iter()
        .zip(diff_ids)
        .map(|(path, diff_id)| {
            let size = fs::metadata(&path)
                .map_err(|e| bad(shown, format!("layer {}: {e}", path.display())))?
                .len();
            Ok(LayerBlob {
                path,
                diff_id: diff_id.clone(),
                size,
            })
        })
        .collect()
}

/// `blobs/sha256/<hex>` for `digest` (the image's `field`), checked by
/// [`check_digest`] first.
fn blob_path(dir: &Path, field: &str, digest: &str, shown: &Path) -> Result<PathBuf> {
    check_digest(shown, field, digest)?;
    let hex = digest.strip_prefix("sha256:").expect("checked just above");
    let p = dir.join("blobs").join("sha256").join(hex);
    if !p.is_file() {
        return Err(bad(shown, format!("blob {digest} is missing")));
    }
    Ok(p)
}

/// A relative path from a manifest, refused if it leaves `dir`.
fn inside(dir: &Path, rel: &str, shown: &Path) -> Result<PathBuf> {
    let p = Path::new(rel);
    if p.is_absolute()
        || p.components()
            .any(|c| matches!(c, std::path::Component::ParentDir))
    {
        return Err(bad(shown, format!("path `{rel}` leaves the archive")));
    }
    let full = dir.join(p);
    if !full.is_file() {
        return Err(bad(shown, format!("`{rel}` is missing")));
    }
    Ok(full)
}

fn file_sha256(path: &Path) -> Result<String> {
    use sha2::Digest;
    let bytes = fs::read(path).ctx(|| format!("read {}", path.display()))?;
    Ok(hex::encode(sha2::Sha256::digest(&bytes)))
}

/// The OCI ChainID of a stack of diff_ids: the identity of a layer *with*
/// everything under it, so two images that share a base share its layers.
pub fn chain_ids(diff_ids: &[String]) -> Vec<String> {
    use sha2::Digest;
    let mut out: Vec<String> = Vec::with_capacity(diff_ids.len());
    for d in diff_ids {
        let next = match out.last() {
            None => d.clone(),
            Some(parent) => format!(
                "sha256:{}",
                hex::encode(sha2::Sha256::digest(format!("{parent} {d}").as_bytes()))
            ),
        };
        out.push(next);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_ids_follow_the_oci_rule() {
        let ids = chain_ids(&["sha256:aa".into(), "sha256:bb".into()]);
        assert_eq!(ids[0], "sha256:aa");
        use sha2::Digest;
        let want = hex::encode(sha2::Sha256::digest(b"sha256:aa sha256:bb"));
        assert_eq!(ids[1], format!("sha256:{want}"));
    }

    #[test]
    fn only_sha256_digests_pass() {
        let d = Path::new("/img");
        let good = format!("sha256:{}", "0123456789abcdef".repeat(4));
        check_digest(d, "x", &good).unwrap();
        for bad in [
            "vol-data".to_owned(),
            "web-rw".to_owned(),
            "../../x".to_owned(),
            "/etc".to_owned(),
            "sha256:xyz".to_owned(),
            "sha256:".to_owned(),
            format!("sha256:{}", "0123456789ABCDEF".repeat(4)),
            format!("sha256:{}0", "0123456789abcdef".repeat(4)),
            format!("sha512:{}", "0123456789abcdef".repeat(4)),
            format!("sha256:{}/", &good[7..70]),
        ] {
            let e = check_digest(d, "the config's rootfs.diff_ids[0]", &bad).unwrap_err();
            assert!(
                e.to_string().contains("rootfs.diff_ids[0]") && matches!(e, Error::Format { .. }),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn rejects_what_is_not_an_image() {
        let d = std::env::temp_dir().join(format!("tl-src-{}", std::process::id()));
        fs::create_dir_all(&d).unwrap();
        let e = open(&d, &d.join("scratch")).unwrap_err();
        assert!(e.to_string().contains("neither an OCI image layout"), "{e}");
        let f = d.join("junk.tar");
        fs::write(
            &f,
            b"this is not a tar archive at all, not even close......",
        )
        .unwrap();
        let e = open(&f, &d.join("scratch")).unwrap_err();
        assert!(
            e.to_string().contains("image archive") || e.to_string().contains("neither"),
            "{e}"
        );
        assert!(inside(&d, "../etc/passwd", &d).is_err());
        assert!(blob_path(&d, "digest", "sha256:../../x", &d).is_err());
        fs::remove_dir_all(&d).unwrap();
    }
}
