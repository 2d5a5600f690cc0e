//! Bounded input: trailing data, oversized extension headers, decompression
//! bombs, and the xattr allowlist. Streams that would be huge are generated
//! on the fly and the bytes the applier pulled are counted, so "bounded"
//! is asserted as "stopped reading early", not as a memory figure.

mod common;

use std::{
    cell::Cell,
    io::{self, Cursor, Read, Write},
    rc::Rc,
};

use common::*;
use sha2::{Digest, Sha256};
use tar::{EntryType, Header};
use thinlayer_image::{
    ApplyOptions, Error, apply::MAX_TRAILER, apply_layer, tar_content_size, tar_content_size_max,
};

const MIB: u64 = 1 << 20;

/// Counts the bytes read through it.
struct Counted<R> {
    inner: R,
    count: Rc<Cell<u64>>,
}

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count.set(self.count.get() + n as u64);
        Ok(n)
    }
}

fn counted<R: Read>(inner: R) -> (Counted<R>, Rc<Cell<u64>>) {
    let count = Rc::new(Cell::new(0));
    (
        Counted {
            inner,
            count: count.clone(),
        },
        count,
    )
}

fn sha(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

fn small_tar() -> Vec<u8> {
    Tar::new()
        .dir("etc/", 0o755)
        .file("etc/hostname", b"box\n", 0o644)
        .finish()
}

#[test]
fn trailing_garbage_is_hashed_up_to_a_cap_then_refused() {
    let t = TempDir::new("trailer");
    // 100 MiB of garbage after the end marker, generated, never buffered.
    let tar = small_tar();
    let garbage = io::repeat(0xAA).take(100 * MIB);
    let (input, pulled) = counted(Cursor::new(tar.clone()).chain(garbage));
    let err = apply_layer(&t.sub("root"), input, &ApplyOptions::default()).unwrap_err();
    assert!(
        matches!(err, Error::TrailingData { limit } if limit == MAX_TRAILER),
        "{err}"
    );
    assert!(
        err.to_string().contains("after its end-of-archive marker"),
        "{err}"
    );
    assert!(
        pulled.get() <= tar.len() as u64 + MAX_TRAILER + MIB,
        "read {} bytes of a 100 MiB tail: the trailer is not bounded",
        pulled.get()
    );

    // Trailing data under the cap is accepted, and the diff_id covers it.
    let mut padded = small_tar();
    padded.extend(std::iter::repeat_n(0u8, 10240));
    padded.extend(std::iter::repeat_n(0x55u8, 512 * 1024));
    let root = t.sub("root2");
    let report = apply_layer(&root, &padded[..], &ApplyOptions::default()).unwrap();
    assert_eq!(report.diff_id, sha(&padded));
    assert_eq!(std::fs::read(root.join("etc/hostname")).unwrap(), b"box\n");
}

/// A raw header of `kind` and `size`, its name as given.
fn raw_header(name: &[u8], kind: EntryType, size: u64) -> [u8; 512] {
    let mut h = Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(0o644);
    h.set_mtime(T0 as u64);
    h.set_size(size);
    {
        let old = h.as_old_mut();
        old.name = [0; 100];
        old.name[..name.len()].copy_from_slice(name);
    }
    h.set_cksum();
    *h.as_bytes()
}

#[test]
fn huge_gnu_long_name_is_refused_naming_the_entry_before_it_is_read() {
    let t = TempDir::new("longname");
    // A 1 GiB long name: its first bytes name the entry, the rest is
    // generated and must not be read.
    let header = raw_header(b"././@LongLink", EntryType::GNULongName, 1 << 30);
    let stream = Cursor::new(header.to_vec())
        .chain(Cursor::new(b"usr/lib/very/long/name".to_vec()))
        .chain(io::repeat(b'a').take((1 << 30) - 22));
    let (input, pulled) = counted(stream);
    let err = apply_layer(&t.sub("root"), input, &ApplyOptions::default()).unwrap_err();
    let Error::Hostile { entry, reason } = &err else {
        panic!("expected a hostile entry, got {err}");
    };
    assert!(entry.starts_with("usr/lib/very/long/name"), "{entry}");
    assert!(entry.ends_with("..."), "{entry}");
    assert!(reason.contains("GNU long name"), "{reason}");
    assert!(reason.contains("over the limit of 64 KiB"), "{reason}");
    assert!(
        pulled.get() < MIB,
        "read {} bytes of the long name",
        pulled.get()
    );

    // Just under the cap passes the guard (and is then refused as a path
    // over PATH_MAX, by the applier, with its own reason).
    let name = vec![b'n'; 60 * 1024];
    let mut tar = raw_header(b"././@LongLink", EntryType::GNULongName, name.len() as u64).to_vec();
    tar.extend(&name);
    tar.resize(tar.len().div_ceil(512) * 512, 0);
    tar.extend(raw_header(b"short", EntryType::Regular, 0));
    tar.extend([0u8; 1024]);
    let err = apply_layer(&t.sub("root2"), &tar[..], &ApplyOptions::default()).unwrap_err();
    assert!(
        matches!(&err, Error::Hostile { reason, .. } if reason.contains("a name is")),
        "{err}"
    );
}

#[test]
fn huge_pax_header_is_refused_naming_the_entry() {
    let t = TempDir::new("pax");
    // A PAX header whose `path` record comes first and a 300 KiB xattr
    // after it: over the 256 KiB cap.
    let big = vec![b'v'; 300 * 1024];
    let tar = Tar::new()
        .pax(&[("path", b"etc/big.conf"), ("SCHILY.xattr.user.big", &big)])
        .file("etc/big.conf", b"x", 0o644)
        .finish();
    let err = apply_layer(&t.sub("root"), &tar[..], &ApplyOptions::default()).unwrap_err();
    let Error::Hostile { entry, reason } = &err else {
        panic!("expected a hostile entry, got {err}");
    };
    assert_eq!(entry, "etc/big.conf");
    assert!(reason.contains("PAX extended header"), "{reason}");
    assert!(reason.contains("over the limit of 256 KiB"), "{reason}");
    assert!(
        tar_content_size(&tar[..]).is_err(),
        "the size scan has the same bound"
    );

    // A 1 GiB PAX header, generated: refused after a few KiB.
    let header = raw_header(b"PaxHeaders/huge", EntryType::XHeader, 1 << 30);
    let stream = Cursor::new(header.to_vec()).chain(io::repeat(b'9').take(1 << 30));
    let (input, pulled) = counted(stream);
    let err = apply_layer(&t.sub("root2"), input, &ApplyOptions::default()).unwrap_err();
    assert!(
        matches!(&err, Error::Hostile { entry, .. } if entry == "PaxHeaders/huge"),
        "{err}"
    );
    assert!(
        pulled.get() < MIB,
        "read {} bytes of the PAX header",
        pulled.get()
    );

    // A PAX header under the cap with a long path applies.
    let ok = Tar::new()
        .pax(&[("SCHILY.xattr.user.note", &[b'n'; 4000][..])])
        .file("note", b"x", 0o644)
        .finish();
    let root = t.sub("root3");
    apply_layer(&root, &ok[..], &ApplyOptions::default()).unwrap();
    assert_eq!(
        xattr::get(root.join("note"), "user.note")
            .unwrap()
            .map(|v| v.len()),
        Some(4000)
    );
}

#[test]
fn gnu_sparse_entries_are_refused_before_their_extension_chain() {
    let t = TempDir::new("sparse");
    let mut tar = raw_header(b"holes", EntryType::GNUSparse, 0).to_vec();
    tar.extend([0u8; 1024]);
    let err = apply_layer(&t.sub("root"), &tar[..], &ApplyOptions::default()).unwrap_err();
    assert!(
        matches!(&err, Error::Hostile { entry, reason } if entry == "holes" && reason.contains("sparse")),
        "{err}"
    );
}

#[test]
fn xattrs_outside_the_allowlist_are_dropped_and_named() {
    let t = TempDir::new("xattr-filter");
    let root = t.sub("root");
    let tar = Tar::new()
        .pax(&[
            ("SCHILY.xattr.trusted.overlay.opaque", b"y"),
            ("SCHILY.xattr.user.keep", b"dir"),
        ])
        .dir("etc/", 0o755)
        .pax(&[
            ("SCHILY.xattr.trusted.x", b"1"),
            (
                "SCHILY.xattr.security.selinux",
                b"system_u:object_r:shadow_t:s0",
            ),
            ("SCHILY.xattr.security.ima", b"\x03\x02"),
            (
                "SCHILY.xattr.security.capability",
                &CAP_NET_BIND_SERVICE[..],
            ),
            ("SCHILY.xattr.user.k", b"v"),
        ])
        .file("etc/ping", b"ping", 0o755)
        .pax(&[("SCHILY.xattr.trusted.x", b"2")])
        .file("etc/other", b"o", 0o644)
        .finish();
    let report = apply_layer(&root, &tar[..], &ApplyOptions::default()).unwrap();
    assert_eq!(report.dropped_xattrs, 5);
    assert_eq!(
        report.dropped_xattr_names,
        [
            "security.ima",
            "security.selinux",
            "trusted.overlay.opaque",
            "trusted.x"
        ]
    );
    let ping = root.join("etc/ping");
    assert_eq!(
        xattr::get(&ping, "user.k").unwrap().as_deref(),
        Some(&b"v"[..])
    );
    assert_eq!(
        xattr::get(&ping, "security.capability").unwrap().as_deref(),
        Some(&CAP_NET_BIND_SERVICE[..])
    );
    let names: Vec<String> = xattr::list(&ping)
        .unwrap()
        .map(|n| n.to_string_lossy().into_owned())
        .collect();
    for dropped in ["trusted.x", "security.ima", "security.selinux"] {
        assert!(
            !names.iter().any(|n| n == dropped),
            "{dropped} was set: {names:?}"
        );
    }
    let etc = root.join("etc");
    assert_eq!(
        xattr::get(&etc, "user.keep").unwrap().as_deref(),
        Some(&b"dir"[..])
    );
    assert_eq!(xattr::get(&etc, "trusted.overlay.opaque").unwrap(), None);
    assert_eq!(
        xattr::get(root.join("etc/other"), "trusted.x").unwrap(),
        None
    );
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    enc.write_all(bytes).unwrap();
    enc.finish().unwrap()
}

#[test]
fn max_bytes_catches_a_decompression_bomb() {
    let t = TempDir::new("bomb");
    let zeros = vec![0u8; 1 << 20];
    let tar = Tar::new().file("zeros", &zeros, 0o644).finish();
    let bomb = gzip(&tar);
    assert!(
        bomb.len() < 16 * 1024,
        "a gzip of zeros is small: {}",
        bomb.len()
    );

    let opts = ApplyOptions {
        max_bytes: 512 * 1024,
        ..Default::default()
    };
    let err = apply_layer(&t.sub("root"), &bomb[..], &opts).unwrap_err();
    assert!(
        matches!(err, Error::TooLarge { limit } if limit == 512 * 1024),
        "{err}"
    );
    let message = err.to_string();
    assert!(
        message.contains("more than 524288 bytes (512 KiB)"),
        "{message}"
    );
    assert!(message.contains("raise --max-layer-size"), "{message}");
    assert!(matches!(
        tar_content_size_max(&bomb[..], 512 * 1024),
        Err(Error::TooLarge { .. })
    ));

    // The same layer under the default limit applies.
    let root = t.sub("root2");
    let report = apply_layer(&root, &bomb[..], &ApplyOptions::default()).unwrap();
    assert_eq!(report.diff_id, sha(&tar));
    assert_eq!(std::fs::metadata(root.join("zeros")).unwrap().len(), MIB);
    assert_eq!(tar_content_size(&bomb[..]).unwrap(), MIB);
}
