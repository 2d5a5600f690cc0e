//! Unit tests of `kernel`: its errors name the device and say what to do.

use super::*;

#[test]
fn a_wrong_table_error_names_the_device_and_what_to_do() {
    let raw = vec![(0, 2048, "error".to_owned(), String::new())];
    let e = Error::WrongTable {
        name: "tl1-abc-thin-5".into(),
        found: describe_table(&raw),
        expected: describe_table(
            &Kernel::thin_table(
                Device {
                    major: 253,
                    minor: 2,
                },
                ThinId::new(5).unwrap(),
                Sectors(2048),
            )
            .to_raw_table(),
        ),
    };
    let text = e.to_string();
    assert!(text.contains("`0 2048 error `"), "{text}");
    assert!(text.contains("`0 2048 thin 253:2 5`"), "{text}");
    assert!(text.contains("dmsetup remove tl1-abc-thin-5"), "{text}");
    assert!(matches!(e, crate::Error::WrongTable { .. }), "{e}");
    assert_eq!(describe_table(&[]), "no table");
}
