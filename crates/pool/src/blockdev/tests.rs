use super::*;

fn label() -> Label {
    Label {
        pool_id: PoolId::new("0123abcd").unwrap(),
        role: DeviceRole::Data,
        uuid: new_uuid("x"),
    }
}

#[test]
fn a_label_round_trips_and_a_flipped_bit_is_caught() {
    let l = label();
    let mut s = l.encode();
    assert_eq!(Label::decode(&s), Some(l.clone()));
    assert_eq!(
        signature(&s).as_deref(),
        Some("a thinlayer label (data device of pool 0123abcd)")
    );
    s[30] ^= 1;
    assert_eq!(Label::decode(&s), None);
    assert_eq!(Label::decode(&[0u8; 512]), None);
    assert_eq!(l.uuid.len(), 32);
}

#[test]
fn signatures_are_told_by_their_magic() {
    let mut head = vec![0u8; 68 << 10];
    assert_eq!(signature(&head), None);
    head[1080..1082].copy_from_slice(&[0x53, 0xef]);
    assert_eq!(signature(&head).as_deref(), Some("an ext2/3/4 filesystem"));
    let mut head = vec![0u8; 68 << 10];
    head[512..520].copy_from_slice(b"LABELONE");
    assert_eq!(
        signature(&head).as_deref(),
        Some("an LVM physical volume label")
    );
    let mut head = vec![0u8; 68 << 10];
    head[32..40].copy_from_slice(&27_022_010u64.to_le_bytes());
    assert_eq!(signature(&head).as_deref(), Some("dm-thin pool metadata"));
    let mut head = vec![0u8; 68 << 10];
    head[510..512].copy_from_slice(&[0x55, 0xaa]);
    head[512..520].copy_from_slice(b"EFI PART");
    assert_eq!(signature(&head).as_deref(), Some("a GPT partition table"));
    // A short device is read as far as it goes.
    assert_eq!(signature(&[0u8; 100]), None);
}

#[test]
fn a_file_is_not_a_block_device() {
    let e = resolve(Path::new("/proc/self/status")).unwrap_err();
    assert!(e.to_string().contains("not a block device"), "{e}");
    let e = resolve(Path::new("/nonexistent/disk")).unwrap_err();
    assert!(e.to_string().contains("lsblk"), "{e}");
}
