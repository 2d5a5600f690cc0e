use super::*;

fn tempdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("thinlayer-space-{tag}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&d);
    fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn size_changes_parse_relative_and_absolute() {
    assert_eq!(
        "+256M".parse::<SizeChange>().unwrap(),
        SizeChange::Add(Bytes(256 << 20))
    );
    assert_eq!(
        "1G".parse::<SizeChange>().unwrap(),
        SizeChange::To(Bytes(1 << 30))
    );
    assert!("+x".parse::<SizeChange>().is_err());
    assert_eq!(
        SizeChange::Add(Bytes(1)).apply(Bytes(2)),
        Bytes(3),
        "grow by"
    );
}

#[test]
fn shrinking_is_refused_with_a_way_out() {
    let e = refuse_shrink("data size", Bytes(2 << 30), Bytes(1 << 30)).unwrap_err();
    assert!(matches!(e, crate::Error::InvalidSize { .. }), "{e}");
    assert!(e.to_string().contains("cannot shrink"), "{e}");
    assert!(refuse_shrink("data size", Bytes(1), Bytes(1)).is_ok());
}

#[test]
fn allocate_file_holds_every_byte_on_the_host() {
    let d = tempdir("alloc");
    let p = d.join("metadata.img");
    let f = crate::record::open_private(&p, true).unwrap();
    allocate_file(&f, &p, Bytes(4 << 20)).unwrap();
    assert_eq!(fs::metadata(&p).unwrap().len(), 4 << 20);
    assert!(allocated(&p).unwrap().0 >= 4 << 20, "fully allocated");
    // Growing allocates the new end too; the old bytes stay.
    allocate_file(&f, &p, Bytes(6 << 20)).unwrap();
    assert!(allocated(&p).unwrap().0 >= 6 << 20);
    assert!(host_free(&d).unwrap().0 > 0);
    fs::remove_dir_all(d).unwrap();
}

#[test]
fn host_space_warns_when_the_host_cannot_hold_the_growth() {
    let d = tempdir("host");
    let f = crate::record::open_private(&d.join("data.img"), true).unwrap();
    f.set_len(1 << 20).unwrap();
    let m = crate::record::open_private(&d.join("metadata.img"), true).unwrap();
    allocate_file(&m, &d.join("metadata.img"), Bytes(1 << 20)).unwrap();
    let free = host_free(&d).unwrap().0;
    // A data file larger than the host could ever hold.
    let huge = HostSpace::measure(&d, Bytes(free + (1 << 40)), Bytes(1 << 20)).unwrap();
    assert!(!huge.holds_growth && huge.metadata_allocated, "{huge:?}");
    let w = huge.warnings(&d).join("\n");
    assert!(
        w.contains("free space on it") && w.contains("move the root"),
        "{w}"
    );
    let small = HostSpace::measure(&d, Bytes(1 << 20), Bytes(1 << 20)).unwrap();
    assert!(
        small.holds_growth && small.warnings(&d).is_empty(),
        "{small:?}"
    );
    // A sparse metadata file is said too.
    let sparse = HostSpace::measure(&d, Bytes(1 << 20), Bytes(2 << 20)).unwrap();
    assert!(sparse.warnings(&d).join(" ").contains("sparse"));
    fs::remove_dir_all(d).unwrap();
}

#[test]
fn sweep_scratch_removes_files_and_empty_dirs_and_follows_no_symlink() {
    let d = tempdir("sweep");
    let tmp = d.join("tmp");
    fs::create_dir_all(tmp.join("import-1/blobs/sha256")).unwrap();
    fs::write(tmp.join("import-1/blobs/sha256/abc"), b"blob").unwrap();
    fs::create_dir_all(tmp.join("apply-x-2")).unwrap();
    fs::create_dir_all(tmp.join("commit-3")).unwrap();
    fs::write(tmp.join("commit-3/layer.tar"), b"tar").unwrap();
    let keep = d.join("keep");
    fs::create_dir_all(&keep).unwrap();
    fs::write(keep.join("precious"), b"x").unwrap();
    std::os::unix::fs::symlink(&keep, tmp.join("link")).unwrap();
    assert_eq!(sweep_scratch(&tmp).unwrap(), 8);
    assert_eq!(fs::read_dir(&tmp).unwrap().count(), 0);
    assert!(
        keep.join("precious").exists(),
        "a symlink is removed, not followed"
    );
    assert_eq!(sweep_scratch(&tmp).unwrap(), 0);
    assert_eq!(sweep_scratch(&d.join("missing")).unwrap(), 0);
    fs::remove_dir_all(d).unwrap();
}

#[test]
fn the_full_pool_hint_names_the_command() {
    assert!(out_of_space_hint("data").contains("thinlayer pool extend --data-size +SIZE"));
}
