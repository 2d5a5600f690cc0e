//! A live dm device is adopted by name only when its table is the one
//! thinlayer would load. A stale device under a layer's or the pool's name
//! with another table (left by a crash of some other tool, or made by
//! hand) is refused with an error naming it, and left untouched; once it
//! is removed the same command succeeds. The stale devices are made here
//! through the `devicemapper` crate, not through the CLI under test.
//! Every test here is named `vm_*` and runs in the VM harness.

mod common;

use common::{Pool, Scratch, vm_test};
use devicemapper::{DM, DevId, DmName, DmOptions};
use thinlayer_pool::names::{PoolId, Role, dm_name};

/// A device of `sectors` whose every I/O fails: the same length as the
/// device it impersonates, another target.
fn make_error_device(dm: &DM, name: &DmName, sectors: u64) {
    dm.device_create(name, None, DmOptions::default())
        .expect("create the stale device");
    let id = DevId::Name(name);
    dm.table_load(
        &id,
        &[(0, sectors, "error".to_owned(), String::new())],
        DmOptions::default(),
    )
    .expect("load the error table");
    dm.device_suspend(&id, DmOptions::default())
        .expect("resume the stale device");
}

/// The live table of `name`, one (start, length, target, params) per line.
fn table_of(dm: &DM, name: &DmName) -> Vec<(u64, u64, String, String)> {
    dm.table_status(
        &DevId::Name(name),
        DmOptions::default().set_flags(devicemapper::DmFlags::DM_STATUS_TABLE),
    )
    .expect("the stale device is still there")
    .1
}

fn pool_id(s: &Scratch) -> PoolId {
    let id = s.json(&["pool", "status"])["pool_id"]
        .as_str()
        .expect("pool status has a pool_id")
        .to_owned();
    PoolId::new(&id).expect("a valid pool id")
}

#[test]
fn vm_adopt_refuses_a_stale_layer_device_with_another_table() {
    vm_test("adopt-layer", Pool::Small, |s| {
        s.ok(&["layer", "create", "a"]);
        let layers = s.json(&["layer", "ls"]);
        let thin_id = layers
            .as_array()
            .expect("layer ls lists layers")
            .iter()
            .find(|l| l["id"] == "a")
            .and_then(|l| l["thin_id"].as_u64())
            .expect("layer a has a thin id");
        let name = dm_name(
            &pool_id(s),
            Role::Thin(u32::try_from(thin_id).expect("24-bit id")),
        );
        // The layer is inactive until mounted: its name is free.
        assert!(!common::dm_devices().contains(&name.to_string()));

        let dm = DM::new().expect("open /dev/mapper/control");
        make_error_device(&dm, &name, (512 << 20) / 512);
        let before = table_of(&dm, &name);

        let dir = s.dir("a");
        let err = s.fails(
            &["mount", "a", dir.to_str().unwrap()],
            4,
            "another table than thinlayer would load",
        );
        assert!(err.contains(&*name.to_string()), "names the device: {err}");
        assert!(err.contains("dmsetup remove"), "says what to do: {err}");
        assert_eq!(
            table_of(&dm, &name),
            before,
            "the stale device is untouched"
        );
        assert!(
            !std::fs::read_to_string("/proc/self/mountinfo")
                .unwrap()
                .contains(dir.to_str().unwrap()),
            "nothing was mounted"
        );
        // A listing still works and shows the layer.
        assert!(s.ok(&["layer", "ls"]).contains('a'));

        dm.device_remove(&DevId::Name(&name), DmOptions::default())
            .expect("remove the stale device");
        s.ok(&["mount", "a", dir.to_str().unwrap()]);
        s.ok(&["umount", "a"]);
    });
}

#[test]
fn vm_adopt_refuses_a_stale_pool_device_with_another_table() {
    vm_test("adopt-pool", Pool::Small, |s| {
        let name = dm_name(&pool_id(s), Role::Pool);
        s.ok(&["pool", "deactivate"]);
        assert!(!common::dm_devices().contains(&name.to_string()));

        let dm = DM::new().expect("open /dev/mapper/control");
        make_error_device(&dm, &name, (2 << 30) / 512);
        let before = table_of(&dm, &name);

        let err = s.fails(
            &["pool", "activate"],
            4,
            "another table than thinlayer would load",
        );
        assert!(err.contains(&*name.to_string()), "names the device: {err}");
        assert!(err.contains("dmsetup remove"), "says what to do: {err}");
        assert_eq!(
            table_of(&dm, &name),
            before,
            "the stale device is untouched"
        );

        dm.device_remove(&DevId::Name(&name), DmOptions::default())
            .expect("remove the stale device");
        s.ok(&["pool", "activate"]);
        s.ok(&["layer", "create", "b"]);
    });
}
